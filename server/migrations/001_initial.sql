-- Users, their one avatar, and the conversation.
CREATE TABLE users (
    id          text PRIMARY KEY CHECK (char_length(id) BETWEEN 1 AND 128),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE avatars (
    user_id     text PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    id          bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    name        text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    -- The catalogue in protocol/personas.py; tests/server/test_store.py keeps the two in step.
    personality text NOT NULL CONSTRAINT avatars_personality_known
                CHECK (personality IN ('friendly', 'playful', 'caring', 'witty',
                                       'professional', 'romantic')),
    version     bigint NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE SEQUENCE messages_id_seq;

CREATE TABLE messages (
    id          bigint PRIMARY KEY DEFAULT nextval('messages_id_seq'),
    user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role        text NOT NULL CHECK (role IN ('user', 'assistant')),
    persona     text NOT NULL,
    text        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('completed', 'cancelled', 'failed')),
    -- the chat frame's `id`, for idempotent retries (user rows only)
    client_id   text CHECK (char_length(client_id) BETWEEN 1 AND 64),
    -- on an assistant row: the user message it answers
    reply_to    bigint,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE messages_id_seq OWNED BY messages.id;

CREATE INDEX messages_user_id_id ON messages (user_id, id);
CREATE UNIQUE INDEX messages_user_client_id ON messages (user_id, client_id)
    WHERE role = 'user' AND client_id IS NOT NULL;
CREATE UNIQUE INDEX messages_reply_to ON messages (reply_to) WHERE reply_to IS NOT NULL;
