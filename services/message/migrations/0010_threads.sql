-- Threads: each message's reply count and the time of its newest reply, kept by a
-- trigger in the transaction that stores the reply, whichever path stores it (the group
-- commit's functions, a single send). A retried send inserts nothing and counts nothing.
-- Deleted replies stay counted: a thread shows them as deleted, like history.
--
-- Expand-only (docs/deploy.md): new columns with constant defaults (no table rewrite),
-- a trigger the previous release's inserts fire too (keeping the counts right while it
-- still runs), and an index.
ALTER TABLE messages
    ADD COLUMN reply_count INT NOT NULL DEFAULT 0,
    ADD COLUMN last_reply_at TIMESTAMPTZ;

CREATE FUNCTION count_reply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE messages
    SET reply_count = reply_count + 1, last_reply_at = GREATEST(last_reply_at, NEW.created_at)
    WHERE id = NEW.reply_to;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_count_reply AFTER INSERT ON messages
    FOR EACH ROW WHEN (NEW.reply_to IS NOT NULL) EXECUTE FUNCTION count_reply();

-- A thread's replies in seq order.
CREATE INDEX messages_replies ON messages (reply_to, seq) WHERE reply_to IS NOT NULL;
