"""Hot swap: publish new student versions while the router serves steady traffic, and count what it costs.

Starts its own local stack (broker, ClickHouse endpoint, Triton, the reference teacher with no latency, the
router process) with one agent pinned to its student (``mode: student``, no canary, no shadow), serves the
student from Triton (the echo model, or with ``--model tiny`` the student backend over the tests' tiny
language model), sends requests through the router at a steady ``--rate`` for ``--seconds``, and meanwhile
publishes ``--swaps`` new versions the real way: ``ModelRepository`` (staging, atomic rename, explicit load
over gRPC, probe), then a ``ModelEvent(promoted)`` on ``flywheel.models``, which the router follows.

It reports:
  * failed requests: responses carrying an error, plus requests never answered (goal: 0);
  * fallbacks: requests the teacher answered because the student could not (``served_by = teacher``; with the
    agent pinned to its student this only happens on a student error), during swaps and in total;
  * latency p50 / p95 (request produced -> response consumed) of requests sent during a swap versus outside.
A swap lasts from the start of the publish until the router's first answer from the new version (or, if
none is seen, the publish's end plus 2 s).

    python benchmarks/bench_hotswap.py [--seconds 60] [--swaps 5] [--rate 100] [--model echo|tiny] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiokafka import TopicPartition

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere (tests.helpers for --model tiny)
    sys.path.insert(0, str(ROOT))

from services.core import topics  # noqa: E402
from services.core.codec import AvroCodec  # noqa: E402
from services.core.kafka import Publisher, create_consumer, create_producer  # noqa: E402
from services.core.model_repository import (  # noqa: E402
    ModelRepository,
    PublishedVersion,
    StudentModelSpec,
    student_model_name,
)
from services.core.records import ChatMessage, InferenceRequest, InferenceResponse, ModelEvent  # noqa: E402
from services.core.settings import Settings  # noqa: E402
from services.stack.broker import TansuBroker  # noqa: E402
from services.stack.clickhouse_endpoint import ClickHouseEndpoint  # noqa: E402
from services.stack.local import isolated_settings  # noqa: E402
from services.stack.process import ProcessManager  # noqa: E402
from services.stack.services import ServiceProcess  # noqa: E402
from services.stack.teacher import ReferenceTeacherServer  # noqa: E402
from services.stack.triton import TritonServer  # noqa: E402

AGENT = "bench-hotswap"
TEXT = "I am still waiting on my card?"
ANSWER_WAIT_S = 60.0  # after the last request: how long stragglers may take before they count as failed


@dataclass
class Swap:
    version: int
    started: float  # perf_counter when the publish began
    published: float  # when the version was loaded, probed and the promoted event sent
    first_answer: float | None = None  # the router's first answer from this version

    @property
    def end(self) -> float:
        return self.first_answer if self.first_answer is not None else self.published + 2.0


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


class VersionPublisher:
    """Publishes the next student version and announces it, as the trainer does (``services/trainer/publish``
    minus training: the same repository calls and the same promoted event)."""

    def __init__(self, settings: Settings, tiny_base: Path | None) -> None:
        self.settings = settings
        self.repo = ModelRepository.from_settings(settings)
        self.model_name = student_model_name(AGENT)
        self.tiny_base = tiny_base

    def publish(self) -> PublishedVersion:
        if self.tiny_base is None:
            return self.repo.publish_echo(self.model_name)
        spec = StudentModelSpec(base_model=str(self.tiny_base), max_new_tokens=8, num_threads=1)
        return self.repo.publish_student(AGENT, spec)

    async def announce(self, version: int) -> None:
        producer = create_producer(self.settings)
        await producer.start()
        try:
            event = ModelEvent(
                agent_id=AGENT,
                kind="promoted",
                model_name=self.model_name,
                model_version=version,
                confidence_threshold=0.0,
            )
            await Publisher(producer, AvroCodec()).send(topics.MODELS, event, AGENT)
        finally:
            await producer.stop()


async def tail_responses(settings: Settings, out: dict[str, tuple[float, InferenceResponse]], ready: asyncio.Event,
                         stop: asyncio.Event) -> None:  # fmt: skip
    codec = AvroCodec()
    consumer = create_consumer(settings, None, fetch_max_bytes=50_000_000, max_partition_fetch_bytes=10_000_000)
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topics.RESPONSES.name, p) for p in consumer.partitions_for_topic(topics.RESPONSES.name)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        ready.set()  # positioned: requests may start
        while not stop.is_set():
            for msgs in (await consumer.getmany(timeout_ms=100, max_records=10_000)).values():
                now = time.perf_counter()
                for m in msgs:
                    rec = codec.decode(m.value, InferenceResponse)
                    if rec.agent_id == AGENT:
                        out[rec.request_id] = (now, rec)
    finally:
        await consumer.stop()


async def swap_loop(pub: VersionPublisher, t0: float, seconds: float, swaps: int, done: list[Swap]) -> None:
    """``swaps`` publishes spread evenly over the run, leaving a quiet stretch at each end for the baseline."""
    interval = seconds / (swaps + 1)
    for i in range(swaps):
        delay = t0 + (i + 1) * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.perf_counter()
        published = await asyncio.to_thread(pub.publish)
        await pub.announce(published.version)
        done.append(Swap(published.version, started, time.perf_counter()))
        print(f"  swap {i + 1}/{swaps}: version {published.version} published in {published.seconds:.1f} s")


async def run(settings: Settings, pub: VersionPublisher, rate: float, seconds: float, swaps: int) -> dict[str, float]:
    responses: dict[str, tuple[float, InferenceResponse]] = {}
    ready, stop = asyncio.Event(), asyncio.Event()
    tail = asyncio.ensure_future(tail_responses(settings, responses, ready, stop))
    await ready.wait()
    producer = create_producer(settings, linger_ms=0)
    await producer.start()
    publisher = Publisher(producer, AvroCodec())
    sent_at: dict[str, float] = {}
    done: list[Swap] = []
    n = int(rate * seconds)
    t0 = time.perf_counter()
    swapper = asyncio.ensure_future(swap_loop(pub, t0, seconds, swaps, done))
    try:
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = InferenceRequest(
                conversation_id=uuid.uuid4().hex, agent_id=AGENT, messages=[ChatMessage(role="user", content=TEXT)]
            )
            sent_at[request.request_id] = time.perf_counter()
            await publisher.send_nowait(topics.REQUESTS, request, request.conversation_id)
        await producer.flush()
        await swapper  # a publish still running at the end of the load is waited for, not abandoned
        deadline = time.monotonic() + ANSWER_WAIT_S
        while sent_at.keys() - responses.keys() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await tail
        await producer.stop()
        if not swapper.done():
            swapper.cancel()

    for swap in done:
        times = [t for t, r in responses.values() if r.model_version == str(swap.version) and t >= swap.started]
        swap.first_answer = min(times) if times else None
    windows = [(s.started, s.end) for s in done]

    def in_swap(t: float) -> bool:
        return any(start <= t <= end for start, end in windows)

    during, outside = [], []
    failed = fallbacks = fallbacks_during = failed_during = 0
    for rid, t_sent in sent_at.items():
        swapping = in_swap(t_sent)
        got = responses.get(rid)
        if got is None or got[1].error:
            failed += 1
            failed_during += swapping
            continue
        t_done, resp = got
        if resp.served_by == "teacher":
            fallbacks += 1
            fallbacks_during += swapping
        (during if swapping else outside).append((t_done - t_sent) * 1000)
    lags = [s.first_answer - s.published for s in done if s.first_answer is not None]
    return {
        "requests": n,
        "rate": rate,
        "swaps": len(done),
        "failed_requests": failed,
        "failed_during_swaps": failed_during,
        "missing_responses": len(sent_at.keys() - responses.keys()),
        "fallbacks": fallbacks,
        "fallbacks_during_swaps": fallbacks_during,
        "requests_during_swaps": len(during) + failed_during,
        "p50_during_swaps_ms": pct(during, 50),
        "p95_during_swaps_ms": pct(during, 95),
        "p50_outside_swaps_ms": pct(outside, 50),
        "p95_outside_swaps_ms": pct(outside, 95),
        "publish_seconds_mean": statistics.fmean(s.published - s.started for s in done) if done else None,
        "router_switch_lag_s_max": max(lags) if lags else None,  # promoted event sent -> first new answer
        "versions_never_answered": sum(s.first_answer is None for s in done),
    }  # type: ignore[return-value]


def agents_yaml(path: Path) -> Path:
    routing = {"canary_steps": [1.0], "shadow_rate": 0.0, "confidence_threshold": 0.0}
    path.write_text(yaml.safe_dump({"agents": {AGENT: {"mode": "student", "routing": routing}}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the steady load")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s through the router")
    parser.add_argument("--swaps", type=int, default=5, help="new versions published during the load")
    parser.add_argument("--model", choices=("echo", "tiny"), default="echo", help="what the student versions are")
    parser.add_argument("--json", type=Path, help="also write the figures here as a flat JSON object")
    args = parser.parse_args()
    if args.swaps < 1 or args.seconds <= 0 or args.rate <= 0:
        parser.error("--swaps must be >= 1, --seconds and --rate > 0")
    with tempfile.TemporaryDirectory(prefix="bench-hotswap-") as home:
        settings = isolated_settings(
            home,
            agents_file=agents_yaml(Path(home) / "agents.yaml"),
            reference_teacher_latency_ms=0.0,
            reference_teacher_flaw_rate=0.0,
        )
        tiny = None
        if args.model == "tiny":
            from tests.helpers.tiny_model import build_tiny_model

            tiny = build_tiny_model(Path(home) / "tiny-model")
        pub = VersionPublisher(settings, tiny)
        manager = ProcessManager(settings.run_dir, settings.log_dir)
        parts = [
            TansuBroker.from_settings(settings),
            ClickHouseEndpoint.from_settings(settings),
            TritonServer.from_settings(settings),
            ReferenceTeacherServer.from_settings(settings),
        ]
        try:
            for part in parts:
                manager.start(part, settings.stack_start_timeout_s)
            first = pub.publish()
            asyncio.run(pub.announce(first.version))
            router = ServiceProcess.for_service(settings, "router")
            manager.start(router, settings.stack_start_timeout_s)
            parts.append(router)
            print(
                f"hot-swap benchmark: {args.model} student pinned ({AGENT}), {args.rate:.0f} requests/s for "
                f"{args.seconds:.0f} s through the router, {args.swaps} new versions published meanwhile"
            )
            asyncio.run(run(settings, pub, args.rate, 3.0, 0))  # warm-up: router, Triton, clients
            figures = asyncio.run(run(settings, pub, args.rate, args.seconds, args.swaps))
        finally:
            for part in reversed(parts):
                manager.stop(part.name)

    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} ms"

    print(f"requests: {figures['requests']:,}  swaps: {figures['swaps']}")
    print(f"failed requests: {figures['failed_requests']} ({figures['missing_responses']} never answered)"
          f"  goal: 0")  # fmt: skip
    print(f"fallbacks to the teacher: {figures['fallbacks']} ({figures['fallbacks_during_swaps']} during swaps)")
    print(f"latency during swaps: p50 {ms(figures['p50_during_swaps_ms'])}, p95 {ms(figures['p95_during_swaps_ms'])}"
          f"  ({figures['requests_during_swaps']} requests)")  # fmt: skip
    print(f"latency outside swaps: p50 {ms(figures['p50_outside_swaps_ms'])}, "
          f"p95 {ms(figures['p95_outside_swaps_ms'])}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in figures.items() if v is not None}, indent=2))


if __name__ == "__main__":
    main()
