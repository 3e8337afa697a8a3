"""The baseline: a bare websockets echo server, compression off, on uvloop when it is installed."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import ServerConnection, serve


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


async def serve_echo(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT; print the URL once listening."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(echo, host, port, compression=None, max_size=None) as server:
        bound = next(iter(server.sockets)).getsockname()[1]
        print(f"echo server listening on ws://{host}:{bound}/ws", flush=True)
        await stop.wait()


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """uvloop when installed; kept here so that the echo process imports nothing of the server."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    run_async(serve_echo(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
