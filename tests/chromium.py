"""Debian's Chromium for the web page test, installed with apt-get when it is missing and this
process may do so (root, with apt-get): the README's test line then passes on a fresh machine.
The test never downloads a browser of its own, and never skips."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_TIMEOUT_S = 1800
COMMANDS = (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"])
# why Chromium is missing after the attempt to install it (for the page test to fail with)
PROBLEM = pytest.StashKey[str | None]()
PAGE_TEST = "test_web_page.py"
MANUAL = "install Debian's package as root: apt-get update && apt-get install -y chromium"


def ensure_chromium(
    say: Callable[[str], None],
    chromium: Path = CHROMIUM,
    is_root: bool | None = None,
    env: dict[str, str] | None = None,
) -> str | None:
    """None when `chromium` is there, installed now if it was missing; else why it is not
    (for the page test to fail with). Says each command it runs."""
    if chromium.exists():
        return None
    if not (os.geteuid() == 0 if is_root is None else is_root):
        return f"{chromium} is missing and this is not root, so it was not installed: {MANUAL}"
    env = {**(os.environ if env is None else env), "DEBIAN_FRONTEND": "noninteractive"}
    if shutil.which("apt-get", path=env.get("PATH")) is None:
        return f"{chromium} is missing and there is no apt-get to install it with: {MANUAL}"
    say(f"{chromium} is missing: installing Debian's chromium for the web page test")
    for command in COMMANDS:
        say("+ " + " ".join(command))
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took over {INSTALL_TIMEOUT_S} s: {MANUAL}"
        if done.returncode != 0:
            said = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            return f"{' '.join(command)} failed with {done.returncode} ({said}): {MANUAL}"
    if not chromium.exists():
        return f"apt-get installed chromium, but {chromium} is still missing: {MANUAL}"
    say(f"installed {chromium}")
    return None


def install_for_page_test(config: pytest.Config, items: list[pytest.Item]) -> None:
    """When the page test is among the collected tests, install Chromium if it is missing
    (before any test runs, so that no test's timeout covers it), saying so on the terminal."""
    if not any(item.path.name == PAGE_TEST for item in items):
        return
    capture = config.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        if capture is None:
            print(line, flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(line, flush=True)

    config.stash[PROBLEM] = ensure_chromium(say)
