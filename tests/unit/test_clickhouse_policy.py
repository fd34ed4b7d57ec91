"""The ClickHouse endpoint's query policy and limits, and the SQL lexer under them. Pure logic: no engine."""

from __future__ import annotations

import gzip
import io

import pytest

from services.core.sql_lexer import code_tokens, split_statements
from services.stack.clickhouse_endpoint.cli import unsafe_bind
from services.stack.clickhouse_endpoint.codecs import decode_body, decode_native_blocks
from services.stack.clickhouse_endpoint.errors import ClickHouseError
from services.stack.clickhouse_endpoint.limits import Limits
from services.stack.clickhouse_endpoint.policy import Policy
from services.stack.clickhouse_endpoint.request import RequestBody

POLICY = Policy(Limits(max_execution_time_s=60, max_threads=4))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        "select * from FILE('/etc/passwd')",
        "SELECT * FROM `file`('/etc/passwd')",
        "SELECT * FROM \"url\"('http://example.com', CSV)",
        "SELECT file('/etc/passwd')",
        "SELECT * FROM s3('https://bucket/x')",
        "SELECT * FROM remote('10.0.0.1', db.t)",
        "SELECT * FROM executable('ls', TSV, 'x String')",
        "SELECT * FROM python('x')",
        "SELECT * FROM /* hidden? */ url ('http://x', CSV)",
        "INSERT INTO FUNCTION file('/tmp/x.csv', CSV) SELECT 1",
        "SELECT 1 INTO OUTFILE '/tmp/x'",
        "INSERT INTO t FROM INFILE '/etc/passwd' FORMAT CSV",
        "CREATE TABLE t (a String) ENGINE = File(CSV, '/tmp/x')",
        "CREATE TABLE t (a String) ENGINE=URL('http://x', CSV)",
        "CREATE DATABASE d ENGINE = Filesystem('/')",
        "CREATE TABLE t (a UInt8) ENGINE = Distributed(c, db, t)",
        "CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(FILE(path '/etc/passwd' format 'TSV')) "
        "LAYOUT(FLAT()) LIFETIME(0)",
        "CREATE DICTIONARY d (k UInt64) PRIMARY KEY k SOURCE(CLICKHOUSE(HOST 'evil' TABLE 't')) "
        "LAYOUT(FLAT()) LIFETIME(0)",
        "BACKUP TABLE t TO File('/tmp/b')",
        "RESTORE TABLE t FROM Disk('default', 'b')",
        "ATTACH TABLE t FROM '/var/lib/x' (a UInt8) ENGINE = Log",
        "SYSTEM SHUTDOWN",
        "SELECT * FROM {f:Identifier}('/etc/passwd')",
    ],
)
def test_queries_that_reach_files_hosts_or_programs_are_denied(sql: str) -> None:
    with pytest.raises(ClickHouseError) as err:
        POLICY.check(sql)
    assert err.value.code == 497 and err.value.status == 403
    assert "disabled on this endpoint" in err.value.text or "cannot name a function" in err.value.text


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count() FROM flywheel.interactions WHERE agent_id = 'file(x)' -- url('y')",
        "SELECT * FROM numbers(10)",
        "SELECT format('{} {}', 'a', 'b'), file_name FROM t",
        "CREATE TABLE IF NOT EXISTS t (a UInt8, url String) ENGINE = ReplacingMergeTree ORDER BY a",
        "CREATE TABLE t2 (a UInt8) ENGINE = Memory",
        "CREATE DATABASE IF NOT EXISTS flywheel",
        "CREATE DATABASE d ENGINE = Atomic",
        "INSERT INTO t SELECT number FROM numbers(3)",
        "SELECT 1 FORMAT JSON SETTINGS max_threads = 2, max_execution_time = 30;",
        "SELECT name FROM system.tables WHERE engine = 'File'",
        "SELECT 'a;b'; ",
    ],
)
def test_ordinary_queries_pass(sql: str) -> None:
    POLICY.check(sql)


def test_multi_statements_are_refused_as_clickhouse_does() -> None:
    with pytest.raises(ClickHouseError) as err:
        POLICY.check("SELECT 1; INSERT INTO t VALUES (1)")
    assert err.value.code == 62 and "Multi-statements" in err.value.text


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 SETTINGS max_execution_time = 0",
        "SELECT 1 SETTINGS max_execution_time = 3600",
        "SET max_execution_time = DEFAULT",
        "SET max_threads = 64",
        "SELECT 1 SETTINGS max_threads = '100'",
    ],
)
def test_limits_hold_wherever_a_query_sets_them(sql: str) -> None:
    with pytest.raises(ClickHouseError) as err:
        POLICY.check(sql)
    assert err.value.code == 452 and err.value.status == 400


def test_url_settings_are_held_to_the_limits_and_the_profile_sets_them() -> None:
    POLICY.check_settings({"max_threads": "1", "max_execution_time": "10", "readonly": "1"})
    with pytest.raises(ClickHouseError, match="max_execution_time"):
        POLICY.check_settings({"max_execution_time": "0"})
    profile = POLICY.profile()
    assert profile["max_execution_time"] == "60" and 1 <= int(profile["max_threads"]) <= 4


def test_a_body_over_the_limit_is_refused_before_it_is_read() -> None:
    body = RequestBody(io.BytesIO(b"x" * 100), 100, chunked=False, limit=10)
    with pytest.raises(ClickHouseError) as err:
        body.check_size()
    assert err.value.status == 413 and not body.drain()  # not drained: the connection is closed instead
    chunked = RequestBody(io.BytesIO(b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"), None, True, limit=15)
    with pytest.raises(ClickHouseError, match="at most 15 bytes"):
        b"".join(chunked.pieces())


def test_a_decompression_bomb_is_refused() -> None:
    bomb = gzip.compress(b"\0" * (64 << 20))
    with pytest.raises(ClickHouseError) as err:
        for _ in decode_body(iter([bomb]), "gzip", max_ratio=100):
            pass
    assert err.value.code == 229 and "decompression bomb" in err.value.text
    # A native block that declares a size far past the ratio is refused before it is decompressed.
    header = bytes(16) + bytes([0x82]) + (9 + 10).to_bytes(4, "little") + (1 << 30).to_bytes(4, "little")
    with pytest.raises(ClickHouseError, match="decompression bomb"):
        list(decode_native_blocks(iter([header + bytes(10)]), max_ratio=100))


def test_without_a_password_only_loopback_is_served() -> None:
    assert unsafe_bind("127.0.0.1", None) is None and unsafe_bind("localhost", None) is None
    assert unsafe_bind("::1", None) is None and unsafe_bind("0.0.0.0", "secret") is None
    refusal = unsafe_bind("0.0.0.0", None)
    assert refusal is not None and "FLYWHEEL_CLICKHOUSE_PASSWORD" in refusal


def test_the_lexer_keeps_literals_and_comments_whole() -> None:
    kinds = [(t.kind, t.name) for t in code_tokens("SELECT `a b`, 'c''d', \"e\" -- f(\n/* g( */ FROM h")]
    assert kinds == [
        ("word", "select"),
        ("ident", "a b"),
        ("punct", ","),
        ("string", "'c''d'"),
        ("punct", ","),
        ("ident", "e"),
        ("word", "from"),
        ("word", "h"),
    ]
    assert split_statements("SELECT ';' ; /* x; */ SELECT 2;") == ["SELECT ';'", "/* x; */ SELECT 2"]
