"""The workload generator: replays a labelled data set's user messages as conversations through the
router, the way an agent's production traffic would arrive.

Messages are drawn in a deterministic order (seeded), optionally restricted to some intents (the demo's
narrow agent, then the held-back intents for the drift phase). Each request carries the gold label in
``metadata["gold_intent"]`` for task accuracy; the client-side ``intent`` label is set only for a chosen
share of requests (most production traffic carries none).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from services.core.records import ChatMessage, InferenceRequest, InferenceResponse
from services.core.settings import Settings
from services.teacher.contract import Example, Workload
from services.teacher.datasets import registry_dir
from services.teacher.workloads import load_workload


def draw(
    workload: Workload, intents: Sequence[str] | None = None, split: str = "train", seed: int = 7
) -> Iterator[Example]:
    """An endless, seeded stream of the split's examples (restricted to ``intents`` when given), each pass
    over the pool in a new shuffled order."""
    wanted = set(intents) if intents else None
    pool = [e for e in workload.examples(split) if wanted is None or e.intent in wanted]
    if not pool:
        raise ValueError(f"{workload.name}/{split}: no example has one of the intents {sorted(wanted or [])}")
    rng = random.Random(seed)
    while True:
        order = list(pool)
        rng.shuffle(order)
        yield from order


def to_request(example: Example, agent_id: str, label: bool, conversation_id: str | None = None) -> InferenceRequest:
    return InferenceRequest(
        conversation_id=conversation_id or f"conv-{uuid.uuid4().hex[:16]}",
        agent_id=agent_id,
        messages=[ChatMessage(role="user", content=example.text)],
        intent=example.intent if label else None,
        metadata={"gold_intent": example.intent, "source": "workload"},
    )


@dataclass
class ReplayResult:
    sent: int = 0
    answered: int = 0
    errors: int = 0
    served_by: Counter[str] = field(default_factory=Counter)
    gold_correct: int = 0  # answers whose intent equals the gold label
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.gold_correct / self.answered if self.answered else 0.0


def answered_intent(response: InferenceResponse) -> str | None:
    import json

    text = response.content
    if not text and response.tool_calls:
        text = response.tool_calls[0].arguments
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    return value.get("intent") if isinstance(value, dict) else None


async def replay(
    settings: Settings,
    agent_id: str,
    workload_name: str = "banking77",
    count: int = 100,
    rate: float | None = 20.0,
    intents: Sequence[str] | None = None,
    split: str = "train",
    label_share: float = 0.0,
    seed: int = 7,
    concurrency: int = 64,
    progress: Callable[[ReplayResult], None] = lambda r: None,
) -> ReplayResult:
    """Send ``count`` requests at ``rate`` per second (None = as fast as ``concurrency`` allows) and wait for
    every answer."""
    from services.client import FlywheelClient

    workload = load_workload(workload_name, settings.data_dir, registry_dir(settings.home))
    stream = draw(workload, intents, split, seed)
    labeller = random.Random(seed + 1)
    result = ReplayResult()
    slots = asyncio.Semaphore(concurrency)

    async def one(client: FlywheelClient, example: Example) -> None:
        try:
            response = await client.submit(to_request(example, agent_id, labeller.random() < label_share))
        except TimeoutError:
            result.errors += 1
        else:
            if response.error:
                result.errors += 1
            else:
                result.answered += 1
                result.served_by[response.served_by] += 1
                result.gold_correct += answered_intent(response) == example.intent
        finally:
            slots.release()
            progress(result)

    t0 = time.perf_counter()
    async with FlywheelClient(settings) as client:
        tasks = []
        for i in range(count):
            if rate:
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await slots.acquire()
            tasks.append(asyncio.ensure_future(one(client, next(stream))))
            result.sent += 1
        await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - t0
    return result
