-- A batch of one in one statement. At ordinary load every batch is a batch of one, and
-- for it `store_messages` (0006) is mostly machinery for batches: a separate locking
-- statement, then window functions over a one-row set. Postgres spent 488–634 µs of CPU on
-- such a call at 200 calls/s, against 338–409 µs for the single statement below and
-- 219–244 µs for a bare INSERT (`pgbench -M prepared -R 200`, docs/benchmarks.md).
--
-- The batch function keeps its body under a new name, and `store_messages` (same
-- arguments, same answer) first tries the common case: one send with no attachments that
-- is stored. Its one statement locks the room by updating it, and stores only when every
-- check passes, so it can only ever answer `new`. Anything else (refused, a retry, a
-- conflict), and every larger batch, goes to the batch function, which tells which. A
-- message service that predates this runs unchanged: the name and the contract are the
-- same.
--
-- Why it is safe without the separate lock: the checks below read the statement's
-- snapshot, taken before the room's row lock is granted. `last_seq + 1` is computed on the
-- row as locked (READ COMMITTED re-reads it), so seqs stay gapless. A membership or reply
-- committed while waiting is not seen, and the send goes to the batch function, which
-- decides under the lock. The same (sender, client_msg_id) stored meanwhile by a batch of
-- another room fails this statement on the unique key; the caller retries, and the batch
-- function answers `retry`.
ALTER FUNCTION store_messages(BIGINT[], TEXT[], BOOLEAN[], TEXT[], TEXT[], TEXT[], BIGINT[], TEXT[], INT[], BIGINT[], INT[])
    RENAME TO store_message_batch;

CREATE FUNCTION store_messages(
    rooms_in BIGINT[], senders_in TEXT[], admins_in BOOLEAN[], names_in TEXT[], kinds_in TEXT[],
    bodies_in TEXT[], replies_in BIGINT[], client_ids_in TEXT[],
    file_of_in INT[], files_in BIGINT[], positions_in INT[]
) RETURNS TABLE (ord INT, outcome TEXT, id BIGINT, seq BIGINT, created_at TIMESTAMPTZ)
LANGUAGE plpgsql
-- As for the batch function (0006): one plan per connection, through the indexes.
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
    IF cardinality(rooms_in) = 1 AND cardinality(files_in) = 0 THEN
        RETURN QUERY
        WITH room AS (
            UPDATE rooms r SET last_seq = r.last_seq + 1
            WHERE r.id = rooms_in[1]
                AND (EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = r.id AND m.user_id = senders_in[1])
                    OR (r.kind = 'support' AND admins_in[1]))
                AND (replies_in[1] IS NULL
                    OR EXISTS (SELECT 1 FROM messages p WHERE p.id = replies_in[1] AND p.room_id = r.id))
                AND (client_ids_in[1] IS NULL
                    OR NOT EXISTS (SELECT 1 FROM messages t
                        WHERE t.sender_id = senders_in[1] AND t.client_msg_id = client_ids_in[1]))
            RETURNING r.id, r.last_seq
        ),
        stored AS (
            INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id)
            SELECT room.id, room.last_seq, senders_in[1], names_in[1], kinds_in[1], bodies_in[1], replies_in[1],
                client_ids_in[1]
            FROM room
            RETURNING messages.id, messages.seq, messages.created_at
        )
        SELECT 1, 'new', s.id, s.seq, s.created_at FROM stored s;
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT * FROM store_message_batch(rooms_in, senders_in, admins_in, names_in, kinds_in, bodies_in,
        replies_in, client_ids_in, file_of_in, files_in, positions_in);
END
$$;
