"""Which offsets may be committed when records finish out of order (pure).

A service that works on many records at once (the router serves different conversations concurrently) may
commit a partition only up to its oldest unfinished record: committing past it would lose that record if
the service died before finishing it.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class OffsetTracker(Generic[P]):
    def __init__(self) -> None:
        self._pending: dict[P, list[int]] = {}  # min-heap of started, unfinished offsets
        self._finished: dict[P, set[int]] = {}
        self._highest: dict[P, int] = {}  # highest offset started
        self._committed: dict[P, int] = {}

    def started(self, partition: P, offset: int) -> None:
        heapq.heappush(self._pending.setdefault(partition, []), offset)
        self._highest[partition] = max(offset, self._highest.get(partition, -1))

    def finished(self, partition: P, offset: int) -> None:
        self._finished.setdefault(partition, set()).add(offset)
        heap = self._pending[partition]
        done = self._finished[partition]
        while heap and heap[0] in done:
            done.discard(heapq.heappop(heap))

    def in_flight(self) -> int:
        return sum(len(h) for h in self._pending.values())

    def committable(self) -> dict[P, int]:
        """Next offset to commit per partition, only where it moved since the last call."""
        out = {}
        for partition, highest in self._highest.items():
            heap = self._pending.get(partition)
            position = heap[0] if heap else highest + 1
            if position > self._committed.get(partition, -1):
                out[partition] = position
                self._committed[partition] = position
        return out
