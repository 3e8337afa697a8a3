"""The text of the store's longer statements: the group commits of switches and of turns."""

AVATAR_COLUMNS = "id, user_id, name, personality, version, created_at, updated_at"

# Switches of many sessions in one statement. A user's avatar row is updated once per statement,
# to its last switch in it, and rows are locked in user order, so that two processes' statements
# cannot deadlock. Each switch still gets its own result (the personality it replaced, the
# version it made) and its own notification, delivered on commit, so that every process can
# tell the user's other connections. A switch to a persona that is not in the catalogue, or is
# disabled, is written nowhere and comes back `refused` (it was valid when the session checked
# its copy of the catalogue, and an edit landed meanwhile).
SET_PERSONAS = """
WITH asked AS MATERIALIZED (
    SELECT w.ord, w.user_id, w.personality,
           EXISTS (SELECT 1 FROM personas p WHERE p.id = w.personality AND p.enabled) AS allowed
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(user_id, personality, ord)
),
wanted AS MATERIALIZED (
    SELECT w.ord, w.user_id, w.personality,
           row_number() OVER mine AS k,
           count(*) OVER (PARTITION BY w.user_id) AS n,
           lag(w.personality) OVER mine AS before
    FROM asked w WHERE w.allowed
    WINDOW mine AS (PARTITION BY w.user_id ORDER BY w.ord)
),
old AS MATERIALIZED (
    SELECT a.user_id, a.personality FROM avatars a
    WHERE a.user_id IN (SELECT user_id FROM wanted)
    ORDER BY a.user_id FOR UPDATE OF a
),
changed AS (
    UPDATE avatars a SET personality = w.personality, version = a.version + w.n,
                         updated_at = now()
    FROM wanted w JOIN old USING (user_id)
    WHERE a.user_id = w.user_id AND w.k = w.n
    RETURNING a.id, a.user_id, a.name, a.version, a.created_at, a.updated_at
),
switched AS MATERIALIZED (
    SELECT w.ord, c.id, c.user_id, c.name, w.personality, c.version - w.n + w.k AS version,
           c.created_at, c.updated_at, coalesce(w.before, o.personality) AS previous,
           w.k = w.n AS newest
    FROM wanted w JOIN changed c USING (user_id) JOIN old o USING (user_id)
)
SELECT s.*, pg_notify('persona_changed', json_build_object(
    'user_id', s.user_id, 'personality', s.personality, 'previous', s.previous,
    'version', s.version, 'origin', $3::text)::text), false AS refused
FROM switched s
UNION ALL
SELECT a.ord, NULL, a.user_id, NULL, a.personality, NULL, NULL, NULL, NULL, NULL, NULL, true
FROM asked a WHERE NOT a.allowed
ORDER BY ord
"""

# A batch of turns: each chat and its reply, two rows, in one statement. `$1` is one JSON array
# (asyncpg would encode eight arrays element by element).
TURNS = """
WITH turns AS MATERIALIZED (
    SELECT t.ord, t.user_id, t.persona, t.user_text, t.reply_text, t.status, t.error_code,
           t.client_id, coalesce(t.message_id, nextval('messages_id_seq')) AS message_id,
           coalesce(t.reply_id, nextval('messages_id_seq')) AS reply_id
    FROM ROWS FROM (json_to_recordset($1::json)
                    AS (user_id text, persona text, user_text text, reply_text text, status text,
                        error_code text, client_id text, message_id bigint, reply_id bigint))
         WITH ORDINALITY
         AS t(user_id, persona, user_text, reply_text, status, error_code, client_id, message_id,
              reply_id, ord)
)"""

# The usual case: no chat of the batch is stored yet, so both rows of every turn go in with one
# INSERT. `ON CONFLICT` would cost PostgreSQL about a quarter of its time per turn (a
# speculative insertion into each unique index), so a conflict fails the statement instead, and
# the batch is written again with `COMMIT_TURNS_SKIPPING`.
COMMIT_TURNS = (
    TURNS
    + """,
rows AS (
    INSERT INTO messages (id, user_id, role, persona, text, status, error_code, client_id,
                          reply_to)
    SELECT m.* FROM turns t CROSS JOIN LATERAL (VALUES
        (t.message_id, t.user_id, 'user', t.persona, t.user_text, 'completed', NULL,
         t.client_id, NULL::bigint),
        (t.reply_id, t.user_id, 'assistant', t.persona, t.reply_text, t.status, t.error_code,
         NULL, t.message_id)) AS m
)
SELECT t.ord, t.message_id, t.reply_id, true AS inserted FROM turns t ORDER BY t.ord
"""
)

# A batch with a chat already stored (its client id retried on another connection, or in another
# process, at the same moment): the stored one is kept and reported as not inserted.
COMMIT_TURNS_SKIPPING = (
    TURNS
    + """,
user_rows AS (
    INSERT INTO messages (id, user_id, role, persona, text, status, client_id)
    SELECT message_id, user_id, 'user', persona, user_text, 'completed', client_id FROM turns
    ON CONFLICT DO NOTHING
    RETURNING id
),
reply_rows AS (
    INSERT INTO messages (id, user_id, role, persona, text, status, error_code, reply_to)
    SELECT reply_id, user_id, 'assistant', persona, reply_text, status, error_code, message_id
    FROM turns
    WHERE message_id IN (SELECT id FROM user_rows)
    RETURNING reply_to
)
SELECT t.ord, t.message_id, t.reply_id, (r.reply_to IS NOT NULL) AS inserted
FROM turns t LEFT JOIN reply_rows r ON r.reply_to = t.message_id
ORDER BY t.ord
"""
)
