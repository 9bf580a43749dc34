-- Delivery ticks: the highest seq each member's devices have received, beside read_seq.
-- Expand-only (docs/deploy.md), and cheap on a large table: a constant default is
-- stored in the catalog, not written to every row.
ALTER TABLE room_members ADD COLUMN delivered_seq BIGINT NOT NULL DEFAULT 0;
