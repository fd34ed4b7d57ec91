"""Crashing and watching the local stack's processes in integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from services.stack.process import ProcessManager

T = TypeVar("T")


def sigkill(manager: ProcessManager, name: str) -> int:
    """SIGKILL a running part (its whole process group, no chance to flush or commit) and reap it; returns
    its pid. The run file stays: ``ProcessManager.start`` (``start_services``) clears it on restart."""
    pid = manager.running_pid(name)
    if pid is None:
        raise AssertionError(f"{name} is not running; last lines of its log:\n{tail(manager.log_file(name))}")
    os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # our child when this process started it: reap it
        os.waitpid(pid, 0)
    return pid


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class LogWatch:
    """What a part's log says from now on (the log file is appended across restarts and test modules)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        if not self.path.exists():
            return ""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    async def wait_for(self, pattern: str, timeout_s: float, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``pattern`` (a regex, multi-line) has matched ``count`` times; returns the matches."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = list(re.finditer(pattern, self.text(), re.MULTILINE))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.path.name}: {pattern!r} not seen {count}x within {timeout_s:.0f}s; "
                    f"last lines:\n{tail(self.path)}"
                )
            await asyncio.sleep(0.1)


async def wait_until(check: Callable[[], T], what: str, timeout_s: float = 60.0, interval_s: float = 0.25) -> T:
    """Poll ``check()`` (blocking, cheap) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(interval_s)
