-- Attachments: metadata here, bytes behind the blob store (attachment_blobs for the
-- Postgres store), and which messages carry which attachments.
CREATE TABLE attachments (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uploader_id   TEXT NOT NULL,
    name          TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    size          BIGINT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE attachment_blobs (
    attachment_id  BIGINT PRIMARY KEY REFERENCES attachments (id) ON DELETE CASCADE,
    data           BYTEA NOT NULL
);

CREATE TABLE message_attachments (
    message_id     BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    attachment_id  BIGINT NOT NULL REFERENCES attachments (id),
    position       INT NOT NULL,
    PRIMARY KEY (message_id, attachment_id)
);

CREATE INDEX message_attachments_by_attachment ON message_attachments (attachment_id);
