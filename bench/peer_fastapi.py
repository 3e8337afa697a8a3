"""The peer of issue 18: the same protocol written the obvious way on FastAPI, uvicorn, asyncpg.

hello (an HS256 JWT), create_avatar, get_avatar, set_persona, chat and ping. Each chat is one
transaction that inserts the user message and the reply, then the reply is sent. The avatar is
cached per session and cleared on a switch. Its tables carry a `peer_` prefix, so that it can
share this server's PostgreSQL. `python -m bench.peer_fastapi --database-url URL --port 0`.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import jwt
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

PERSONAS = ("friendly", "playful", "caring", "witty", "professional", "romantic")
SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_users (id text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS peer_avatars (
    user_id text PRIMARY KEY REFERENCES peer_users (id), name text NOT NULL,
    personality text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS peer_messages (
    id bigserial PRIMARY KEY, user_id text NOT NULL REFERENCES peer_users (id),
    role text NOT NULL, persona text NOT NULL, text text NOT NULL, client_id text,
    created_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS peer_messages_user_id ON peer_messages (user_id, id);
"""
INSERT = "INSERT INTO peer_messages (user_id, role, persona, text, client_id) VALUES ($1, $2, $3, $4, $5) RETURNING id"  # noqa: E501
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> Any:
    state["pool"] = pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], max_size=10)
    await pool.execute(SCHEMA)
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


def error(ref: Any, code: str, status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "ref": ref, "code": code, "status": status, "message": message}


def reply_text(persona: str, text: str) -> str:
    return f"As your {persona} companion: you said '{text}'. Tell me more about it!"


@app.websocket("/ws")
async def chat_socket(ws: WebSocket) -> None:
    await ws.accept()
    pool: asyncpg.Pool = state["pool"]
    hello = await ws.receive_json()
    try:
        user = str(jwt.decode(hello["token"], os.environ["CHAT_JWT_SECRET"], ["HS256"])["sub"])
    except (KeyError, jwt.InvalidTokenError):
        await ws.close(4401, "not authenticated")
        return
    await pool.execute("INSERT INTO peer_users VALUES ($1) ON CONFLICT DO NOTHING", user)
    avatar = await pool.fetchrow("SELECT * FROM peer_avatars WHERE user_id = $1", user)
    cache = [dict(avatar) if avatar else None]  # the session's avatar, None: read it again
    welcome = {"type": "welcome", "ref": hello.get("id"), "session_id": uuid.uuid4().hex,
               "user_id": user, "avatar": _public(cache[0]), "personas": list(PERSONAS),
               "protocol": 1}  # fmt: skip
    await ws.send_json(welcome)
    try:
        while True:
            await ws.send_json(await answer(pool, user, await ws.receive_json(), cache))
    except WebSocketDisconnect:
        return


async def answer(
    pool: asyncpg.Pool, user: str, frame: dict[str, Any], cache: list[dict[str, Any] | None]
) -> dict[str, Any]:
    kind, ref = frame.get("type"), frame.get("id")
    if kind == "ping":
        return {"type": "pong", "ref": ref}
    if kind == "create_avatar":
        if frame.get("personality") not in PERSONAS:
            return error(ref, "invalid_persona", 422, "unknown personality")
        row = await pool.fetchrow(
            "INSERT INTO peer_avatars (user_id, name, personality) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING *", user, frame.get("name"), frame["personality"]
        )  # fmt: skip
        if row is None:
            return error(ref, "avatar_exists", 409, "you already have an avatar")
        cache[0] = dict(row)
        return {"type": "avatar", "ref": ref, "avatar": _public(cache[0])}
    if cache[0] is None:
        row = await pool.fetchrow("SELECT * FROM peer_avatars WHERE user_id = $1", user)
        cache[0] = dict(row) if row else None
    if cache[0] is None:
        return error(ref, "no_avatar", 404, "create an avatar first")
    if kind == "get_avatar":
        return {"type": "avatar", "ref": ref, "avatar": _public(cache[0])}
    if kind == "set_persona":
        if frame.get("personality") not in PERSONAS:
            return error(ref, "invalid_persona", 422, "unknown personality")
        previous = cache[0]["personality"]
        await pool.execute(
            "UPDATE peer_avatars SET personality = $2, updated_at = now() WHERE user_id = $1",
            user, frame["personality"],
        )  # fmt: skip
        cache[0] = None  # the next chat reads the avatar again
        return {"type": "persona_set", "ref": ref, "personality": frame["personality"],
                "previous": previous}  # fmt: skip
    if kind == "chat" and isinstance(frame.get("text"), str):
        persona, text = cache[0]["personality"], frame["text"]
        reply = reply_text(persona, text)
        async with pool.acquire() as conn, conn.transaction():
            message_id = await conn.fetchval(INSERT, user, "user", persona, text, ref)
            reply_id = await conn.fetchval(INSERT, user, "assistant", persona, reply, None)
        return {"type": "reply", "ref": ref, "reply_id": reply_id, "message_id": message_id,
                "persona": persona, "text": reply, "status": "completed"}  # fmt: skip
    return error(ref, "invalid_frame", 422, f"unknown frame {kind!r}")


def _public(avatar: dict[str, Any] | None) -> dict[str, Any] | None:
    if avatar is None:
        return None
    return {"name": avatar["name"], "personality": avatar["personality"],
            "updated_at": avatar["updated_at"].isoformat()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_fastapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = args.database_url
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)  # connections wait in the backlog until uvicorn serves
    config = uvicorn.Config(app, loop="uvloop", log_level="warning", ws_max_queue=32)
    server = uvicorn.Server(config)
    print(f"peer listening on ws://{args.host}:{sock.getsockname()[1]}/ws", flush=True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
