"""Replayed BANKING77 traffic for integration tests that need to know exactly what was sent and answered.

``services.workload.replay`` reports totals; a test that checks ClickHouse row by row (crash safety, exactly
once) needs every request id it sent and the response each one got, and needs to act (kill a service) while
the traffic is still flowing. ``plan`` builds the requests up front (deterministic, several agents
interleaved); ``TrafficDriver`` sends them through ``FlywheelClient`` at a rate, with bounded concurrency,
lets the test wait until a given number has been sent, and stops sending when told (so a test can keep the
traffic flowing for as long as its own steps take).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from services.client import FlywheelClient
from services.core.records import InferenceRequest, InferenceResponse
from services.core.settings import Settings
from services.teacher.workloads import load_workload
from services.workload import draw, to_request


def plan(
    settings: Settings,
    agents: Mapping[str, tuple[int, Sequence[str] | None]],
    seed: int = 7,
    workload_name: str = "banking77",
) -> list[InferenceRequest]:
    """``count`` requests per agent (each a conversation of its own, drawn from ``intents``), interleaved
    round-robin so every agent's traffic spans the whole run."""
    workload = load_workload(workload_name, settings.data_dir)
    queues = []
    for i, (agent_id, (count, intents)) in enumerate(agents.items()):
        stream = draw(workload, intents, seed=seed + i)
        queues.append([to_request(next(stream), agent_id, label=False) for _ in range(count)])
    out: list[InferenceRequest] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


@dataclass
class TrafficResult:
    sent: list[str] = field(default_factory=list)  # request ids, in send order
    responses: dict[str, InferenceResponse] = field(default_factory=dict)
    timeouts: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def errors(self) -> dict[str, str]:
        return {rid: r.error for rid, r in self.responses.items() if r.error}

    def unanswered(self) -> list[str]:
        return [rid for rid in self.sent if rid not in self.responses]


class TrafficDriver:
    """Sends requests at ``rate`` per second (None: as fast as ``concurrency`` allows); each waits for its own
    answer up to ``timeout_s`` (long enough to ride out a router restart and its group rejoin)."""

    def __init__(
        self,
        settings: Settings,
        rate: float | None = 5.0,
        concurrency: int = 16,
        timeout_s: float = 180.0,
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.result = TrafficResult()
        self._stop = asyncio.Event()
        self._ahead = 0  # requests sent ahead of the rate (bursts)

    def burst(self, n: int) -> None:
        """Send the next ``n`` requests at once (as many as ``concurrency`` allows), then go on at the rate."""
        self._ahead += n

    def stop(self) -> None:
        """Send nothing more; ``run`` returns once the requests already sent are answered."""
        self._stop.set()

    async def wait_sent(self, n: int, timeout_s: float = 300.0) -> None:
        """Return once ``n`` requests have been sent (the run goes on); TimeoutError after ``timeout_s``."""
        await self._poll(lambda: len(self.result.sent) >= n, timeout_s)

    async def wait_answered(self, n: int, timeout_s: float = 300.0) -> None:
        """Return once ``n`` requests have been answered; TimeoutError after ``timeout_s``."""
        await self._poll(lambda: len(self.result.responses) >= n, timeout_s)

    @staticmethod
    async def _poll(done: Callable[[], bool], timeout_s: float) -> None:
        # Polling rather than an asyncio.Condition: a wait_for() timeout cancelling Condition.wait() can leave
        # its lock unusable, which would stall the sender and the response handlers with it.
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not reached within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)

    async def run(self, requests: Sequence[InferenceRequest]) -> TrafficResult:
        slots = asyncio.Semaphore(self.concurrency)
        result = self.result

        async def one(client: FlywheelClient, request: InferenceRequest) -> None:
            try:
                result.responses[request.request_id] = await client.submit(request, timeout_s=self.timeout_s)
            except TimeoutError:
                result.timeouts.append(request.request_id)
            finally:
                slots.release()

        t0 = time.perf_counter()
        async with FlywheelClient(self.settings) as client:
            tasks = []
            for i, request in enumerate(requests):
                if self._stop.is_set():
                    break
                if self.rate:
                    delay = t0 + (i - self._ahead) / self.rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await slots.acquire()
                if self._stop.is_set():
                    slots.release()
                    break
                tasks.append(asyncio.ensure_future(one(client, request)))
                result.sent.append(request.request_id)
            await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - t0
        return result
