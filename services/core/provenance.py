"""Which code produced an artifact: recorded with every dataset snapshot and model version (lineage)."""

from __future__ import annotations

import functools
import subprocess

from services.core.settings import REPO_ROOT


@functools.cache
def code_version() -> str:
    """``git describe`` of the checkout (``-dirty`` when the tree had changes), else the installed package's
    version. Read once per process: the code does not change under a running service."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        if out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "slm-flywheel " + version("slm-flywheel")
    except PackageNotFoundError:
        return "unknown"
