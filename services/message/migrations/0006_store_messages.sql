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
-- whole: so every table is reached through its indexes, by nested loops, probing per
-- send (no table read once and kept: on an empty table that looks cheapest).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_material = off
AS $$
#variable_conflict use_column
BEGIN
    -- Rooms are locked in id order, so concurrent batches never deadlock. Under READ
    -- COMMITTED the statement below takes its snapshot after the locks are granted: it
    -- sees every earlier batch of these rooms, their seqs and their idempotency keys.
    PERFORM 1 FROM rooms r WHERE r.id = ANY (rooms_in) ORDER BY r.id FOR UPDATE;
    -- No join between the batch's own rows: a batch is up to 256 sends, and a nested
    -- loop between two of its sets would cost 65,536 steps. Each step below is a scan of
    -- the previous one, a window over it, or a probe of a table's index per send.
    RETURN QUERY
    WITH screened AS (
        SELECT q.ord, q.room_id, q.sender_id, q.sender_name, q.kind, q.body, q.reply_to, q.client_msg_id,
            r.last_seq, t.id AS stored_id, t.room_id AS stored_room,
            -- Joins, not EXISTS subqueries: Postgres may answer an EXISTS by hashing the
            -- whole table it names (every member of the room); a join probes the key.
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
        LEFT JOIN messages t ON t.sender_id = q.sender_id AND t.client_msg_id = q.client_msg_id
    ),
    -- A send stores a new message unless refused, already stored, or a later send of a
    -- key an earlier send of the batch stores.
    ranked AS (
        SELECT s.*,
            s.refused IS NULL AND s.stored_id IS NULL AND (s.client_msg_id IS NULL OR row_number() OVER (
                PARTITION BY s.sender_id, s.client_msg_id, s.refused IS NULL ORDER BY s.ord) = 1) AS fresh
        FROM screened s
    ),
    -- The new messages' seqs, per room in arrival order, and ids, taken from the column's
    -- own sequence so that nothing needs to join the inserted rows back to the sends.
    numbered AS (
        SELECT r.*,
            CASE WHEN r.fresh THEN r.last_seq + row_number() OVER (
                PARTITION BY r.room_id, r.fresh ORDER BY r.ord) END AS new_seq,
            CASE WHEN r.fresh THEN nextval('messages_id_seq') END AS new_id
        FROM ranked r
    ),
    inserted AS (
        INSERT INTO messages (id, room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id)
        OVERRIDING SYSTEM VALUE
        SELECT n.new_id, n.room_id, n.new_seq, n.sender_id, n.sender_name, n.kind, n.body, n.reply_to,
            n.client_msg_id
        FROM numbered n WHERE n.fresh
    ),
    advanced AS (
        UPDATE rooms r SET last_seq = n.last
        FROM (SELECT room_id, max(new_seq) AS last FROM numbered WHERE fresh GROUP BY room_id) n
        WHERE r.id = n.room_id
    ),
    linked AS (
        INSERT INTO message_attachments (message_id, attachment_id, position)
        SELECT n.new_id, l.file, l.position
        FROM unnest(file_of_in, files_in, positions_in) AS l(file_of, file, position)
        JOIN numbered n ON n.ord = l.file_of
        WHERE n.fresh
    ),
    -- A later send of a key is answered with the message its first send stores.
    answered AS (
        SELECT n.*,
            first_value(n.new_id) OVER key_order AS first_id,
            first_value(n.room_id) OVER key_order AS first_room
        FROM numbered n
        WINDOW key_order AS (PARTITION BY n.sender_id, n.client_msg_id, n.refused IS NULL ORDER BY n.ord)
    )
    SELECT a.ord::INT,
        CASE
            WHEN a.refused IS NOT NULL THEN a.refused
            WHEN a.fresh THEN 'new'
            WHEN coalesce(a.stored_room, a.first_room) <> a.room_id THEN 'conflict'
            WHEN a.stored_id IS NOT NULL THEN 'retry'
            ELSE 'again'
        END,
        coalesce(a.new_id, a.stored_id, a.first_id), a.new_seq, CASE WHEN a.fresh THEN now() END
    FROM answered a;
END
$$;
