"""Probes against a running stack from outside (issue 14's goal): what each returns.

* the ClickHouse endpoint: a file() and a url() query, a GET with INSERT, an oversized body, a gzip bomb;
* 1,000 garbage records on flywheel.requests: how many dead letters, and whether the router still answers;
* a request with malformed ``tools``: the error response and how long it took;
* ``flywheel dlq list``: the dead letters as stored in ClickHouse.

    flywheel up && flywheel run router & flywheel run logger &   # or: a stack left by `flywheel demo`
    python benchmarks/probe_hardening.py [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.client import FlywheelClient
from services.core import topics
from services.core.clickhouse import client as ch_client
from services.core.kafka import create_producer
from services.core.records import ChatMessage, InferenceRequest
from services.core.settings import Settings


def http_probe(settings: Settings, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> dict:
    url = urlsplit(settings.clickhouse_url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 8123, timeout=60)
    started = time.perf_counter()
    try:
        conn.putrequest(method, path)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if "Content-Length" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            conn.send(body)
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace").strip()
        return {"status": resp.status, "answer": text[:220], "ms": round((time.perf_counter() - started) * 1000)}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": None, "answer": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def clickhouse_probes(settings: Settings) -> dict[str, dict]:
    bomb = gzip.compress(b"0\n" * (100 << 20))  # ~200 kB that inflate to 200 MiB
    return {
        "file()": http_probe(settings, "POST", "/", b"SELECT * FROM file('/etc/passwd', 'LineAsString')"),
        "url()": http_probe(settings, "POST", "/", b"SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')"),
        "GET with INSERT": http_probe(
            settings, "GET", "/?query=" + quote("INSERT INTO flywheel.interactions (request_id) VALUES ('x')")
        ),
        "oversized body (declared 600 MiB)": http_probe(
            settings, "POST", "/?query=" + quote("INSERT INTO t FORMAT TSV"), b"1\n", {"Content-Length": str(600 << 20)}
        ),
        f"gzip bomb ({len(bomb) >> 10} KiB -> 200 MiB)": http_probe(
            settings,
            "POST",
            "/?query=" + quote("INSERT INTO FUNCTION null('a UInt8') FORMAT TSV"),
            bomb,
            {"Content-Encoding": "gzip"},
        ),
    }


async def garbage_and_answers(settings: Settings, n: int = 1000) -> dict:
    producer = create_producer(settings)
    await producer.start()
    placed = set()
    try:
        for i in range(n):
            meta = await producer.send_and_wait(topics.REQUESTS.name, os.urandom(20 + i % 50), key=b"garbage")
            placed.add((meta.partition, meta.offset))
    finally:
        await producer.stop()
    started = time.perf_counter()
    ok = InferenceRequest(
        conversation_id=uuid.uuid4().hex,
        agent_id="support-bot",
        messages=[ChatMessage(role="user", content="My card has not arrived yet")],
    )
    bad_tools = InferenceRequest(
        conversation_id=uuid.uuid4().hex,
        agent_id="support-bot",
        messages=[ChatMessage(role="user", content="My card has not arrived yet")],
        tools="{not json",
    )
    async with FlywheelClient(settings) as client:
        good = await client.submit(ok, timeout_s=120)
        after_good = time.perf_counter() - started
        t0 = time.perf_counter()
        bad = await client.submit(bad_tools, timeout_s=30)
        bad_s = time.perf_counter() - t0
    # Dead letters of those offsets, as stored by the logger.
    ch = ch_client(settings)
    deadline = time.monotonic() + 120
    stored = 0
    try:
        while time.monotonic() < deadline:
            rows = ch.query(
                "SELECT source_partition, source_offset FROM dead_letters WHERE source_topic = 'flywheel.requests'"
            ).result_rows
            stored = len(placed & {(p, o) for p, o in rows})
            if stored >= n:
                break
            await asyncio.sleep(1)
    finally:
        ch.close()
    return {
        "garbage sent": n,
        "dead letters stored for them": stored,
        "a good request after them": {"served_by": good.served_by, "error": good.error, "s": round(after_good, 2)},
        "malformed tools": {"error": bad.error, "served_by": bad.served_by, "s": round(bad_s, 3)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    settings = Settings.load()
    out = {"clickhouse": clickhouse_probes(settings), "requests": asyncio.run(garbage_and_answers(settings))}
    listed = subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq", "list", "--topic", "requests", "--limit", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out["flywheel dlq list --topic requests --limit 3"] = listed.stdout.strip().splitlines()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
