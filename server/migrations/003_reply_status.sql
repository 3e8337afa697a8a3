-- A reply records how it ended: completed, cancelled (the user's cancel), interrupted (the
-- connection or the server went away while it was generated) or failed (the reply generator
-- failed; `error_code` says how, as in the error frame the client got). A failed reply is no
-- longer an empty message in the history.
ALTER TABLE messages DROP CONSTRAINT messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check
    CHECK (status IN ('completed', 'cancelled', 'interrupted', 'failed'));
ALTER TABLE messages ADD COLUMN error_code text
    CHECK (char_length(error_code) BETWEEN 1 AND 64);
