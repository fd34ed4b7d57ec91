"""The HTTP side: ClickHouse's HTTP interface over the engine (see the package's docstring for what it serves)."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import socket
import string
import time
import uuid
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from services.stack.clickhouse_endpoint.codecs import (
    ENCODERS,
    Encoder,
    choose_encoding,
    content_type,
    decode_body,
    decode_native_blocks,
)
from services.stack.clickhouse_endpoint.engine import Engine, EngineConnection
from services.stack.clickhouse_endpoint.errors import (
    AUTHENTICATION_FAILED,
    NOT_IMPLEMENTED,
    READONLY,
    UNKNOWN_EXCEPTION,
    ClickHouseError,
)
from services.stack.clickhouse_endpoint.policy import Policy
from services.stack.clickhouse_endpoint.request import QueryRequest, RequestBody, parse_request
from services.stack.clickhouse_endpoint.statements import (
    changes_connection_state,
    is_read_only,
    is_select,
    output_format,
    split_statement,
)

log = logging.getLogger("clickhouse-endpoint")

IDLE_TIMEOUT_S = 300.0  # an idle keep-alive connection is closed after this (its thread is freed)

# Output formats whose blocks can be concatenated (no per-result header or footer): chDB's streaming API
# formats each block on its own, so only these are streamed; the others are materialised first.
STREAMABLE_FORMATS = frozenset(
    """Native RowBinary TabSeparated TSV TabSeparatedRaw TSVRaw CSV JSONEachRow JSONCompactEachRow
    JSONStringsEachRow JSONCompactStringsEachRow LineAsString TSKV""".split()
)
READONLY_MESSAGE = (
    "Cannot execute query in readonly mode. For queries over HTTP, method GET implies readonly. "
    "You should use method POST for modifying queries"
)


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], engine: Engine, user: str, password: str | None, policy: Policy
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ClickHouseHandler)
        self.engine = engine
        self.user = user
        self.password = password
        self.policy = policy
        self.display_name = socket.gethostname()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        # Without it, a response written as headers then body waits for the client's delayed ACK (~40 ms).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def authenticate(self, user: str, password: str) -> None:
        """With a password configured, only that user with that password gets in (ClickHouse's code 516)."""
        if self.password is None:
            return
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        if not (ok_user and ok_password):
            raise ClickHouseError.make(
                AUTHENTICATION_FAILED,
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )


class ClickHouseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chDB-endpoint"
    sys_version = ""
    rbufsize = 1 << 16
    timeout = IDLE_TIMEOUT_S
    server: EndpointServer

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged one by one (the services log their own); errors are, in _send_error."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    # One request --------------------------------------------------------------------------------
    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body()
        if url.path in ("/ping", "/replicas_status"):
            body.drain()
            self._send_simple(200, b"Ok.\n")
            return
        if url.path not in ("", "/"):
            body.drain()
            self._send_simple(404, f"There is no handle {url.path}\n\nUse / or /ping for health checks.\n".encode())
            return
        req = QueryRequest(method=method, query_id=str(uuid.uuid4()))
        try:
            req = parse_request(method, url.query, self.headers)
            self.server.authenticate(req.user, req.password)
            self._execute(req, body)
        except ClickHouseError as exc:
            self._send_error(exc, req, body)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away; nothing to answer
        except Exception as exc:  # a bug here must still answer the client, with the cause
            log.exception("query %s: internal error", req.query_id)
            self._send_error(ClickHouseError.make(UNKNOWN_EXCEPTION, f"{type(exc).__name__}: {exc}"), req, body)

    def _body(self) -> RequestBody:
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length else None
        except ValueError:
            size = None
        return RequestBody(self.rfile, size, chunked, self.server.policy.limits.max_body_bytes)

    def _execute(self, req: QueryRequest, body: RequestBody) -> None:
        if req.compress_response:
            raise ClickHouseError.make(
                NOT_IMPLEMENTED,
                "compress=1 (ClickHouse-compressed responses) is not supported by this endpoint; "
                "use enable_http_compression=1 with Accept-Encoding instead",
            )
        body.check_size()
        data = None if body.done else self._decoded(req, body)
        content_type = (self.headers.get("Content-Type") or "").lower()
        if data is not None and content_type.startswith("multipart/form-data"):
            self._apply_form(req, b"".join(data))
            data = None
        policy = self.server.policy
        policy.check_settings(req.settings)
        if req.method == "GET" and not req.query and data is None:
            self._send_simple(200, b"Ok.\n")
            return
        statement, insert = split_statement(req.query, data)
        policy.check(statement)
        settings = {**policy.profile(), **req.settings}
        if req.method == "GET":
            if insert is not None or (req.session_id and not is_read_only(statement)):
                raise ClickHouseError.make(READONLY, READONLY_MESSAGE)
            if not req.session_id and settings.get("readonly", "0").strip() not in ("1", "2"):
                settings["readonly"] = "2"  # as ClickHouse: the engine refuses writes, settings may change
        started = time.perf_counter()
        with self.server.engine.connection(req) as conn:
            conn.prepare(self._database(req), settings)
            if insert is not None:
                result = conn.insert(*insert)
                self._send_insert_result(req, result, started)
            else:
                self._run_query(conn, req, statement, started)

    def _run_query(self, conn: EngineConnection, req: QueryRequest, statement: str, started: float) -> None:
        if changes_connection_state(statement):
            if req.session_id:
                conn.database = None  # a session's USE: the next request re-asserts its database parameter
            else:
                conn.reusable = False  # its USE/SET/temporary table must not leak into other requests
        named = output_format(statement, req.default_format)
        fmt = named or req.default_format
        if named in STREAMABLE_FORMATS and not req.wait_end_of_query and is_select(statement):
            blocks = conn.stream(statement, req.default_format, req.params)
            try:
                self._send_stream(req, blocks, fmt, started)
            finally:
                blocks.close()  # before the connection goes back to the pool, not whenever GC gets to it
        else:
            result = conn.query(statement, req.default_format, req.params)
            self._send_result(req, result, fmt, started)

    def _database(self, req: QueryRequest) -> str | None:
        # Without a session each request starts in `default`, as on ClickHouse; a session keeps its own.
        if req.database or req.session_id:
            return req.database
        return "default"

    def _decoded(self, req: QueryRequest, body: RequestBody) -> Iterator[bytes]:
        ratio = self.server.policy.limits.max_decompress_ratio
        pieces: Iterator[bytes] = decode_body(body.pieces(), self.headers.get("Content-Encoding") or "", ratio)
        if req.decompress_body:
            pieces = decode_native_blocks(pieces, ratio)
        return pieces

    def _apply_form(self, req: QueryRequest, raw: bytes) -> None:
        """multipart/form-data: clickhouse-connect sends the query and long bound parameters as fields."""
        header = f"Content-Type: {self.headers.get('Content-Type')}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP_POLICY).parsebytes(header + raw)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if part.get_filename():
                raise ClickHouseError.make(
                    NOT_IMPLEMENTED, f"External data (file field {name!r}) is not supported by this endpoint"
                )
            if name:
                payload = part.get_payload(decode=True) or b""
                req.apply(str(name), payload.decode("utf-8", errors="replace"))

    # Responses ----------------------------------------------------------------------------------
    def _common_headers(self, req: QueryRequest, fmt: str) -> list[tuple[str, str]]:
        return [
            ("X-ClickHouse-Server-Display-Name", self.server.display_name),
            ("X-ClickHouse-Query-Id", req.query_id),
            ("X-ClickHouse-Format", fmt),
            ("X-ClickHouse-Timezone", self.server.engine.timezone),
            ("Content-Type", content_type(fmt)),
        ]

    def _encoder(self, req: QueryRequest) -> tuple[str | None, Encoder | None]:
        if not req.http_compression:
            return None, None
        name = choose_encoding(self.headers.get("Accept-Encoding") or "")
        return (name, ENCODERS[name](req.compression_level)) if name else (None, None)

    def _send_result(self, req: QueryRequest, result: Any, fmt: str, started: float) -> None:
        payload: bytes | memoryview = _view(result)
        encoding, encoder = self._encoder(req)
        if encoder is not None:
            payload = encoder.compress(bytes(payload)) + encoder.flush()
        headers = self._common_headers(req, fmt)
        headers.append(("X-ClickHouse-Summary", _summary(result, started, len(payload))))
        if encoding:
            headers.append(("Content-Encoding", encoding))
        headers.append(("Content-Length", str(len(payload))))
        self._start(200, headers)
        self.wfile.write(payload)

    def _send_insert_result(self, req: QueryRequest, result: Any, started: float) -> None:
        summary = {
            "read_rows": "0",
            "read_bytes": "0",
            "written_rows": str(result.rows_written),
            "written_bytes": str(result.bytes_written),
            "total_rows_to_read": "0",
            "result_rows": str(result.rows_written),
            "result_bytes": str(result.bytes_written),
            "elapsed_ns": str(int((time.perf_counter() - started) * 1e9)),
        }
        headers = self._common_headers(req, req.default_format)
        headers += [("X-ClickHouse-Summary", json.dumps(summary, separators=(",", ":"))), ("Content-Length", "0")]
        self._start(200, headers)

    def _send_stream(self, req: QueryRequest, blocks: Iterator[Any], fmt: str, started: float) -> None:
        """Chunked response, block by block; an error after the headers uses ClickHouse's exception tag."""
        first = next(blocks, None)  # errors in planning or the first block still get a proper status
        encoding, encoder = self._encoder(req)
        tag = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(16))
        headers = self._common_headers(req, fmt)
        headers += [
            ("X-ClickHouse-Summary", _summary(first, started, 0)),
            ("X-ClickHouse-Exception-Tag", tag),
            ("Transfer-Encoding", "chunked"),
        ]
        if encoding:
            headers.append(("Content-Encoding", encoding))
        self._start(200, headers)
        try:
            block = first
            while block is not None:
                data = _view(block)
                self._write_chunk(encoder.compress(bytes(data)) if encoder else data)
                block = next(blocks, None)
        except ClickHouseError as exc:
            log.warning("query %s failed while streaming: %s", req.query_id, exc.text)
            message, marker = exc.text.encode(), tag.encode()
            trailer = b"__exception__\r\n%s\r\n%s\n%d %s\r\n__exception__\r\n" % (marker, message, len(message), marker)
            self._write_chunk(encoder.compress(trailer) if encoder else trailer)
            self.close_connection = True
        if encoder is not None:
            self._write_chunk(encoder.flush())
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if len(data) < 1 << 16:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), bytes(data)))
        else:  # large blocks: no copy into a joined buffer
            self.wfile.write(b"%x\r\n" % len(data))
            self.wfile.write(data)
            self.wfile.write(b"\r\n")

    def _send_error(self, exc: ClickHouseError, req: QueryRequest, body: RequestBody) -> None:
        log.info("query %s failed: %s", req.query_id, exc.text)
        if not body.done and not body.drain():
            self.close_connection = True  # the client is still sending: answer, then drop the connection
        if getattr(self, "_headers_sent", False):
            self.close_connection = True  # too late for a status; the stream ends here
            return
        version = f" (version {self.server.engine.version} (chDB endpoint))"
        payload = (exc.text.rstrip() + ("" if "(version " in exc.text else version) + "\n").encode()
        headers = [
            ("X-ClickHouse-Server-Display-Name", self.server.display_name),
            ("X-ClickHouse-Query-Id", req.query_id),
            ("X-ClickHouse-Exception-Code", str(exc.code)),
            ("Content-Type", "text/plain; charset=UTF-8"),
            ("Content-Length", str(len(payload))),
        ]
        if self.close_connection:
            headers.append(("Connection", "close"))
        self._start(exc.status, headers)
        self.wfile.write(payload)

    def _send_simple(self, status: int, payload: bytes) -> None:
        self._start(status, [("Content-Type", "text/html; charset=UTF-8"), ("Content-Length", str(len(payload)))])
        self.wfile.write(payload)

    def _start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Keep-Alive", f"timeout={int(IDLE_TIMEOUT_S)}")
        self.end_headers()
        self._headers_sent = True

    def handle_one_request(self) -> None:
        self._headers_sent = False
        super().handle_one_request()


def _view(result: Any) -> memoryview | bytes:
    """The result's bytes without a copy (the result object must outlive the view)."""
    return result.get_memview().view() if result.size() else b""


def _summary(result: Any, started: float, result_bytes: int) -> str:
    """X-ClickHouse-Summary: ClickHouse sends every counter as a string."""
    read_rows = read_bytes = written_rows = written_bytes = 0
    if result is not None:
        with contextlib.suppress(Exception):
            read_rows, read_bytes = result.rows_read(), result.bytes_read()
            written_rows, written_bytes = result.rows_written(), result.bytes_written()
    summary = {
        "read_rows": read_rows,
        "read_bytes": read_bytes,
        "written_rows": written_rows,
        "written_bytes": written_bytes,
        "total_rows_to_read": 0,
        "result_bytes": result_bytes,
        "elapsed_ns": int((time.perf_counter() - started) * 1e9),
    }
    return json.dumps({k: str(v) for k, v in summary.items()}, separators=(",", ":"))
