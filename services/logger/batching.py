"""When to flush (pure): a batch is written when it holds ``max_rows`` rows or ``max_bytes`` bytes, or when
its oldest row has waited ``max_age_s``. Big batches are what make ClickHouse inserts cheap; the age bound is
what keeps the table fresh when traffic is light. The clock is injected, so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int = 5000
    max_age_s: float = 0.2
    max_bytes: int = 64 << 20  # guards memory and request size when records are unusually large

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_age_s < 0:
            raise ValueError(f"max_age_s must be >= 0, got {self.max_age_s}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")


class Batcher(Generic[T]):
    """The open batch: its items, their size, and when the first one arrived."""

    def __init__(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.items: list[T] = []
        self.nbytes = 0
        self.opened_at: float | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T, nbytes: int = 0) -> None:
        if self.opened_at is None:
            self.opened_at = self.clock()  # the age counts from the first row, not from the last flush
        self.items.append(item)
        self.nbytes += nbytes

    def extend(self, items: list[T], nbytes: int = 0) -> None:
        """Add many at once (the hot path: one call per partition read, not per record)."""
        if not items:
            return
        if self.opened_at is None:
            self.opened_at = self.clock()
        self.items.extend(items)
        self.nbytes += nbytes

    def age(self) -> float:
        return 0.0 if self.opened_at is None else self.clock() - self.opened_at

    def full(self) -> bool:
        return len(self.items) >= self.policy.max_rows or self.nbytes >= self.policy.max_bytes

    def due(self) -> bool:
        """True when the batch should be written now (never for an empty batch)."""
        if not self.items:
            return False
        return self.full() or self.age() >= self.policy.max_age_s

    def room(self) -> int:
        """Rows that still fit before the size bound (at least 1, so a reader always makes progress)."""
        return max(1, self.policy.max_rows - len(self.items))

    def wait_s(self, idle_s: float) -> float:
        """How long a reader may wait for more rows: until the batch is due, or ``idle_s`` when empty."""
        if not self.items:
            return idle_s
        return max(0.0, self.policy.max_age_s - self.age())

    def take(self) -> list[T]:
        """The items, leaving an empty batch behind."""
        items = self.items
        self.items, self.nbytes, self.opened_at = [], 0, None
        return items
