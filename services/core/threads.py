"""Thread counts for the CPU-heavy processes (the Triton student, the trainer) on a small shared machine.

Measured on 2 cores (``benchmarks/bench_contention.py``): torch's OpenMP threads spin at their barriers, so a
process running 2 threads while another process keeps one core busy collapses (serving 11.4 -> 2.5 answers/s,
training 3.6 -> 1.2 examples/s), far below what one thread does on the free core (7.4 / 2.1). Passive waiting
(``OMP_WAIT_POLICY=PASSIVE``) avoids the collapse but costs a third of the speed alone.

``AdaptiveThreads`` instead looks, between units of work (a batch, a training step), at how much CPU the rest of
the machine used since the last look (``/proc/stat`` minus this process's own time) and uses the cores left
free: all of them when alone, fewer beside a busy neighbour. A setting of ``auto`` (the default) does this;
a number fixes the count.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def parse_threads(value: str | int | None, name: str) -> int | None:
    """``auto`` / empty / None -> None (adaptive); a positive integer -> that count. Names the setting on error."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is neither 'auto' nor a number of threads") from None
    if count < 1:
        raise ValueError(f"{name}: {count} threads; use 'auto' or a number >= 1")
    return count


def _machine_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, or None without /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


NEIGHBOUR_CORE = 0.6  # a neighbour takes a core once it keeps more than this much of one busy


def free_cores(others_busy_cores: float, cores: int) -> int:
    """Cores left for us when the rest of the machine keeps ``others_busy_cores`` busy (pure; at least one).
    A neighbour counts once it uses more than ``NEIGHBOUR_CORE`` of a core: the serving path's own helpers
    (Triton's server threads, the gRPC client) use about a third of one, and treating them as a neighbour
    halved the student's threads (p95 at concurrency 1: 255-270 ms instead of 195-213, measured)."""
    return max(1, cores - int(others_busy_cores + 1 - NEIGHBOUR_CORE))


class AdaptiveThreads:
    """Sets torch's thread count to the cores the rest of the machine leaves free (or a fixed count)."""

    def __init__(self, fixed: int | None = None, cores: int | None = None, interval_s: float = 1.0) -> None:
        import torch

        self.torch = torch
        self.cores = max(1, cores or os.cpu_count() or 1)
        self.fixed = fixed
        self.interval_s = interval_s
        self.current = fixed or self.cores
        torch.set_num_threads(self.current)
        self._last = self._sample()
        self._last_at = time.monotonic()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        machine = _machine_busy()
        if machine is None:
            return None
        own = sum(os.times()[:2])  # this process's user + system CPU seconds, every thread
        return machine[0], machine[1], own

    def update(self) -> int:
        """Look again (at most every ``interval_s``) and apply; returns the thread count in use."""
        if self.fixed is not None or self._last is None:
            return self.current
        now = time.monotonic()
        if now - self._last_at < self.interval_s:
            return self.current
        sample = self._sample()
        if sample is None:
            return self.current
        busy = sample[0] - self._last[0]
        total = sample[1] - self._last[1]
        own = sample[2] - self._last[2]
        self._last, self._last_at = sample, now
        if total <= 0:
            return self.current
        others = max(0.0, busy - own) / total * self.cores  # in cores
        wanted = free_cores(others, self.cores)
        if wanted != self.current:
            self.torch.set_num_threads(wanted)
            self.current = wanted
        return self.current
