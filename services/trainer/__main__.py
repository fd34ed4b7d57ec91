"""``python -m services.trainer``: the trainer service.

glibc's malloc settings must be in the environment before the process starts (they are read once, at the
first allocation), so a trainer started without them re-executes itself with them: without them glibc
returns memory to the OS after every training step, which made training about 12x slower on this machine.
"""

from __future__ import annotations

import os
import sys

from services.trainer.train import MALLOC_ENV

if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and not os.environ.get("FLYWHEEL_TRAINER_REEXEC"):
    env = {**os.environ, **MALLOC_ENV, "FLYWHEEL_TRAINER_REEXEC": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "services.trainer", *sys.argv[1:]], env)  # noqa: S606

from services.trainer.service import main

main()
