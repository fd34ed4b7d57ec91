"""The local stack's ClickHouse endpoint (chDB behind ClickHouse's HTTP interface), used as clients use it:
clickhouse-connect through ``services.core.clickhouse.client`` and curl, plus the migrations."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from pydantic import SecretStr

from services.core.clickhouse import (
    ClickHouseError,
    ClickHouseUnavailable,
    MigrationError,
    apply_migrations,
    client,
    load_migrations,
)
from services.core.settings import Settings
from services.stack.clickhouse_endpoint import ClickHouseEndpoint
from services.stack.process import ProcessManager, StackError, free_port

pytestmark = pytest.mark.integration

CURL = shutil.which("curl")


@pytest.fixture(scope="module")
def ch(clickhouse: ClickHouseEndpoint, settings: Settings) -> Iterator[Client]:
    conn = client(settings, ensure_database=True)
    yield conn
    conn.close()


@pytest.fixture
def table(ch: Client) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    ch.command(
        f"CREATE TABLE {name} (id UInt32, name String, kind LowCardinality(String), ts DateTime64(3, 'UTC'),"
        " score Nullable(Float64)) ENGINE = MergeTree ORDER BY id"
    )
    yield name
    ch.command(f"DROP TABLE IF EXISTS {name}")


def _rows(n: int) -> list[list]:
    base = dt.datetime(2024, 5, 1, 12, 30, 15, 123000)
    kinds = ("support", "billing", "sales")
    return [
        [i, f"name-{i}", kinds[i % 3], base + dt.timedelta(milliseconds=i), None if i % 7 == 0 else i / 4]
        for i in range(n)
    ]


def _curl(clickhouse: ClickHouseEndpoint, *args: str, path: str = "/") -> tuple[int, str]:
    """(HTTP status, body) of one curl call on the endpoint."""
    assert CURL, "curl is needed for these tests"
    out = subprocess.run(
        [CURL, "-sS", "-g", "-w", "\n%{http_code}", *args, f"http://{clickhouse.host}:{clickhouse.port}{path}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, status = out.stdout.rpartition("\n")
    return int(status), body


# clickhouse-connect ------------------------------------------------------------------------------------------


def test_insert_100k_rows_and_read_them_back(ch: Client, table: str) -> None:
    rows = _rows(100_000)
    summary = ch.insert(table, rows, column_names=["id", "name", "kind", "ts", "score"])
    assert summary.written_rows == 100_000
    count, kinds, nulls, total = ch.query(
        f"SELECT count(), uniqExact(kind), countIf(score IS NULL), sum(id) FROM {table}"
    ).result_rows[0]
    assert (count, kinds, nulls, total) == (100_000, 3, len(range(0, 100_000, 7)), sum(range(100_000)))
    back = ch.query(f"SELECT id, name, kind, ts, score FROM {table} WHERE id IN (0, 1, 99999) ORDER BY id")
    assert [list(r) for r in back.result_rows] == [rows[0], rows[1], rows[99_999]]


def test_types_round_trip_datetime64_lowcardinality_nullable(ch: Client, table: str) -> None:
    ts = dt.datetime(2030, 12, 31, 23, 59, 59, 999000)
    ch.insert(
        table,
        [[1, "ü ☃ \t tab", "x", ts, None], [2, "", "y", ts, 1.5]],
        column_names=["id", "name", "kind", "ts", "score"],
    )
    result = ch.query(f"SELECT * FROM {table} ORDER BY id")
    assert result.result_rows == [(1, "ü ☃ \t tab", "x", ts, None), (2, "", "y", ts, 1.5)]
    types = dict(zip(result.column_names, (t.name for t in result.column_types), strict=True))
    assert types["kind"] == "LowCardinality(String)" and types["score"] == "Nullable(Float64)"
    assert types["ts"] == "DateTime64(3, 'UTC')"


def test_parameters_bound_by_the_server_and_by_the_client(ch: Client, table: str) -> None:
    ch.insert(table, _rows(50), column_names=["id", "name", "kind", "ts", "score"])
    server = ch.query(f"SELECT name FROM {table} WHERE id = {{x:UInt32}}", parameters={"x": 7})  # param_x
    client_side = ch.query(f"SELECT name FROM {table} WHERE id = %(x)s", parameters={"x": 8})  # formatted here
    assert server.result_rows == [("name-7",)] and client_side.result_rows == [("name-8",)]
    tricky = 'it\'s a "quote", a \\ backslash,\ta tab\nand a newline'
    assert ch.query("SELECT {s:String}", parameters={"s": tricky}).result_rows == [(tricky,)]
    since = dt.datetime(2024, 5, 1, 12, 30, 15, 140000)
    assert ch.command(f"SELECT count() FROM {table} WHERE ts >= {{t:DateTime64(3)}}", parameters={"t": since}) == 33


def test_long_parameters_sent_as_a_multipart_form(settings: Settings, clickhouse: ClickHouseEndpoint) -> None:
    form = client(settings, form_encode_query_params=True)
    try:
        ids = list(range(5000))
        assert form.command("SELECT length({ids:Array(UInt32)})", parameters={"ids": ids}) == 5000
    finally:
        form.close()


def test_errors_carry_clickhouse_text(ch: Client) -> None:
    with pytest.raises(DatabaseError, match="Unknown table") as info:
        ch.query("SELECT * FROM no_such_table_here")
    assert info.value.code == 60 and "no_such_table_here" in str(info.value)
    with pytest.raises(DatabaseError, match="SYNTAX_ERROR"):
        ch.command("SELEC 1")
    assert isinstance(info.value, ClickHouseError)  # what the CLI catches


def test_streamed_results_and_an_error_after_the_first_block(ch: Client) -> None:
    with ch.query_row_block_stream("SELECT number, toString(number) FROM numbers(300000)") as stream:
        assert sum(len(block) for block in stream) == 300_000
    with (
        pytest.raises(Exception, match=r"throwIf|395"),
        ch.query_row_block_stream(
            "SELECT throwIf(number = 250000) FROM numbers(400000) SETTINGS max_block_size = 65536"
        ) as stream,
    ):
        for _ in stream:
            pass
    assert ch.command("SELECT 42") == 42  # the endpoint (and the pooled chDB connection) carry on


def test_compressed_requests_and_responses(settings: Settings, clickhouse: ClickHouseEndpoint, table: str) -> None:
    rows = _rows(20_000)
    for method in ("lz4", "zstd", "gzip"):
        conn = client(settings, compress=method)
        try:
            conn.command(f"TRUNCATE TABLE {table}")
            conn.insert(table, rows, column_names=["id", "name", "kind", "ts", "score"])
            assert conn.query(f"SELECT count(), max(id) FROM {table}").result_rows == [(20_000, 19_999)], method
        finally:
            conn.close()


def test_settings_apply_to_one_request_only(ch: Client) -> None:
    baseline = ch.command("SELECT getSetting('max_threads')")
    assert ch.command("SELECT getSetting('max_threads')", settings={"max_threads": 1}) == 1
    assert ch.command("SELECT getSetting('max_threads')") == baseline
    with pytest.raises(DatabaseError, match=r"TOO_MANY_ROWS|Limit for result exceeded"):
        ch.query("SELECT number FROM numbers(10)", settings={"max_result_rows": 2, "result_overflow_mode": "throw"})
    assert len(ch.query("SELECT number FROM numbers(10)").result_rows) == 10


def test_concurrent_queries_share_one_client(ch: Client) -> None:
    # Sessionless clients may be shared by threads; the endpoint runs their queries on pooled chDB connections.
    def work(i: int) -> int:
        return sum(ch.command(f"SELECT sum(number) FROM numbers({i * 1000 + k})") for k in range(10))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [sum(n * (n - 1) // 2 for n in range(i * 1000, i * 1000 + 10)) for i in range(16)]


def test_a_session_keeps_its_temporary_tables(settings: Settings, clickhouse: ClickHouseEndpoint, ch: Client) -> None:
    session = client(settings, session_id=f"s-{uuid.uuid4().hex}")
    try:
        session.command("CREATE TEMPORARY TABLE scratch (a UInt8)")
        session.command("INSERT INTO scratch VALUES (1), (2)")
        assert session.command("SELECT sum(a) FROM scratch") == 3
        with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
            ch.command("SELECT sum(a) FROM scratch")  # not outside the session
    finally:
        session.close()


def test_data_survives_an_endpoint_restart(
    ch: Client, table: str, clickhouse: ClickHouseEndpoint, stack_manager: ProcessManager, settings: Settings
) -> None:
    ch.insert(table, _rows(1000), column_names=["id", "name", "kind", "ts", "score"])
    stack_manager.stop(clickhouse.name)
    assert not clickhouse.ready()
    stack_manager.start(clickhouse, settings.stack_start_timeout_s)
    again = client(settings)
    try:
        assert again.command(f"SELECT count() FROM {table}") == 1000
        # Migrations re-checked after the restart: each recorded once, none again.
        assert again.command("SELECT count() FROM schema_migrations") == len(load_migrations())
    finally:
        again.close()


def test_unreachable_url_is_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClickHouseUnavailable, match=url):
        client(Settings(clickhouse_url=url))


# curl --------------------------------------------------------------------------------------------------------


def test_curl_ping_get_and_post(clickhouse: ClickHouseEndpoint) -> None:
    assert _curl(clickhouse, path="/ping") == (200, "Ok.\n")
    assert _curl(clickhouse, path="/?query=SELECT+1") == (200, "1\n")
    status, body = _curl(clickhouse, "--data-binary", "SELECT number, 'a' FROM numbers(2)")
    assert (status, body) == (200, "0\ta\n1\ta\n")  # TabSeparated, ClickHouse's default format
    status, body = _curl(
        clickhouse, "--data-binary", "SELECT {x:UInt8} * 2 AS y FORMAT JSONEachRow", path="/?param_x=21"
    )
    assert (status, json.loads(body)) == (200, {"y": 42})


def test_curl_insert_json_each_row_and_gzip_body(
    clickhouse: ClickHouseEndpoint, ch: Client, table: str, tmp_path: Path
) -> None:
    table = f"{ch.database}.{table}"
    rows = '{"id": 1, "name": "a", "kind": "k", "ts": "2024-01-01 00:00:00.5", "score": null}\n' * 3
    status, body = _curl(clickhouse, "--data-binary", rows, path=f"/?query=INSERT+INTO+{table}+FORMAT+JSONEachRow")
    assert (status, body) == (200, "")
    status, _ = _curl(clickhouse, "--data-binary", f"INSERT INTO {table} FORMAT JSONEachRow\n{rows}")
    assert status == 200
    packed = tmp_path / "rows.tsv.gz"
    packed.write_bytes(gzip.compress(b"2\tb\tk\t2024-01-01 00:00:01\t0.5\n"))
    status, _ = _curl(
        clickhouse,
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        f"@{packed}",
        path=f"/?query=INSERT+INTO+{table}+FORMAT+TSV",
    )
    assert status == 200
    assert ch.query(f"SELECT id, count() FROM {table} GROUP BY id ORDER BY id").result_rows == [(1, 6), (2, 1)]


def test_curl_errors_are_4xx_with_clickhouse_text(clickhouse: ClickHouseEndpoint) -> None:
    status, body = _curl(clickhouse, "--data-binary", "SELECT * FROM no_such_table")
    assert status == 404 and body.startswith("Code: 60. DB::Exception:") and "no_such_table" in body
    status, body = _curl(clickhouse, path="/?query=SELEC+1")
    assert status == 400 and "SYNTAX_ERROR" in body
    status, body = _curl(clickhouse, path="/?query=CREATE+TABLE+nope+(a+UInt8)+ENGINE=Memory")
    assert "Code: 164" in body and "readonly" in body  # GET is read-only, as on ClickHouse


def test_curl_headers(clickhouse: ClickHouseEndpoint) -> None:
    assert CURL
    out = subprocess.run(
        [
            CURL,
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            f"http://{clickhouse.host}:{clickhouse.port}/?query=SELECT+1&query_id=q-42",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.lower()
    for header in ("x-clickhouse-summary:", "x-clickhouse-format: tabseparated", "x-clickhouse-query-id: q-42"):
        assert header in out
    assert "x-clickhouse-timezone:" in out and "x-clickhouse-server-display-name:" in out


# probes: what the endpoint refuses ------------------------------------------------------------------------------


def test_files_hosts_and_programs_are_out_of_reach(clickhouse: ClickHouseEndpoint) -> None:
    for sql in (
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
        "SELECT 1 INTO OUTFILE '/tmp/flywheel-probe.txt'",
        "CREATE TABLE probe (a String) ENGINE = File(CSV, '/tmp/flywheel-probe.csv')",
    ):
        status, body = _curl(clickhouse, "--data-binary", sql)
        assert status == 403 and "Code: 497" in body and "disabled on this endpoint" in body, (sql, body)
    assert not Path("/tmp/flywheel-probe.txt").exists()


def test_get_is_read_only_in_the_engine(clickhouse: ClickHouseEndpoint, ch: Client, table: str) -> None:
    name = f"{ch.database}.{table}"
    status, body = _curl(clickhouse, "--get", "--data-urlencode", f"query=INSERT INTO {name} (id) VALUES (1)")
    assert status == 403 and "Code: 164" in body  # the engine's readonly, not a keyword list
    status, body = _curl(clickhouse, "--get", "--data-urlencode", f"query=REPLACE TABLE {name} AS SELECT 1 AS a")
    assert "Code: 164" in body or "Code: 497" in body
    status, body = _curl(clickhouse, "--get", "--data-urlencode", "query=SELECT 1 SETTINGS readonly = 0")
    assert "Code: 164" in body  # readonly cannot be lifted by the query
    status, body = _curl(clickhouse, "--get", "--data-urlencode", f"query=SELECT 1; INSERT INTO {name} (id) VALUES (1)")
    assert status == 400 and "Multi-statements" in body
    assert ch.command(f"SELECT count() FROM {name}") == 0
    assert _curl(clickhouse, "--get", "--data-urlencode", "query=SELECT 1 SETTINGS max_threads = 1") == (200, "1\n")


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseEndpoint]:
    """An endpoint with small limits, to reach each one."""
    home = tmp_path_factory.mktemp("tight")
    settings = Settings(
        home=home,
        clickhouse_url=f"http://127.0.0.1:{free_port()}",
        clickhouse_max_body_mb=1,
        clickhouse_max_sessions=2,
        clickhouse_max_concurrent_queries=1,
        clickhouse_max_execution_time_s=1,
    )
    manager = ProcessManager(settings.run_dir, settings.log_dir)
    endpoint = ClickHouseEndpoint.from_settings(settings)
    manager.start(endpoint, settings.stack_start_timeout_s)
    yield endpoint
    manager.stop(endpoint.name)


def test_limits_are_refused_with_clickhouse_errors(tight: ClickHouseEndpoint, tmp_path: Path) -> None:
    big = tmp_path / "big.tsv"
    big.write_bytes(b"1\n" * (1 << 20))
    status, body = _curl(tight, "--data-binary", f"@{big}", path="/?query=INSERT+INTO+t+FORMAT+TSV")
    assert status == 413 and "Code: 229" in body and "at most 1048576 bytes" in body
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip.compress(b"0\n" * (32 << 20)))  # ~100 kB that inflate to 64 MiB
    status, body = _curl(
        tight,
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        f"@{bomb}",
        path="/?query=INSERT+INTO+FUNCTION+null('a+UInt8')+FORMAT+TSV",
    )
    assert status == 413 and "decompression bomb" in body
    status, body = _curl(tight, "--data-binary", "SELECT count() FROM numbers(100000000000)")
    assert status == 408 and "TIMEOUT_EXCEEDED" in body
    status, body = _curl(tight, "--data-binary", "SELECT 1 SETTINGS max_execution_time = 0")
    assert status == 400 and "SETTING_CONSTRAINT_VIOLATION" in body
    for session in ("s1", "s2"):
        assert _curl(tight, "--data-binary", "SELECT 1", path=f"/?session_id={session}") == (200, "1\n")
    status, body = _curl(tight, "--data-binary", "SELECT 1", path="/?session_id=s3")
    assert status == 503 and "Too many open sessions" in body
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_curl, tight, "--data-binary", "SELECT sleep(0.9)")
        time.sleep(0.3)
        status, body = _curl(tight, "--data-binary", "SELECT 1")
        assert slow.result()[0] == 200
    assert status == 503 and "Too many simultaneous queries" in body


def test_no_password_no_public_bind(tmp_path: Path) -> None:
    public = Settings(home=tmp_path, clickhouse_url=f"http://0.0.0.0:{free_port()}")
    with pytest.raises(StackError, match="without a password"):
        ClickHouseEndpoint.from_settings(public).prepare()
    args = ["--data-dir", str(tmp_path / "d"), "--port", str(free_port()), "--host", "0.0.0.0"]
    out = subprocess.run(
        [sys.executable, "-m", "services.stack.clickhouse_endpoint", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "FLYWHEEL_CLICKHOUSE_PASSWORD"},
    )
    assert out.returncode == 2 and "without a password" in out.stderr


# a password ----------------------------------------------------------------------------------------------------


def test_password_protected_endpoint(tmp_path: Path) -> None:
    guarded = Settings(
        home=tmp_path,
        clickhouse_url=f"http://127.0.0.1:{free_port()}",
        clickhouse_user="flywheel",
        clickhouse_password=SecretStr("s3cret pw"),
    )
    manager = ProcessManager(guarded.run_dir, guarded.log_dir)
    endpoint = ClickHouseEndpoint.from_settings(guarded)
    assert "s3cret pw" not in " ".join(endpoint.command())
    manager.start(endpoint, guarded.stack_start_timeout_s)  # after_ready migrates with the password
    try:
        status, body = _curl(endpoint, path="/?query=SELECT+1")
        assert status == 403 and "Code: 516" in body and "AUTHENTICATION_FAILED" in body
        assert _curl(endpoint, "-u", "flywheel:s3cret pw", path="/?query=SELECT+1") == (200, "1\n")
        assert _curl(
            endpoint, "-H", "X-ClickHouse-User: flywheel", "-H", "X-ClickHouse-Key: s3cret pw", path="/?query=SELECT+2"
        ) == (200, "2\n")
        assert _curl(endpoint, path="/ping") == (200, "Ok.\n")  # health checks need no password
        good = client(guarded)
        assert good.command("SELECT count() FROM schema_migrations") == len(load_migrations())  # migrated
        good.close()
        with pytest.raises(DatabaseError, match="516"):
            clickhouse_connect.get_client(host="127.0.0.1", port=endpoint.port, username="flywheel", password="wrong")
        assert "s3cret pw" not in manager.log_file(endpoint.name).read_text()
    finally:
        manager.stop(endpoint.name)


# migrations ----------------------------------------------------------------------------------------------------


def test_migrations_apply_once_in_order_and_refuse_edits(
    settings: Settings, clickhouse: ClickHouseEndpoint, tmp_path: Path
) -> None:
    database = f"mig_{uuid.uuid4().hex[:8]}"
    conn = client(settings, database, ensure_database=True)
    try:
        (tmp_path / "0001_first.sql").write_text(
            "-- two statements in one file\nCREATE TABLE a (x UInt8) ENGINE = MergeTree ORDER BY x;\n"
            "INSERT INTO a VALUES (1), (2);\n"
        )
        (tmp_path / "0002_second.sql").write_text("CREATE TABLE b (s String) ENGINE = MergeTree ORDER BY s;")
        assert apply_migrations(conn, tmp_path) == ["0001_first.sql", "0002_second.sql"]
        assert apply_migrations(conn, tmp_path) == []  # a no-op the second time
        assert conn.command("SELECT sum(x) FROM a") == 3  # the INSERT did not run twice
        recorded = conn.query("SELECT version, name, length(checksum) FROM schema_migrations ORDER BY version")
        assert recorded.result_rows == [(1, "first", 64), (2, "second", 64)]

        (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (x UInt16) ENGINE = MergeTree ORDER BY x;")
        with pytest.raises(MigrationError, match=r"0001_first\.sql"):
            apply_migrations(conn, tmp_path)
    finally:
        conn.command(f"DROP DATABASE IF EXISTS {database}")
        conn.close()


def test_a_failing_migration_is_not_recorded(
    settings: Settings, clickhouse: ClickHouseEndpoint, tmp_path: Path
) -> None:
    database = f"mig_{uuid.uuid4().hex[:8]}"
    conn = client(settings, database, ensure_database=True)
    try:
        (tmp_path / "0001_bad.sql").write_text("CREATE TABLE c (x UInt8) ENGINE = MergeTree ORDER BY x;\nSELEC oops;")
        with pytest.raises(MigrationError, match=r"0001_bad\.sql: statement 2 of 2"):
            apply_migrations(conn, tmp_path)
        assert conn.command("SELECT count() FROM schema_migrations") == 0
        empty = tmp_path / "empty"
        empty.mkdir()
        assert apply_migrations(conn, empty) == []
    finally:
        conn.command(f"DROP DATABASE IF EXISTS {database}")
        conn.close()
