"""The train/holdout split (pure, deterministic): stratified by intent, decided by a seeded hash of the
request id, never by a random shuffle, so the same pairs always give the same split and the same files.

Within each intent the pairs are ordered by ``sha256(seed:request_id)``; the first ``round(n * fraction)``
go to the holdout (at most ``n - 1``: an intent seen once stays in training, where it teaches something).
Both splits are then ordered by the same hash, which interleaves the intents (a trainer that reads the file
in order still sees a mix) and does not depend on the order the pairs came in.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
DEFAULT_SEED = "flywheel-split-v1"


def hash_key(request_id: str, seed: str = DEFAULT_SEED) -> str:
    return hashlib.sha256(f"{seed}:{request_id}".encode()).hexdigest()


def holdout_size(n: int, fraction: float) -> int:
    """Holdout share of an intent with n pairs: round half up, at least one pair left for training."""
    if n <= 1:
        return 0
    return min(n - 1, math.floor(n * fraction + 0.5))


def split(
    items: Sequence[T],
    fraction: float,
    request_id: Callable[[T], str],
    intent: Callable[[T], str | None],
    seed: str = DEFAULT_SEED,
) -> tuple[list[T], list[T]]:
    """(train, holdout), each ordered by the seeded hash of the request id (ties: the request id)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")

    def key(item: T) -> tuple[str, str]:
        rid = request_id(item)
        return hash_key(rid, seed), rid

    groups: dict[str, list[T]] = defaultdict(list)
    for item in items:
        groups[intent(item) or ""].append(item)
    train: list[T] = []
    holdout: list[T] = []
    for label in sorted(groups):
        members = sorted(groups[label], key=key)
        k = holdout_size(len(members), fraction)
        holdout.extend(members[:k])
        train.extend(members[k:])
    return sorted(train, key=key), sorted(holdout, key=key)
