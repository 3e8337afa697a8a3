-- Every message insert took a FOR KEY SHARE lock on its user's row to check this foreign key.
-- Users are created at their first hello, before any message, and the server never deletes
-- one, so the check bought nothing on the hottest write path.
ALTER TABLE messages DROP CONSTRAINT messages_user_id_fkey;
