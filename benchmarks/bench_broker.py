"""Broker throughput: produce and consume messages/s of 1 KB records with confluent-kafka.

Starts its own local broker on a free port unless --bootstrap points at a running one.
    python benchmarks/bench_broker.py [--messages 200000] [--bootstrap host:port]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid

from confluent_kafka import Consumer, Producer

from services.core.kafka import confluent_consumer_config
from services.core.settings import Settings
from services.core.topics import TopicSpec, ensure_topics
from services.stack.broker import TansuBroker
from services.stack.process import ProcessManager, free_port


def run(settings: Settings, messages: int, size: int) -> dict[str, float]:
    topic = TopicSpec(f"bench.{uuid.uuid4().hex[:8]}", None, 4, "none")
    ensure_topics(settings, extra=[topic])
    payload = os.urandom(size)
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
            "acks": "all",
        }
    )
    t0 = time.perf_counter()
    for i in range(messages):
        while True:
            try:
                producer.produce(topic.name, payload, key=str(i % 1000).encode())
                break
            except BufferError:
                producer.poll(0.01)
        if i % 10_000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    produce_s = time.perf_counter() - t0
    assert left == 0, f"{left} messages not delivered"

    consumer = Consumer(
        confluent_consumer_config(settings, f"bench-{uuid.uuid4().hex[:6]}", **{"fetch.max.bytes": 50_000_000})
    )
    consumer.subscribe([topic.name])
    got = 0
    t_first = None
    deadline = time.monotonic() + 300
    while got < messages and time.monotonic() < deadline:
        batch = consumer.consume(10_000, timeout=1.0)
        if batch and t_first is None:
            t_first = time.perf_counter()
        got += sum(1 for m in batch if not m.error())
    consume_s = time.perf_counter() - (t_first or time.perf_counter())
    consumer.close()
    mb = messages * size / 1e6
    print(f"broker: {settings.kafka_bootstrap}  messages: {messages} x {size} B  partitions: {topic.partitions}")
    print(f"produce: {messages / produce_s:,.0f} msg/s  ({mb / produce_s:,.1f} MB/s, acks=all)")
    print(f"consume: {got / consume_s:,.0f} msg/s  ({got * size / 1e6 / consume_s:,.1f} MB/s; {got} read)")
    return {"produce_msg_s": messages / produce_s, "consume_msg_s": got / consume_s, "messages": messages, "size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--bootstrap")
    parser.add_argument("--json", help="also write the figures here as a flat JSON object (name -> number)")
    args = parser.parse_args()
    if args.bootstrap:
        figures = run(Settings(kafka_bootstrap=args.bootstrap), args.messages, args.size)
    else:
        with tempfile.TemporaryDirectory() as home:
            settings = Settings(home=home, kafka_bootstrap=f"127.0.0.1:{free_port()}")
            manager = ProcessManager(settings.run_dir, settings.log_dir)
            manager.start(TansuBroker.from_settings(settings), 60)
            try:
                figures = run(settings, args.messages, args.size)
            finally:
                manager.stop("broker")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
