"""Insert throughput of the local stack's ClickHouse endpoint versus chDB in-process.

Starts its own endpoint (``ClickHouseEndpoint`` on a free loopback port, a temporary home) and opens a separate
chDB data directory in this process, builds N rows of typical columns (String, LowCardinality(String),
DateTime64(3), Float64, UInt32) and inserts the same rows, best of R runs each, into a fresh MergeTree table:

* in-process chDB: ``INSERT ... SELECT * FROM Python(df)`` (chDB's fastest path from Python data) and a
  streaming insert of the same rows already encoded as Native (the bytes a client sends);
* through the endpoint with clickhouse-connect: ``insert_df`` (pandas), ``insert`` (column lists, the path
  services use) and ``raw_insert`` of the same Native bytes (what the endpoint itself costs).

It prints rows/s for each and the ratios: each endpoint path against in-process Python(df), and the Native
pass-through against in-process Native (the endpoint's own overhead), plus the CPU time each used (this
process and the endpoint's): on a small shared machine wall time swings with other load, CPU time much less.
Goal: the endpoint keeps >= 60 % of in-process speed.

    python benchmarks/bench_clickhouse.py --rows 1000000 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.core.clickhouse import client  # noqa: E402
from services.core.settings import Settings  # noqa: E402
from services.stack.clickhouse_endpoint import ClickHouseEndpoint  # noqa: E402
from services.stack.clickhouse_endpoint.policy import Policy  # noqa: E402
from services.stack.process import ProcessManager, free_port  # noqa: E402

# Pause before each timed run: the previous run's table was just dropped and its parts' background merges
# (on either side) would otherwise be counted against whichever method runs next.
SETTLE_S = 0.3
COLUMNS = ["request_id", "agent", "received_at", "score", "tokens"]
TABLE_DDL = (
    "(request_id String, agent LowCardinality(String), received_at DateTime64(3, 'UTC'), score Float64,"
    " tokens UInt32) ENGINE = MergeTree ORDER BY (agent, received_at)"
)


def make_rows(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    agents = np.array([f"agent-{i}" for i in range(12)], dtype=object)
    return pd.DataFrame(
        {
            "request_id": [f"req-{i:09d}-{'x' * (i % 23)}" for i in range(rows)],
            "agent": agents[rng.integers(0, len(agents), rows)],
            "received_at": pd.to_datetime(1_700_000_000_000 + np.arange(rows) * 7, unit="ms"),
            "score": rng.random(rows),
            "tokens": rng.integers(0, 4000, rows).astype(np.uint32),
        }
    )


@dataclass
class Method:
    name: str
    reset: Callable[[], None]  # a fresh empty table (not timed)
    run: Callable[[], Any]


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) used so far by this process and, if given, the endpoint's process."""
    used = time.process_time()
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return used


def measure(methods: list[Method], repeat: int, endpoint_pid: int | None) -> dict[str, tuple[float, float]]:
    """(best wall seconds, least CPU seconds) per method. Rounds interleave the methods, so load from other
    processes on the machine affects each of them alike instead of whichever ran during a busy second. CPU
    time (client plus endpoint) shows the work done, which contention for the cores does not change."""
    best = {m.name: (float("inf"), float("inf")) for m in methods}
    for _ in range(repeat):
        for method in methods:
            method.reset()
            time.sleep(SETTLE_S)
            cpu, started = cpu_seconds(endpoint_pid), time.perf_counter()
            method.run()
            wall, cpu = time.perf_counter() - started, cpu_seconds(endpoint_pid) - cpu
            best[method.name] = (min(best[method.name][0], wall), min(best[method.name][1], cpu))
    return best


def in_process_methods(conn: Any, df: pd.DataFrame) -> tuple[list[Method], bytes]:
    """chDB in this process (its own data directory), and the rows as Native bytes of the table's types."""
    # The endpoint's settings profile here too, so both sides squash inserts into parts the same way.
    conn.query("SET " + ", ".join(f"{name} = {value}" for name, value in Policy().profile().items()))

    def reset() -> None:
        conn.query("DROP TABLE IF EXISTS bench")
        conn.query(f"CREATE TABLE bench {TABLE_DDL}")

    def insert_frame() -> None:
        # chDB's Python() table function finds the DataFrame by its variable name (`df`) up the call stack.
        conn.query("INSERT INTO bench SELECT * FROM Python(df)")

    def insert_native() -> None:
        inserter = conn.send_insert("INSERT INTO bench", "Native")
        for start in range(0, len(native), 1 << 20):  # fed in pieces, as the endpoint receives them
            inserter.append(native[start : start + (1 << 20)])
        inserter.finish()

    reset()
    insert_frame()
    native = conn.query("SELECT * FROM bench", "Native").bytes()
    return [
        Method("chdb Python(DataFrame)", reset, insert_frame),
        Method("chdb send_insert(Native)", reset, insert_native),
    ], native


def endpoint_methods(ch: Any, df: pd.DataFrame, native: bytes) -> list[Method]:
    """clickhouse-connect through the endpoint."""

    def reset() -> None:
        ch.command("DROP TABLE IF EXISTS bench")
        ch.command(f"CREATE TABLE bench {TABLE_DDL}")

    columns = [df[name].tolist() for name in COLUMNS]
    columns[2] = df["received_at"].dt.to_pydatetime().tolist()
    return [
        Method("endpoint raw_insert(Native)", reset, lambda: ch.raw_insert("bench", COLUMNS, native, fmt="Native")),
        Method("endpoint insert_df", reset, lambda: ch.insert_df("bench", df)),
        Method(
            "endpoint insert (column lists)",
            reset,
            lambda: ch.insert("bench", columns, column_names=COLUMNS, column_oriented=True),
        ),
    ]


def run_benchmark(df: pd.DataFrame, tmp: Path, repeat: int) -> dict[str, tuple[float, float]]:
    import chdb

    settings = Settings(home=tmp / "home", clickhouse_url=f"http://127.0.0.1:{free_port()}")
    manager = ProcessManager(settings.run_dir, settings.log_dir)
    endpoint = ClickHouseEndpoint.from_settings(settings)
    pid = manager.start(endpoint, 60)
    conn = chdb.connect(str(tmp / "in-process"))
    try:
        ch = client(settings, ensure_database=True)
        local, native = in_process_methods(conn, df)
        times = measure([*local, *endpoint_methods(ch, df, native)], repeat, pid)
        count = ch.command("SELECT count() FROM bench")
        if count != len(df):
            raise SystemExit(f"the endpoint's table holds {count} rows, expected {len(df)}")
        ch.close()
        return times
    finally:
        conn.close()
        manager.stop(endpoint.name)


def report(rows: int, times: dict[str, tuple[float, float]]) -> dict[str, float]:
    base = times["chdb Python(DataFrame)"][0]
    native, native_cpu = times["chdb send_insert(Native)"]
    print(f"\n{rows:,} rows; best wall time and least CPU time (client + endpoint) of the runs:")
    print(f"  {'method':32} {'wall s':>7} {'rows/s':>11} {'CPU s':>6}  wall vs in-process")
    for name, (seconds, cpu) in times.items():
        ratio = "" if name.startswith("chdb") else f"{base / seconds:4.0%} of Python(df)"
        if name == "endpoint raw_insert(Native)":
            ratio += f", {native / seconds:.0%} of in-process Native"
        print(f"  {name:32} {seconds:7.3f} {rows / seconds:11,.0f} {cpu:6.2f}  {ratio}")
    client_paths = ("endpoint insert_df", "endpoint insert (column lists)")
    best_client = min(times[k][0] for k in client_paths)
    passthrough, passthrough_cpu = times["endpoint raw_insert(Native)"]
    print(f"\nendpoint, best clickhouse-connect path: {base / best_client:.0%} of in-process speed (goal >= 60 %)")
    print(
        f"endpoint, same Native bytes: {native / passthrough:.0%} of in-process speed; "
        f"CPU {passthrough_cpu:.2f} s vs {native_cpu:.2f} s in-process (the endpoint's own cost is the difference)"
    )
    figures = {f"{_key(name)}_rows_s": rows / seconds for name, (seconds, _cpu) in times.items()}
    return {
        **figures,
        "native_passthrough_ratio": native / passthrough,  # endpoint raw Native vs in-process Native (goal)
        "best_client_ratio": base / best_client,  # best clickhouse-connect path vs in-process Python(df)
        "passthrough_cpu_s": passthrough_cpu,
        "in_process_native_cpu_s": native_cpu,
        "rows": rows,
    }


def _key(method: str) -> str:
    """A method's name as a JSON key: ``endpoint raw_insert(Native)`` -> ``endpoint_raw_insert_native``."""
    return "_".join("".join(c if c.isalnum() else " " for c in method.lower()).split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here as a flat JSON object (name -> number)")
    args = parser.parse_args()
    started = time.perf_counter()
    df = make_rows(args.rows)
    with tempfile.TemporaryDirectory(prefix="bench-clickhouse-") as tmp:
        times = run_benchmark(df, Path(tmp), args.repeat)
    figures = report(args.rows, times)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    print(f"(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
