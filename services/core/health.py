"""Readiness of a running service, for the local stack's process manager and for people: a service marks
itself ready (consumers joined, clients connected) by writing ``<home>/run/<name>.ready`` and clears it when
it stops."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from services.core.settings import Settings


def ready_file(settings: Settings, name: str) -> Path:
    return settings.run_dir / f"{name}.ready"


def mark_ready(settings: Settings, name: str, **details: object) -> None:
    path = ready_file(settings, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "since": time.time(), **details}, default=str))
    tmp.replace(path)


def clear_ready(settings: Settings, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        ready_file(settings, name).unlink()


def is_ready(settings: Settings, name: str, pid: int | None = None) -> bool:
    """True when the service wrote its ready file (and, given ``pid``, it is that process's)."""
    try:
        data = json.loads(ready_file(settings, name).read_text())
    except (OSError, ValueError):
        return False
    return pid is None or data.get("pid") == pid
