-- Attachment bytes in 64 KiB parts, so uploads append and downloads stream one part at
-- a time instead of holding a whole file. Uploads are visible (sendable, downloadable)
-- only once complete; the collector deletes ones never linked to a message.
ALTER TABLE attachments ADD COLUMN complete BOOLEAN NOT NULL DEFAULT true;

CREATE TABLE attachment_chunks (
    attachment_id  BIGINT NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    part           INT NOT NULL,
    data           BYTEA NOT NULL,
    PRIMARY KEY (attachment_id, part)
);

INSERT INTO attachment_chunks (attachment_id, part, data)
SELECT b.attachment_id, g.part, substring(b.data FROM g.part * 65536 + 1 FOR 65536)
FROM attachment_blobs b,
     generate_series(0, greatest((length(b.data) - 1) / 65536, 0)) AS g(part);

DROP TABLE attachment_blobs;

-- The upload quota sums one user's recent uploads; the collector scans by age.
CREATE INDEX attachments_by_uploader ON attachments (uploader_id, created_at);
CREATE INDEX attachments_by_age ON attachments (created_at);
