-- Search plans follow how common a word is (each query is planned for its own words:
-- store/search.rs). Postgres estimates a word it has no statistics for at half the
-- frequency of the rarest word it kept; with the default target that is about 0.5% of
-- all messages, so a word in a few dozen messages was planned as a common one (walk the
-- newest messages until the page is full) and read the whole table. Keeping ten times
-- as many words makes a rare word's estimate rare.
ALTER TABLE messages ALTER COLUMN search SET STATISTICS 1000;
