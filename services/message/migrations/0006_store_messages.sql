-- A group commit in one round trip. The commit workers used to run seven statements per
-- batch (a membership screen, BEGIN, the room locks, the idempotency lookup, the insert,
-- the room update, COMMIT), each a round trip and a wake-up of the backend. At ordinary
-- load every batch is a batch of one, so that was the price of every message.
--
-- `store_messages` takes a batch as parallel arrays, one element per send in arrival
-- order, plus its attachments as (send index from 1, attachment id, position from 1)
-- triples. Called as one statement it runs in one implicit transaction. It answers one
-- row per send (its index in `ord`; in no particular order) with an outcome and the id of
-- the message it names (and, for a new one, its seq and time; the caller has the rest):
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
) RETURNS TABLE (ord INT, outcome TEXT, id BIGINT, seq BIGINT, created_at TIMESTAMPTZ)
LANGUAGE plpgsql
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
    -- Joins, not EXISTS subqueries: Postgres may answer an EXISTS by hashing the whole
    -- table it names (every member of the room), where a join probes the primary key.
    WITH screened AS (
        SELECT q.ord, q.room_id, q.sender_id, q.sender_name, q.kind, q.body, q.reply_to, q.client_msg_id, r.last_seq,
            CASE
                WHEN r.id IS NULL THEN 'not_found'
                WHEN m.user_id IS NULL AND NOT (r.kind = 'support' AND q.admin) THEN 'forbidden'
                WHEN q.reply_to IS NOT NULL AND p.id IS NULL THEN 'bad_reply'
            END AS refused
        FROM unnest(rooms_in, senders_in, admins_in, names_in, kinds_in, bodies_in, replies_in, client_ids_in)
            WITH ORDINALITY AS q(room_id, sender_id, admin, sender_name, kind, body, reply_to, client_msg_id, ord)
        LEFT JOIN rooms r ON r.id = q.room_id
        LEFT JOIN room_members m ON m.room_id = q.room_id AND m.user_id = q.sender_id
        LEFT JOIN messages p ON p.id = q.reply_to AND p.room_id = q.room_id
    ),
    stored AS (
        SELECT s.ord, m.id, m.room_id FROM screened s
        JOIN messages m ON m.sender_id = s.sender_id AND m.client_msg_id = s.client_msg_id
        WHERE s.refused IS NULL
    ),
    -- Each key once (its first send of the batch), and every send without a key.
    numbered AS (
        SELECT s.ord, s.room_id, s.sender_id, s.sender_name, s.kind, s.body, s.reply_to, s.client_msg_id,
            s.last_seq + row_number() OVER (PARTITION BY s.room_id ORDER BY s.ord) AS new_seq
        FROM screened s
        WHERE s.refused IS NULL
            AND NOT EXISTS (SELECT 1 FROM stored t WHERE t.ord = s.ord)
            AND NOT EXISTS (
                SELECT 1 FROM screened e WHERE e.refused IS NULL AND e.sender_id = s.sender_id
                    AND e.client_msg_id = s.client_msg_id AND e.ord < s.ord)
    ),
    inserted AS (
        INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id)
        SELECT n.room_id, n.new_seq, n.sender_id, n.sender_name, n.kind, n.body, n.reply_to, n.client_msg_id
        FROM numbered n
        RETURNING id, room_id, seq, created_at
    ),
    advanced AS (
        UPDATE rooms r SET last_seq = n.last
        FROM (SELECT room_id, max(new_seq) AS last FROM numbered GROUP BY room_id) n
        WHERE r.id = n.room_id
    ),
    fresh AS (
        SELECT n.ord, n.sender_id, n.client_msg_id, i.id, i.room_id, i.seq, i.created_at
        FROM numbered n JOIN inserted i ON i.room_id = n.room_id AND i.seq = n.new_seq
    ),
    linked AS (
        INSERT INTO message_attachments (message_id, attachment_id, position)
        SELECT f.id, l.file, l.position
        FROM unnest(file_of_in, files_in, positions_in) AS l(file_of, file, position)
        JOIN fresh f ON f.ord = l.file_of
    )
    SELECT s.ord::INT,
        CASE
            WHEN s.refused IS NOT NULL THEN s.refused
            WHEN f.ord IS NOT NULL THEN 'new'
            WHEN coalesce(t.room_id, e.room_id) <> s.room_id THEN 'conflict'
            WHEN t.id IS NOT NULL THEN 'retry'
            ELSE 'again'
        END,
        coalesce(f.id, t.id, e.id), f.seq, f.created_at
    FROM screened s
    LEFT JOIN fresh f ON f.ord = s.ord
    LEFT JOIN stored t ON t.ord = s.ord
    LEFT JOIN fresh e ON f.ord IS NULL AND t.id IS NULL AND s.refused IS NULL
        AND e.sender_id = s.sender_id AND e.client_msg_id = s.client_msg_id;
END
$$;
