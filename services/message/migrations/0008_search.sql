-- Full-text search over the current text of messages.
--
-- The 'simple' configuration lower-cases and splits on non-letters, with no stemming
-- and no stop words: rooms mix languages, and one language's stemmer mangles the others'
-- words (English stemming would fold a German "wurde" to nothing useful, and drop "die"
-- as an English stop word). Whole words and phrases match in every language that puts
-- spaces between words; scripts that do not (Chinese, Japanese) match only on whole
-- runs of characters between punctuation: documented in docs/protocol.md.
--
-- Expand-only (docs/deploy.md): a new column and index, which the previous release
-- neither reads nor writes. The column is generated from `body`, so an edit re-indexes
-- the message in the same UPDATE and a delete (which keeps `body` but sets deleted_at)
-- is excluded by the query, never by a second write.
ALTER TABLE messages
    ADD COLUMN search tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(body, ''))) STORED;

CREATE INDEX messages_search ON messages USING GIN (search);
