"""`run.py` as a subprocess, for tests that need real server processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNER = re.compile(r"listening on (ws://127\.0\.0\.1:(\d+)/ws)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the server's own settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_") and k != "DATABASE_URL"}
    env["PYTHONUNBUFFERED"] = "1"
    env["CHAT_API_PORT"] = "0"  # the HTTP API is off unless a test turns it on
    env.update(extra)
    return env


async def run_py(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `run.py ARGS` to completion; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env or clean_env(), cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Served:
    """A `run.py serve` subprocess and the URL it printed."""

    def __init__(self, process: asyncio.subprocess.Process, url: str, banner: str) -> None:
        self.process = process
        self.url = url
        self.banner = banner
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout)


async def serve(*args: str, log_path: Path, env: dict[str, str] | None = None) -> Served:
    """Start `run.py serve --port 0 ARGS` and wait for its banner; stderr goes to `log_path`."""
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "run.py"), "serve", "--port", "0", *args,
            stdout=asyncio.subprocess.PIPE, stderr=log, env=env or clean_env(), cwd=ROOT,
        )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(60):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "run.py exited before its banner:\n" + log_path.read_text()[-3000:]
            lines.append(line)
            match = BANNER.search(line)
            if match:
                break
        lines += [(await process.stdout.readline()).decode() for _ in range(4)]
    return Served(process, match.group(1), "".join(lines))
