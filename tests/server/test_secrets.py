"""No secret in the logs: a full session at DEBUG level, grepped for tokens and the LLM key."""

from __future__ import annotations

import time
from pathlib import Path

import jwt

from server.auth import mint_token
from tests.client import Client
from tests.conftest import SECRET
from tests.processes import clean_env, serve
from tests.server.fake_llm import FakeLLM, Script

LLM_KEY = "sk-test-" + "k3y" * 12


async def test_logs_of_a_full_session_hold_no_token_and_no_key(
    database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    good = mint_token(SECRET, "secret-keeper", ttl_s=600)
    expired = mint_token(SECRET, "secret-keeper", ttl_s=-60)
    forged = jwt.encode({"sub": "secret-keeper", "iat": int(time.time())}, "x" * 64)
    async with FakeLLM() as fake:
        env = clean_env(
            DATABASE_URL=database_url,
            CHAT_JWT_SECRET=SECRET,
            CHAT_LLM_API_KEY=LLM_KEY,
            CHAT_LOG_LEVEL="DEBUG",
        )
        served = await serve(
            "--generator", "openai", "--llm-base-url", fake.url, log_path=log_path, env=env
        )
        try:
            for token in (expired, forged, "garbage." + good[8:]):
                async with Client(served.url) as refused:
                    await refused.send({"type": "hello", "token": token})
                    await refused.conn.wait_closed()
                    assert refused.conn.close_code == 4401
            async with Client(served.url) as client:
                await client.hello(good)
                if client.welcome["avatar"] is None:
                    await client.request(
                        {"type": "create_avatar", "name": "Vault", "personality": "witty"}
                    )
                assert (await client.request({"type": "chat", "text": "hi"}))["type"] == "reply"
                fake.script = Script(status=401, error_message=f"bad key {LLM_KEY}")
                failed = await client.request({"type": "chat", "text": "again"})
                assert failed["code"] == "unavailable" and LLM_KEY not in failed["message"]
        finally:
            assert await served.stop() == 0
    logs = log_path.read_text()
    assert "session" in logs and "DEBUG" in logs  # the log really covers the session
    for secret in (good, expired, forged, LLM_KEY, SECRET, good.split(".")[2]):
        assert secret not in logs
