"""Pure logic of the ClickHouse client module (migration files, statement splitting) and of the chDB endpoint
(request parsing, INSERT detection, body decoding, error mapping). No engine, no sockets."""

from __future__ import annotations

import base64
import gzip
import io
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import lz4.block
import lz4.frame
import pytest
from backports import zstd

from services.core.clickhouse import MigrationError, load_migrations, split_statements
from services.stack.clickhouse_endpoint.codecs import (
    ENCODERS,
    choose_encoding,
    content_type,
    decode_body,
    decode_native_blocks,
)
from services.stack.clickhouse_endpoint.errors import ClickHouseError, http_status
from services.stack.clickhouse_endpoint.request import RequestBody, parse_request
from services.stack.clickhouse_endpoint.statements import (
    body_insert_head,
    changes_connection_state,
    insert_head,
    is_read_only,
    is_select,
    output_format,
    split_statement,
)

# Statement splitting -----------------------------------------------------------------------------------------


def test_split_on_statement_ends() -> None:
    sql = "CREATE TABLE a (x UInt8) ENGINE = Memory;\n\nCREATE TABLE b (y String) ENGINE = Memory;\n"
    assert split_statements(sql) == [
        "CREATE TABLE a (x UInt8) ENGINE = Memory",
        "CREATE TABLE b (y String) ENGINE = Memory",
    ]


def test_semicolons_in_literals_comments_and_identifiers_do_not_split() -> None:
    sql = (
        "-- header; not a statement\n"
        "INSERT INTO t VALUES ('a;b', 'it''s; fine', 'back\\'slash;');\n"
        "/* block; comment */ SELECT `odd;name` FROM t # trailing; comment\n"
        ";"
    )
    statements = split_statements(sql)
    assert len(statements) == 2
    assert statements[0].endswith("VALUES ('a;b', 'it''s; fine', 'back\\'slash;')")
    assert "`odd;name`" in statements[1]


def test_comment_only_and_empty_statements_are_dropped() -> None:
    assert split_statements("-- nothing here\n;\n;  \n/* nor here */;") == []
    assert split_statements("SELECT 1") == ["SELECT 1"]


# Migration files ---------------------------------------------------------------------------------------------


def test_migrations_load_in_version_order(tmp_path: Path) -> None:
    (tmp_path / "0002_second.sql").write_text("SELECT 2;")
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "README.md").write_text("not a migration")
    migrations = load_migrations(tmp_path)
    assert [(m.version, m.name, m.filename) for m in migrations] == [
        (1, "first", "0001_first.sql"),
        (2, "second", "0002_second.sql"),
    ]
    assert len(migrations[0].checksum) == 64


def test_misnamed_or_duplicate_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"first\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "first.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_b\.sql.*0001_a\.sql"):
        load_migrations(tmp_path)


def test_missing_directory_has_no_migrations(tmp_path: Path) -> None:
    assert load_migrations(tmp_path / "absent") == []


# Endpoint: SQL shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("INSERT INTO t FORMAT Native", ("INSERT INTO t", "Native")),
        ("insert into db.t (a, `format`) format JSONEachRow\n", ("insert into db.t (a, `format`)", "JSONEachRow")),
        ("INSERT INTO t SETTINGS async_insert=1 FORMAT CSV", ("INSERT INTO t SETTINGS async_insert=1", "CSV")),
        ("INSERT INTO t (a, b) VALUES", ("INSERT INTO t (a, b)", "Values")),
        ("INSERT INTO t VALUES (1)", None),
        ("SELECT 1 FORMAT JSON", None),
    ],
)
def test_insert_head_of_a_query_parameter(query: str, expected: tuple[str, str] | None) -> None:
    assert insert_head(query) == expected


def test_insert_head_at_the_start_of_a_binary_body() -> None:
    data = b"\x05\x02\nrequest_id\x06String\xff\xfe"
    body = b"-- c\nINSERT INTO `t` (`a`, `b`) FORMAT Native\n" + data
    head, fmt, offset = body_insert_head(body)
    assert (head, fmt, body[offset:]) == ("INSERT INTO `t` (`a`, `b`)", "Native", data)
    # Data on the same line is left to the engine's own parser.
    assert body_insert_head(b'INSERT INTO t FORMAT JSONEachRow {"a": 1}') is None
    assert body_insert_head(b"SELECT 1") is None


def test_split_statement_streams_insert_data_and_concatenates_queries() -> None:
    _, insert = split_statement("INSERT INTO t FORMAT TSV", iter([b"1\tx\n", b"2\ty\n"]))
    assert insert is not None and insert[:2] == ("INSERT INTO t", "TSV")
    assert b"".join(insert[2]) == b"1\tx\n2\ty\n"
    _, insert = split_statement("", iter([b"INSERT INTO t FORMAT CSV\n1,", b"a\n"]))
    assert insert is not None and b"".join(insert[2]) == b"1,a\n"
    assert split_statement("SELECT ", iter([b"1"])) == ("SELECT \n1", None)
    assert split_statement("", iter([b"SELECT 2"])) == ("SELECT 2", None)
    assert split_statement("SELECT 3", None) == ("SELECT 3", None)
    with pytest.raises(ClickHouseError, match="Empty query"):
        split_statement("", iter([b"  "]))


def test_output_format_and_statement_kinds() -> None:
    assert output_format("SELECT 1 FORMAT JSONEachRow", "TabSeparated") == "JSONEachRow"
    assert output_format("SELECT 1\n FORMAT Native;", "TabSeparated") == "Native"
    assert output_format("SELECT 1 AS x", "CSV") == "CSV"
    assert output_format("SELECT 'FORMAT JSON'", "CSV") is None  # unsure: not streamed, default headers
    assert output_format("SELECT 1 FORMAT CSV SETTINGS max_threads = 1;", "JSON") == "CSV"
    assert output_format("SELECT 1 FORMAT JSON -- a comment", "TSV") is None  # there, but not nameable here


def test_sql_patterns_stay_linear_on_long_whitespace() -> None:
    # A pattern with competing quantifiers would take minutes (or forever) on these.
    spaces = " " * 200_000
    started = time.perf_counter()
    assert body_insert_head((spaces + "X").encode()) is None
    assert body_insert_head(("INSERT INTO t" + spaces + "X").encode()) is None
    assert insert_head("INSERT INTO t" + spaces + "X") is None
    assert output_format("SELECT 1 FORMAT JSON" + spaces + "x", "TSV") is None
    assert not is_select(spaces + "X") and not is_read_only(spaces + "X")
    assert not changes_connection_state(spaces + "X")
    # Linear: well under a second alone; a quadratic pattern takes minutes on 200k spaces. The margin is for a
    # machine busy with other work.
    assert time.perf_counter() - started < 20
    assert is_read_only("  -- x\nSELECT 1") and is_read_only("(SELECT 1)") and is_read_only("show tables")
    assert not is_read_only("INSERT INTO t VALUES (1)") and not is_read_only("drop table t")
    assert is_select("/* c */ SELECT 1") and not is_select("SHOW TABLES")
    assert changes_connection_state("SET max_threads = 1") and changes_connection_state("use db")
    assert changes_connection_state("CREATE TEMPORARY TABLE t (a UInt8)")
    assert not changes_connection_state("SELECT 1 SETTINGS max_threads = 1")


def test_content_types_follow_clickhouse() -> None:
    assert content_type("TabSeparated").startswith("text/tab-separated-values")
    assert content_type("CSVWithNames").endswith("header=present")
    assert content_type("JSON").startswith("application/json")
    assert content_type("JSONEachRow").startswith("application/x-ndjson")
    assert content_type("Native") == "application/octet-stream"


# Endpoint: errors --------------------------------------------------------------------------------------------


def test_engine_errors_keep_clickhouse_text_and_code() -> None:
    exc = RuntimeError("Streaming query failed: Code: 60. DB::Exception: Unknown table 'x'. (UNKNOWN_TABLE)")
    err = ClickHouseError.from_engine(exc)
    assert err.code == 60 and err.text.startswith("Code: 60. DB::Exception: Unknown table")
    assert err.status == 404
    other = ClickHouseError.from_engine(ValueError("boom"))
    assert other.code == 1002 and "boom" in other.text and other.status == 500


@pytest.mark.parametrize(
    ("code", "status"), [(62, 400), (27, 400), (60, 404), (81, 404), (516, 403), (194, 401), (48, 501), (395, 500)]
)
def test_http_status_of_error_codes(code: int, status: int) -> None:
    assert http_status(code) == status


# Endpoint: request parsing -----------------------------------------------------------------------------------


def test_parameters_split_into_options_bound_params_and_settings() -> None:
    req = parse_request(
        "POST",
        "query=SELECT+1&database=db&default_format=JSON&param_x=41&max_threads=2&session_id=s1"
        "&wait_end_of_query=1&compress=0&client_protocol_version=54405&cancel_http_readonly_queries_on_client_close=1"
        "&enable_http_compression=1&query_id=q1",
        {},
    )
    assert (req.query, req.database, req.default_format, req.query_id) == ("SELECT 1", "db", "JSON", "q1")
    assert req.params == {"x": "41"}
    assert req.settings == {"max_threads": "2"}
    assert req.session_id == "s1" and req.wait_end_of_query and req.http_compression and not req.compress_response
    assert parse_request("GET", "", {}).query_id  # generated when the client sends none


def test_a_malformed_setting_name_is_refused() -> None:
    with pytest.raises(ClickHouseError, match="Invalid setting name"):
        parse_request("POST", "max_threads%3D1%3BDROP=1", {})


def test_credentials_from_basic_auth_headers_and_parameters() -> None:
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    req = parse_request("POST", "", {"Authorization": basic})
    assert (req.user, req.password) == ("alice", "s3cret")
    req = parse_request("POST", "", {"X-ClickHouse-User": "bob", "X-ClickHouse-Key": "k"})
    assert (req.user, req.password) == ("bob", "k")
    req = parse_request("POST", "user=carol&password=p", {"Authorization": basic})
    assert (req.user, req.password) == ("carol", "p")
    assert (parse_request("GET", "", {}).user, parse_request("GET", "", {}).password) == ("default", "")


# Endpoint: bodies ------------------------------------------------------------------------------------------


def _pieces(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("lz4", lz4.frame.compress),
        ("zstd", zstd.compress),
    ],
)
def test_body_decoding_handles_several_concatenated_frames(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    # clickhouse-connect compresses each insert block on its own: the body is a run of whole frames.
    body = encode(b"first block;") + encode(b"second block")
    assert b"".join(decode_body(_pieces(body), encoding)) == b"first block;second block"


def test_unknown_or_corrupt_encoding_is_a_clickhouse_error() -> None:
    with pytest.raises(ClickHouseError, match="Unknown HTTP Content-Encoding"):
        list(decode_body([b"x"], "snappy"))
    with pytest.raises(ClickHouseError, match="Cannot decompress"):
        list(decode_body([b"not gzip at all"], "gzip"))


def test_clickhouse_native_compressed_blocks() -> None:
    def block(method: int, payload: bytes, raw: bytes) -> bytes:
        header = bytes([method]) + (len(payload) + 9).to_bytes(4, "little") + len(raw).to_bytes(4, "little")
        return b"\0" * 16 + header + payload

    raw = b"some native block bytes " * 10
    body = block(0x82, lz4.block.compress(raw, store_size=False), raw) + block(0x02, b"plain", b"plain")
    assert b"".join(decode_native_blocks(_pieces(body, 11))) == raw + b"plain"
    with pytest.raises(ClickHouseError, match="Truncated"):
        list(decode_native_blocks([body[:-2]]))


def test_request_body_reads_chunked_transfer_encoding() -> None:
    stream = io.BytesIO(b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT REQUEST")
    body = RequestBody(stream, None, chunked=True)
    assert b"".join(body.pieces()) == b"hello world" and body.done
    assert stream.read() == b"NEXT REQUEST"  # the keep-alive connection is left at the next request


def test_drain_resumes_a_partly_read_body() -> None:
    stream = io.BytesIO(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\nNEXT")
    body = RequestBody(stream, None, chunked=True)
    assert next(body.pieces()) == b"abc"
    assert body.drain() and body.done
    assert stream.read() == b"NEXT"
    sized = RequestBody(io.BytesIO(b"0123456789NEXT"), 10, chunked=False)
    assert sized.drain(limit=4) is False  # more than the limit left: the caller closes the connection


def test_response_encoding_choice_and_round_trip() -> None:
    assert choose_encoding("lz4,zstd,br,gzip,deflate") == "lz4"
    assert choose_encoding("br, gzip;q=0.8") == "gzip"
    assert choose_encoding("identity") is None
    for name, decode in (("gzip", gzip.decompress), ("lz4", lz4.frame.decompress), ("zstd", zstd.decompress)):
        encoder = ENCODERS[name](3)
        data = encoder.compress(b"abc" * 100) + encoder.compress(b"def") + encoder.flush()
        assert decode(data) == b"abc" * 100 + b"def", name
