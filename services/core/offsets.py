"""Which offsets may be committed when records finish out of order (pure).

A service that works on many records at once (the router serves different conversations concurrently) may
commit a partition only up to its oldest unfinished record: committing past it would lose that record if
the service died before finishing it.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Hashable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class OffsetTracker(Generic[P]):
    """Started and finished offsets per partition; which position may be committed.

    A position is remembered as committed only when the caller says the commit went through
    (``committed``), so a failed commit is tried again. ``forget`` drops partitions this consumer no longer
    owns (after a rebalance): a record of theirs that finishes later changes nothing.
    """

    def __init__(self) -> None:
        self._pending: dict[P, list[int]] = {}  # min-heap of started, unfinished offsets
        self._finished: dict[P, set[int]] = {}
        self._highest: dict[P, int] = {}  # highest offset started
        self._committed: dict[P, int] = {}

    def started(self, partition: P, offset: int) -> None:
        heapq.heappush(self._pending.setdefault(partition, []), offset)
        self._highest[partition] = max(offset, self._highest.get(partition, -1))

    def finished(self, partition: P, offset: int) -> None:
        heap = self._pending.get(partition)
        if heap is None:
            return  # forgotten: no longer ours
        done = self._finished.setdefault(partition, set())
        done.add(offset)
        while heap and heap[0] in done:
            done.discard(heapq.heappop(heap))

    def in_flight(self, partitions: Collection[P] | None = None) -> int:
        return sum(len(h) for p, h in self._pending.items() if partitions is None or p in partitions)

    def committable(self, owned: Collection[P] | None = None) -> dict[P, int]:
        """Next offset to commit per partition (of those owned), only where it moved since the last commit."""
        out = {}
        for partition, highest in self._highest.items():
            if owned is not None and partition not in owned:
                continue
            heap = self._pending.get(partition)
            position = heap[0] if heap else highest + 1
            if position > self._committed.get(partition, -1):
                out[partition] = position
        return out

    def committed(self, offsets: dict[P, int]) -> None:
        for partition, position in offsets.items():
            if partition in self._highest:
                self._committed[partition] = max(position, self._committed.get(partition, -1))

    def forget(self, partitions: Collection[P]) -> None:
        for partition in partitions:
            for table in (self._pending, self._finished, self._highest, self._committed):
                table.pop(partition, None)  # type: ignore[attr-defined]
