-- Rooms, their members and their messages.

CREATE TABLE rooms (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('group', 'direct', 'support')),
    name        TEXT,
    created_by  TEXT NOT NULL,
    -- For direct rooms: both user ids, sorted and joined, so asking again finds the same room.
    direct_key  TEXT UNIQUE,
    -- The seq of the newest message; the next message takes last_seq + 1 in the same
    -- transaction that inserts it, so seqs are gapless and the row lock orders writers.
    last_seq    BIGINT NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE room_members (
    room_id    BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('owner', 'member')),
    -- Highest seq the user has read; unread = messages by others above it.
    read_seq   BIGINT NOT NULL DEFAULT 0,
    joined_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (room_id, user_id)
);

CREATE INDEX room_members_by_user ON room_members (user_id);

CREATE TABLE messages (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id        BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq            BIGINT NOT NULL,
    sender_id      TEXT NOT NULL,
    sender_name    TEXT,
    kind           TEXT NOT NULL DEFAULT 'text' CHECK (kind IN ('text', 'image', 'file')),
    body           TEXT,
    reply_to       BIGINT REFERENCES messages (id),
    client_msg_id  TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    edited_at      TIMESTAMPTZ,
    deleted_at     TIMESTAMPTZ,
    CONSTRAINT messages_room_seq_key UNIQUE (room_id, seq),
    -- Retries carry the same client_msg_id; NULLs (no id given) never collide.
    CONSTRAINT messages_sender_client_msg_id_key UNIQUE (sender_id, client_msg_id)
);
