-- A group commit in one round trip. The commit workers used to run seven statements per
-- batch (a membership screen, BEGIN, the room locks, the idempotency lookup, the insert,
-- the room update, COMMIT), each a round trip and a wake-up of the backend. At ordinary
-- load every batch is a batch of one, so that was the price of every message.
--
-- `store_messages` takes a batch as parallel arrays, one element per send in arrival
-- order, plus its attachments as (send index from 1, attachment id, position from 1)
-- triples. Called as one statement it runs in one implicit transaction. It answers one
-- row per send (its index in `ord`; in no particular order):
--   new        stored now under the next seq of its room, its attachments linked
--   again      an earlier send of this batch with the same (sender, client_msg_id) stored it
--   retry      the same (sender, client_msg_id) was stored before this batch
--   conflict   that (sender, client_msg_id) names a message of another room
--   not_found  the room does not exist
--   forbidden  the sender may not write in the room
--   bad_reply  reply_to names no message of the room
-- Refused sends take no seq, so seqs stay gapless. Only adding a function: a message
-- service that predates it runs unchanged against this schema.
CREATE FUNCTION store_messages(
    rooms_in BIGINT[], senders_in TEXT[], admins_in BOOLEAN[], names_in TEXT[], kinds_in TEXT[],
    bodies_in TEXT[], replies_in BIGINT[], client_ids_in TEXT[],
    file_of_in INT[], files_in BIGINT[], positions_in INT[]
) RETURNS TABLE (
    ord INT, outcome TEXT,
    id BIGINT, room_id BIGINT, seq BIGINT, sender_id TEXT, sender_name TEXT, kind TEXT, body TEXT,
    reply_to BIGINT, client_msg_id TEXT, created_at TIMESTAMPTZ, edited_at TIMESTAMPTZ, deleted BOOLEAN
) LANGUAGE plpgsql
-- Planned once per connection (a generic plan), not per call: the arrays' lengths vary,
-- so Postgres would otherwise plan the statement below afresh every time, which costs
-- more CPU than running it. A plan made once must suit every table size, and one made
-- while the tables were small (a fresh database, or before ANALYZE) would scan them
-- whole: so every table is reached through its indexes, by nested loops.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
#variable_conflict use_column
BEGIN
    -- Rooms are locked in id order, so concurrent batches never deadlock. Under READ
    -- COMMITTED the statement below takes its snapshot after the locks are granted: it
    -- sees every earlier batch of these rooms, their seqs and their idempotency keys.
    PERFORM 1 FROM rooms r WHERE r.id = ANY (rooms_in) ORDER BY r.id FOR UPDATE;
    RETURN QUERY
    WITH req AS (
        SELECT q.* FROM unnest(rooms_in, senders_in, admins_in, names_in, kinds_in, bodies_in, replies_in,
                               client_ids_in)
            WITH ORDINALITY AS q(room_id, sender_id, admin, sender_name, kind, body, reply_to, client_msg_id, ord)
    ),
    -- Joins, not EXISTS subqueries: Postgres may answer an EXISTS by hashing the whole
    -- table it names (every member of the room), where a join probes the primary key.
    screened AS (
        SELECT q.*, r.last_seq,
            CASE
                WHEN r.id IS NULL THEN 'not_found'
                WHEN m.user_id IS NULL AND NOT (r.kind = 'support' AND q.admin) THEN 'forbidden'
                WHEN q.reply_to IS NOT NULL AND p.id IS NULL THEN 'bad_reply'
            END AS refused
        FROM req q
        LEFT JOIN rooms r ON r.id = q.room_id
        LEFT JOIN room_members m ON m.room_id = q.room_id AND m.user_id = q.sender_id
        LEFT JOIN messages p ON p.id = q.reply_to AND p.room_id = q.room_id
    ),
    stored AS (
        SELECT m.* FROM screened s
        JOIN messages m ON m.sender_id = s.sender_id AND m.client_msg_id = s.client_msg_id
        WHERE s.refused IS NULL
    ),
    -- Each key once (its first send of the batch), and every send without a key.
    fresh AS (
        SELECT s.* FROM screened s
        WHERE s.refused IS NULL AND (s.client_msg_id IS NULL OR (
            NOT EXISTS (SELECT 1 FROM stored t WHERE t.sender_id = s.sender_id AND t.client_msg_id = s.client_msg_id)
            AND NOT EXISTS (
                SELECT 1 FROM screened e WHERE e.refused IS NULL AND e.sender_id = s.sender_id
                    AND e.client_msg_id = s.client_msg_id AND e.ord < s.ord)))
    ),
    numbered AS (
        SELECT f.*, f.last_seq + row_number() OVER (PARTITION BY f.room_id ORDER BY f.ord) AS new_seq FROM fresh f
    ),
    inserted AS (
        INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id)
        SELECT n.room_id, n.new_seq, n.sender_id, n.sender_name, n.kind, n.body, n.reply_to, n.client_msg_id
        FROM numbered n
        RETURNING *
    ),
    advanced AS (
        UPDATE rooms r SET last_seq = n.last
        FROM (SELECT room_id, max(new_seq) AS last FROM numbered GROUP BY room_id) n
        WHERE r.id = n.room_id
    ),
    linked AS (
        INSERT INTO message_attachments (message_id, attachment_id, position)
        SELECT i.id, f.file, f.position
        FROM unnest(file_of_in, files_in, positions_in) AS f(file_of, file, position)
        JOIN numbered n ON n.ord = f.file_of
        JOIN inserted i ON i.room_id = n.room_id AND i.seq = n.new_seq
    )
    SELECT s.ord::INT,
        CASE
            WHEN s.refused IS NOT NULL THEN s.refused
            WHEN n.ord IS NOT NULL THEN 'new'
            WHEN m.room_id <> s.room_id THEN 'conflict'
            WHEN m.earlier THEN 'again'
            ELSE 'retry'
        END,
        m.id, m.room_id, m.seq, m.sender_id, m.sender_name, m.kind,
        CASE WHEN m.deleted_at IS NULL THEN m.body END, m.reply_to, m.client_msg_id, m.created_at, m.edited_at,
        m.deleted_at IS NOT NULL
    FROM screened s
    LEFT JOIN numbered n ON n.ord = s.ord
    LEFT JOIN LATERAL (
        SELECT i.*, true AS earlier FROM inserted i
        WHERE s.refused IS NULL AND (
            (n.ord IS NOT NULL AND i.room_id = n.room_id AND i.seq = n.new_seq)
            OR (n.ord IS NULL AND i.sender_id = s.sender_id AND i.client_msg_id = s.client_msg_id))
        UNION ALL
        SELECT t.*, false FROM stored t
        WHERE s.refused IS NULL AND n.ord IS NULL AND t.sender_id = s.sender_id AND t.client_msg_id = s.client_msg_id
        LIMIT 1
    ) m ON true;
END
$$;
