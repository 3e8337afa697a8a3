"""Optional profiling of the server under load with py-spy: record, then rank the hot functions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


class Profiler:
    """`py-spy record` attached to a running process, writing collapsed stacks."""

    def __init__(self, pid: int, out: Path, seconds: float, native: bool = False) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.out = out
        duration = str(max(1, round(seconds)))
        argv = [exe, "record", "--pid", str(pid), "--duration", duration, "--rate", "200"]
        argv += ["--format", "raw", "--output", str(out)]
        argv += ["--native"] if native else ["--nonblocking"]
        self._popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self, timeout_s: float = 60.0) -> None:
        try:
            self._popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()


def top_functions(collapsed: Path, limit: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) of the functions with the most self time."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for stack, count in _samples(collapsed):
        frames = [_short(frame) for frame in stack]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return []
    return [
        (name, 100.0 * hits / total, 100.0 * inclusive[name] / total)
        for name, hits in own.most_common(limit)
    ]


def _samples(collapsed: Path) -> Iterator[tuple[list[str], int]]:
    """The stacks of py-spy's collapsed output (outermost frame first), with their counts."""
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield stack.split(";"), int(count_text)


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(path).parts
    module = "/".join(parts[-2:]) if parts else path
    return f"{name} ({module})"


AREAS = (
    ("system calls (socket read/write, epoll)", ("(libc.so", "(libpthread")),
    ("websockets", ("websockets/",)),
    ("asyncpg", ("asyncpg/", "protocol.c:", "asyncpg-")),
    ("pydantic", ("pydantic",)),
    ("prometheus-client", ("prometheus_client/",)),
    ("orjson", ("orjson",)),
    ("this server: server/", ("(server/",)),
    ("this server: protocol/", ("(protocol/", "(conversation/")),
    ("asyncio (streams, tasks, queues)", ("asyncio/", "_asynciomodule.c")),
    ("uvloop", ("uvloop/", "loop.c:", "core.c:", "libuv")),
)


def by_area(collapsed: Path) -> list[tuple[str, float]]:
    """Share of samples per area: the innermost frame that belongs to a known area decides
    (a system call at the leaf counts as a system call)."""
    counts: Counter[str] = Counter()
    total = 0
    for stack, count in _samples(collapsed):
        total += count
        counts[_area(stack)] += count
    if not total:
        return []
    return [(area, 100.0 * hits / total) for area, hits in counts.most_common()]


def _area(frames: list[str]) -> str:
    leaf = frames[-1]
    if any(mark in leaf for mark in AREAS[0][1]):
        return AREAS[0][0]
    for frame in reversed(frames):
        for area, marks in AREAS[1:]:
            if any(mark in frame for mark in marks):
                return area
    return "other (interpreter, gc, ...)"
