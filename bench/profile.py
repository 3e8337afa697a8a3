"""Optional profiling of the server under load with py-spy: record, then rank the hot functions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


class Profiler:
    """`py-spy record` attached to a running process, writing collapsed stacks."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self.out = out
        duration = str(max(1, round(seconds)))
        argv = [exe, "record", "--pid", str(pid), "--duration", duration, "--rate", "200"]
        argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
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
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
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


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(path).parts
    module = "/".join(parts[-2:]) if parts else path
    return f"{name} ({module})"
