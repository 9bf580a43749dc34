-- Webhooks for offline members, through a transactional outbox.
--
-- A stored message gets an outbox row in the same transaction, by trigger, whichever
-- path stored it: a crash can neither lose nor invent one. The trigger fires only in
-- sessions of a message service configured with WEBHOOK_URL (it sets chat.webhooks on
-- its connections), so without webhooks a send costs nothing more. Dispatchers in every
-- replica then claim outbox rows (FOR UPDATE SKIP LOCKED), turn each into one delivery
-- per member who was offline, and send those with retries.
CREATE TABLE webhook_outbox (
    message_id  BIGINT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION queue_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (message_id) VALUES (NEW.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_queue_webhook AFTER INSERT ON messages
    FOR EACH ROW WHEN (current_setting('chat.webhooks', true) = 'on') EXECUTE FUNCTION queue_webhook();

-- One delivery: one offline member, one message. The body is stored as sent, so every
-- retry signs the same bytes under the same webhook-id.
CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    message_id       BIGINT NOT NULL,
    room_id          BIGINT NOT NULL,
    seq              BIGINT NOT NULL,
    user_id          TEXT NOT NULL,
    body             TEXT NOT NULL,
    -- 'pending' until a 2xx (then the row is deleted), 'dead' once retries ran out.
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts         INT NOT NULL DEFAULT 0,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    retry_until      TIMESTAMPTZ NOT NULL,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A dispatcher sending it; another may take it over once this passes.
    leased_until     TIMESTAMPTZ,
    UNIQUE (message_id, user_id)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
-- Per member and room, in seq order: a later one waits while an earlier one is pending.
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (user_id, room_id, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_dead ON webhook_deliveries (created_at) WHERE state = 'dead';
