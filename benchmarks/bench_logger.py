"""Logger throughput: interactions/s into ClickHouse. Goal: >= 100,000/s.

Starts its own broker and ClickHouse endpoint on free loopback ports in a temporary home, then measures

1. the sink alone: Avro records → ``InteractionSink.write`` (staging load, ClickHouse's row mapping, the
   duplicate check, the insert), in batches of ``--batch-rows``, ``--lanes`` writes at once (the logger's
   defaults);
2. for comparison, the same rows the Python way, stage by stage: decode (codec), map (``interaction_row``),
   insert (clickhouse-connect, column-oriented), which is why the hot path leaves decoding to ClickHouse;
3. end to end: ``--records`` Avro records already on ``flywheel.interactions``, then ``python -m
   services.logger`` started as a process: the time from its readiness until every row is in ClickHouse,
   with the CPU time the logger, the ClickHouse endpoint and the broker used meanwhile (all three share this
   machine's cores).

    python benchmarks/bench_logger.py [--records 500000] [--sink-records 200000] [--batch-rows N] [--lanes N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402

from services.core.clickhouse import client  # noqa: E402
from services.core.codec import AvroCodec  # noqa: E402
from services.core.health import is_ready  # noqa: E402
from services.core.kafka import confluent_config  # noqa: E402
from services.core.records import Answer, ChatMessage, Interaction  # noqa: E402
from services.core.settings import Settings  # noqa: E402
from services.core.topics import INTERACTIONS  # noqa: E402
from services.logger.framing import zigzag_long  # noqa: E402
from services.logger.rows import INTERACTION_COLUMNS, interaction_row  # noqa: E402
from services.logger.service import LoggerConfig  # noqa: E402
from services.logger.sink import InteractionSink  # noqa: E402
from services.stack.broker import TansuBroker  # noqa: E402
from services.stack.clickhouse_endpoint import ClickHouseEndpoint  # noqa: E402
from services.stack.process import ProcessManager, free_port  # noqa: E402

GOAL = 100_000
ANSWER = '{"intent":"card_arrival","tool":"track_card","arguments":{"card":"visa"},"reply":"It is on its way."}'


def templates() -> list[Interaction]:
    """Typical records: teacher only (grace period), student only, and a shadow sample with both."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    messages = [
        ChatMessage(role="system", content="You are the support desk of a bank. Answer in JSON."),
        ChatMessage(role="user", content="I ordered a new card last week and it still has not arrived, where is it?"),
    ]
    teacher = Answer(
        content=ANSWER,
        model="reference/banking77",
        latency_ms=412.0,
        input_tokens=96,
        output_tokens=28,
        cost_usd=0.00014,
    )
    student = Answer(
        content=ANSWER,
        model="student_support",
        model_version="3",
        confidence=0.93,
        latency_ms=51.0,
        input_tokens=96,
        output_tokens=28,
        cost_usd=0.0001,
    )
    base = dict(
        conversation_id="conv-0000000000",
        agent_id="bench",
        messages=messages,
        intent="card_arrival",
        metadata={"channel": "web"},
        received_at=t0,
        responded_at=t0,
    )
    return [
        Interaction(request_id="x", **base, teacher=teacher, served_by="teacher", route_reason="grace_period",
                    training_candidate=True, cost_usd=0.00014, teacher_only_cost_usd=0.00014),
        Interaction(request_id="x", **base, student=student, served_by="student", route_reason="confident",
                    lifecycle_stage="live", cost_usd=0.0001, teacher_only_cost_usd=0.00014),
        Interaction(request_id="x", **base, teacher=teacher, student=student, served_by="student",
                    route_reason="confident", shadow=True, lifecycle_stage="live", cost_usd=0.00024,
                    teacher_only_cost_usd=0.00014),
    ]  # fmt: skip


class RecordFactory:
    """Distinct records fast: each template is encoded once with a placeholder request id, then only the id
    (the first field) and the two timestamps (the last two) are written per record."""

    def __init__(self, codec: AvroCodec, agent: str) -> None:
        self.parts = []
        self.t0 = int(datetime.now(timezone.utc).timestamp() * 1e6)
        for template in templates():
            rec = template.model_copy(update={"agent_id": agent, "request_id": "R" * 36})
            data = codec.encode(rec)
            marker = zigzag_long(36) + b"R" * 36
            start = data.index(marker)
            stamp = int(rec.received_at.timestamp() * 1e6)
            tail = zigzag_long(stamp) + zigzag_long(stamp)
            assert data.endswith(tail)
            self.parts.append((data[:start], data[start + len(marker) : -len(tail)]))

    def make(self, i: int, run: str) -> tuple[bytes, bytes]:
        """(key, single-object encoded record) number i."""
        head, middle = self.parts[i % len(self.parts)]
        rid = f"{run}-{i:027d}".encode()[:36].ljust(36, b"0")
        at = self.t0 + i * 10  # 100,000 requests a second, in order
        value = b"".join((head, b"\x48", rid, middle, zigzag_long(at), zigzag_long(at + 400_000)))
        return rid, value


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count(ch, agent: str) -> int:
    return int(ch.command("SELECT count() FROM interactions WHERE agent_id = {a:String}", parameters={"a": agent}))


def bench_sink(settings: Settings, codec: AvroCodec, n: int, batch: int, lanes: int, endpoint_pid: int) -> float:
    """``lanes`` sinks writing at once, each its own share of the records (as the logger's lanes do)."""
    agent = "bench-sink"
    factory = RecordFactory(codec, agent)
    run = uuid.uuid4().hex[:8]
    records = [factory.make(i, run)[1] for i in range(n)]
    shares = [records[i::lanes] for i in range(lanes)]
    sinks = [InteractionSink(settings, codec=codec) for _ in range(lanes)]
    written = [0] * lanes

    def work(lane: int) -> None:
        for i in range(batch, len(shares[lane]), batch):
            written[lane] += sinks[lane].write(shares[lane][i : i + batch]).written

    try:
        for lane, sink in enumerate(sinks):  # warm-up (connection, staging table), not timed
            written[lane] += sink.write(shares[lane][:batch]).written
        timed = n - sum(written)
        cpu0 = (time.process_time(), cpu_seconds(endpoint_pid))
        started = time.perf_counter()
        threads = [threading.Thread(target=work, args=(lane,)) for lane in range(lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        own, endpoint = time.process_time() - cpu0[0], cpu_seconds(endpoint_pid) - cpu0[1]
    finally:
        for sink in sinks:
            sink.close()
    assert sum(written) == n, f"the sink wrote {sum(written)} of {n}"
    rate = timed / seconds
    print(
        f"sink alone (Avro records → ClickHouse, {lanes} lane(s), batches of {batch}): {rate:,.0f} rows/s"
        f"  ({timed:,} rows)"
    )
    print(f"  CPU per row: sink {own / timed * 1e6:.1f} µs, ClickHouse endpoint {endpoint / timed * 1e6:.1f} µs")
    return rate


def bench_python_path(settings: Settings, codec: AvroCodec, n: int) -> float:
    factory = RecordFactory(codec, "bench-python")
    run = uuid.uuid4().hex[:8]
    payloads = [factory.make(i, run)[1] for i in range(n)]
    t0 = time.perf_counter()
    records = [codec.decode(p, Interaction) for p in payloads]
    t1 = time.perf_counter()
    rows = [interaction_row(r) for r in records]
    t2 = time.perf_counter()
    columns = [list(c) for c in zip(*rows, strict=True)]
    ch = client(settings)
    try:
        t3 = time.perf_counter()
        ch.insert("interactions", columns, column_names=list(INTERACTION_COLUMNS), column_oriented=True)
        t4 = time.perf_counter()
    finally:
        ch.close()
    per = [(t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6, (t4 - t3) / n * 1e6]
    rate = n / ((t2 - t0) + (t4 - t3))
    print(
        f"python path, per record: decode {per[0]:.1f} µs, map {per[1]:.1f} µs, insert {per[2]:.1f} µs "
        f"→ {rate:,.0f} rows/s on one core (no duplicate check)"
    )
    return rate


def bench_end_to_end(
    settings: Settings, codec: AvroCodec, n: int, batch: int, lanes: int, pids: dict[str, int], home: Path
) -> float:
    agent = "bench-e2e"
    factory = RecordFactory(codec, agent)
    run = uuid.uuid4().hex[:8]
    producer = Producer(
        {
            **confluent_config(settings),
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    started = time.perf_counter()
    for i in range(n):
        key, value = factory.make(i, run)
        while True:
            try:
                producer.produce(INTERACTIONS.name, value, key=key)
                break
            except BufferError:
                producer.poll(0.01)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0
    print(f"produced {n:,} records ({time.perf_counter() - started:.1f} s); starting the logger")

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(
        FLYWHEEL_HOME=str(home),
        FLYWHEEL_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        FLYWHEEL_CLICKHOUSE_URL=settings.clickhouse_url,
        FLYWHEEL_LOGGER_MAX_BATCH_ROWS=str(batch),
        FLYWHEEL_LOGGER_INSERT_LANES=str(lanes),
        FLYWHEEL_LOGGER_KAFKA_SESSION_TIMEOUT_MS="2000",
        FLYWHEEL_LOGGER_GROUP_ID=f"bench-{run}",
    )
    log_path = home / "logger.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.logger"], env=env, stdout=log, stderr=log, cwd=ROOT)
    ch = client(settings)
    try:
        deadline = time.monotonic() + 60
        while not is_ready(Settings(home=home), "logger", proc.pid):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the logger did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        cpu0 = {name: cpu_seconds(pid) for name, pid in {**pids, "logger": proc.pid}.items()}
        started = time.perf_counter()
        deadline = time.monotonic() + 600
        got = 0
        while got < n and time.monotonic() < deadline:
            time.sleep(0.1)
            got = count(ch, agent)
        seconds = time.perf_counter() - started
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in {**pids, "logger": proc.pid}.items()}
    finally:
        ch.close()
        proc.terminate()
        proc.wait(30)
    if got != n:
        raise SystemExit(f"{got:,} of {n:,} rows in ClickHouse after {seconds:.0f} s")
    rate = n / seconds
    print(
        f"end to end (topic → logger process → ClickHouse, {lanes} lane(s), batches of {batch}): "
        f"{rate:,.0f} interactions/s  "
        f"({n:,} in {seconds:.2f} s from the logger's readiness)"
    )
    print(
        "  CPU per interaction: "
        + ", ".join(f"{k} {v / n * 1e6:.1f} µs" for k, v in cpu.items())
        + f"; {sum(cpu.values()) / seconds:.2f} of this machine's {os.cpu_count()} cores busy"
    )
    return rate


def verdict(name: str, rate: float) -> str:
    if rate >= GOAL:
        return f"{name}: {rate:,.0f}/s, meets the goal of {GOAL:,}/s (+{rate / GOAL - 1:.0%})"
    return f"{name}: {rate:,.0f}/s, {GOAL - rate:,.0f}/s short of the goal of {GOAL:,}/s ({rate / GOAL:.0%} of it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--records", type=int, default=500_000, help="end-to-end records")
    parser.add_argument("--sink-records", type=int, default=200_000)
    parser.add_argument("--python-records", type=int, default=50_000)
    parser.add_argument("--batch-rows", type=int, default=LoggerConfig().max_batch_rows)
    parser.add_argument("--lanes", type=int, default=LoggerConfig().insert_lanes)
    parser.add_argument("--json", type=Path, help="also write the figures here as a flat JSON object")
    args = parser.parse_args()
    codec = AvroCodec()
    with tempfile.TemporaryDirectory(prefix="bench-logger-") as tmp:
        home = Path(tmp)
        settings = Settings(
            home=home / "stack",
            kafka_bootstrap=f"127.0.0.1:{free_port()}",
            clickhouse_url=f"http://127.0.0.1:{free_port()}",
        )
        manager = ProcessManager(settings.run_dir, settings.log_dir)
        pids = {
            "broker": manager.start(TansuBroker.from_settings(settings), 60),
            "clickhouse": manager.start(ClickHouseEndpoint.from_settings(settings), 60),
        }
        try:
            sink = bench_sink(settings, codec, args.sink_records, args.batch_rows, args.lanes, pids["clickhouse"])
            python_path = bench_python_path(settings, codec, args.python_records)
            e2e = bench_end_to_end(settings, codec, args.records, args.batch_rows, args.lanes, pids, home)
        finally:
            manager.stop("clickhouse")
            manager.stop("broker")
    print()
    print(verdict("sink alone", sink))
    print(verdict("end to end", e2e))
    if args.json:
        figures = {"sink_rows_s": sink, "python_path_rows_s": python_path, "end_to_end_per_s": e2e,
                   "records": args.records, "batch_rows": args.batch_rows, "lanes": args.lanes}  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
