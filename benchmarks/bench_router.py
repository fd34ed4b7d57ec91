"""Router throughput and added latency.

Starts its own local stack (broker, ClickHouse endpoint, Triton with an echo model as the agent's student,
the reference teacher with no latency, the router process), produces requests as fast as the router takes
them, and measures for each path (student, teacher):
  * sustained requests/s (first request produced -> last response consumed);
  * added latency p50/p95 = (response consumed - request produced) - the model's own time (from the
    interaction record).
Goal (issue 3): >= 2,000 requests/s per router process, <= 5 ms p95 added.

    python benchmarks/bench_router.py [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import yaml
from aiokafka import TopicPartition

from services.core import topics
from services.core.codec import AvroCodec
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.model_repository import ModelRepository, student_model_name
from services.core.records import ChatMessage, InferenceRequest, InferenceResponse, Interaction, ModelEvent
from services.core.settings import Settings
from services.stack.broker import TansuBroker
from services.stack.clickhouse_endpoint import ClickHouseEndpoint
from services.stack.local import isolated_settings
from services.stack.process import ProcessManager
from services.stack.services import ServiceProcess
from services.stack.teacher import ReferenceTeacherServer
from services.stack.triton import TritonServer

TEXT = "I am still waiting on my card?"


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def tail(settings: Settings, topic: str, codec: AvroCodec, kind, want: set[str], out: dict, stop: asyncio.Event):
    consumer = create_consumer(settings, None, fetch_max_bytes=50_000_000, max_partition_fetch_bytes=10_000_000)
    await consumer.start()
    await consumer.topics()
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    stop.set()  # positioned: the producer may start
    try:
        while want - out.keys():
            for msgs in (await consumer.getmany(timeout_ms=200, max_records=10_000)).values():
                now = time.perf_counter()
                for m in msgs:
                    rec = codec.decode(m.value, kind)
                    if rec.request_id in want:
                        out[rec.request_id] = (now, rec)
    finally:
        await consumer.stop()


async def run_path(settings: Settings, agent: str, n: int, rate: float | None = None) -> dict:
    """``rate`` None: produce as fast as possible (throughput); else paced at ``rate`` requests/s (latency
    at a load the router sustains, without queueing in front of it)."""
    codec = AvroCodec()
    requests = [
        InferenceRequest(
            conversation_id=uuid.uuid4().hex,
            agent_id=agent,
            messages=[ChatMessage(role="user", content=TEXT)],
        )
        for _ in range(n)
    ]
    want = {r.request_id for r in requests}
    responses: dict = {}
    interactions: dict = {}
    ready_r, ready_i = asyncio.Event(), asyncio.Event()
    t_resp = asyncio.ensure_future(
        tail(settings, topics.RESPONSES.name, codec, InferenceResponse, want, responses, ready_r)
    )
    t_int = asyncio.ensure_future(
        tail(settings, topics.INTERACTIONS.name, codec, Interaction, want, interactions, ready_i)
    )
    await ready_r.wait()
    await ready_i.wait()
    producer = create_producer(settings, linger_ms=0 if rate else 5, max_batch_size=1_000_000)
    await producer.start()
    pub = Publisher(producer, codec)
    sent_at: dict[str, float] = {}
    t0 = time.perf_counter()
    futures = []
    for i, r in enumerate(requests):
        if rate is not None:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        sent_at[r.request_id] = time.perf_counter()
        futures.append(await pub.send_nowait(topics.REQUESTS, r, r.conversation_id))
    for f in futures:
        await f
    produced = time.perf_counter() - t0
    await asyncio.wait_for(asyncio.gather(t_resp, t_int), timeout=600)
    await producer.stop()
    last = max(t for t, _ in responses.values())
    added = []
    for rid, (t_done, _resp) in responses.items():
        inter: Interaction = interactions[rid][1]
        served = inter.student if inter.served_by == "student" else inter.teacher
        model_ms = served.latency_ms if served else 0.0
        added.append((t_done - sent_at[rid]) * 1000 - model_ms)
    served_by = {resp.served_by for _, resp in responses.values()}
    return {
        "served_by": ",".join(sorted(served_by)),
        "requests": n,
        "produce_rps": n / produced,
        "rps": n / (last - t0),
        "added_p50": pct(added, 50),
        "added_p95": pct(added, 95),
    }


async def promote_echo(settings: Settings, agent: str) -> None:
    repo = ModelRepository.from_settings(settings)
    published = await asyncio.to_thread(repo.publish_echo, student_model_name(agent))
    producer = create_producer(settings)
    await producer.start()
    event = ModelEvent(
        agent_id=agent,
        kind="promoted",
        model_name=student_model_name(agent),
        model_version=published.version,
        confidence_threshold=0.0,
    )
    await Publisher(producer, AvroCodec()).send(topics.MODELS, event, agent)
    await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the latency run")
    parser.add_argument("--json", type=Path, help="also write the figures here as a flat JSON object")
    args = parser.parse_args()
    figures: dict[str, float] = {"rate": args.rate, "requests": args.requests}
    with tempfile.TemporaryDirectory() as home:
        agents_file = Path(home) / "agents.yaml"
        routing = {"canary_steps": [1.0], "shadow_rate": 0.0}
        agents_file.write_text(
            yaml.safe_dump(
                {
                    "agents": {
                        "bench-student": {"routing": routing},
                        "bench-teacher": {"mode": "teacher", "routing": routing},
                    }
                }
            )
        )
        settings = isolated_settings(
            home, agents_file=agents_file, reference_teacher_latency_ms=0.0, reference_teacher_flaw_rate=0.0
        )
        manager = ProcessManager(settings.run_dir, settings.log_dir)
        parts = [
            TansuBroker.from_settings(settings),
            ClickHouseEndpoint.from_settings(settings),
            TritonServer.from_settings(settings),
            ReferenceTeacherServer.from_settings(settings),
        ]
        try:
            for part in parts:
                manager.start(part, 120)
            asyncio.run(promote_echo(settings, "bench-student"))
            router = ServiceProcess.for_service(settings, "router")
            manager.start(router, 120)
            parts.append(router)
            time.sleep(1)
            asyncio.run(run_path(settings, "bench-student", 500))  # warm-up
            print(
                f"router benchmark: echo student in Triton, instant reference teacher; throughput from a burst of "
                f"{args.requests} requests, added latency at {args.rate:.0f} requests/s"
            )
            print("| path | sustained requests/s | added p50 ms | added p95 ms |")
            print("|---|---|---|---|")
            for agent in ("bench-student", "bench-teacher"):
                burst = asyncio.run(run_path(settings, agent, args.requests))
                paced = asyncio.run(run_path(settings, agent, int(args.rate * 10), rate=args.rate))
                added = f"{paced['added_p50']:.1f} | {paced['added_p95']:.1f}"
                print(f"| {burst['served_by']} | {burst['rps']:,.0f} | {added} |")
                path = agent.removeprefix("bench-")  # student / teacher
                figures |= {f"{path}_rps": burst["rps"], f"{path}_added_p50_ms": paced["added_p50"],
                            f"{path}_added_p95_ms": paced["added_p95"]}  # fmt: skip
            print("goal: >= 2,000 requests/s, <= 5 ms p95 added")
        finally:
            for part in reversed(parts):
                manager.stop(part.name)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
