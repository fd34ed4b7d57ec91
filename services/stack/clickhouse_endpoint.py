"""The local stack's ClickHouse: chDB (ClickHouse's engine in-process) behind ClickHouse's HTTP interface.

Only one process may open a chDB data directory, so this process owns it and serves the part of ClickHouse's
HTTP interface that clients use:

* queries by GET/POST: the ``query`` parameter and/or the body, concatenated as ClickHouse does; GET is
  read-only; ``database``, ``default_format``, ``query_id``, ``session_id`` parameters; settings as URL
  parameters; server-side ``param_*`` binding (also as multipart form fields);
* INSERT data streamed from the body into chDB in any input format (Native, RowBinary, JSONEachRow, CSV...),
  with the body's ``Content-Encoding`` (gzip, deflate, lz4, zstd) or ``decompress=1`` framing removed;
* results in any output format, streamed block by block unless ``wait_end_of_query=1`` or the format has a
  header; compressed when asked with ``enable_http_compression=1`` and ``Accept-Encoding``;
* the ``X-ClickHouse-*`` headers, ``/ping``, errors as ClickHouse's text and HTTP status, and an optional
  user/password (basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` or ``user``/``password``).

Every service and CLI therefore uses an ordinary ``http://`` ClickHouse URL, exactly as against a real server.
Deliberate differences: without a configured password any credentials are accepted (loopback development);
``compress=1`` (ClickHouse's own response framing) and external data (file fields) answer NOT_IMPLEMENTED;
large INSERTs are squashed into parts of 131072 rows (``SERVER_SETTINGS``) rather than ~1M.
Run as ``python -m services.stack.clickhouse_endpoint --data-dir DIR --host 127.0.0.1 --port 8123``; the
password, if any, comes from the environment variable named by ``--password-env``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import http.client
import importlib.util
import json
import logging
import os
import re
import secrets
import signal
import socket
import string
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP as HTTP_POLICY
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from services.stack.process import Component, Port, StackError

if TYPE_CHECKING:
    from services.core.settings import Settings

log = logging.getLogger("clickhouse-endpoint")

PASSWORD_ENV = "FLYWHEEL_CLICKHOUSE_PASSWORD"  # noqa: S105 - a variable name, not a secret
IDLE_TIMEOUT_S = 300.0  # an idle keep-alive connection is closed after this (its thread is freed)
READ_PIECE = 1 << 20  # body bytes read from the socket per step
DRAIN_LIMIT = 1 << 30  # after an error, read at most this much of the unread body before closing instead
MAX_SESSION_TIMEOUT_S = 3600.0
MAX_INSERT_HEAD = 1 << 16  # an INSERT ... FORMAT head at the start of a body is looked for in this many bytes

# URL parameters that belong to the HTTP layer, never forwarded to the engine as settings. Some are settings on
# a ClickHouse server too, but only its HTTP handler reads them (progress headers, response compression...).
HTTP_ONLY_PARAMS = frozenset(
    """query database default_format user password quota_key query_id session_id session_timeout session_check
    close_session compress decompress client_protocol_version buffer_size wait_end_of_query stacktrace role
    enable_http_compression http_zlib_compression_level send_progress_in_http_headers
    http_headers_progress_interval_ms cancel_http_readonly_queries_on_client_close add_http_cors_header
    http_native_compression_disable_checksumming_on_decompress http_response_buffer_size http_wait_end_of_query
    """.split()
)

# The endpoint's settings profile, under each request's own settings. A large INSERT is squashed into parts of
# this many rows instead of ClickHouse's ~1M: parts are then written while the body still streams in, so
# parsing and writing overlap the client's encoding and the upload (about a third faster for 1M rows).
SERVER_SETTINGS = {"min_insert_block_size_rows": "131072"}

# Output formats whose blocks can be concatenated (no per-result header or footer): chDB's streaming API
# formats each block on its own, so only these are streamed; the others are materialised first.
STREAMABLE_FORMATS = frozenset(
    """Native RowBinary TabSeparated TSV TabSeparatedRaw TSVRaw CSV JSONEachRow JSONCompactEachRow
    JSONStringsEachRow JSONCompactStringsEachRow LineAsString TSKV""".split()
)

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp); any other code is 500.
_STATUS_GROUPS: dict[int, tuple[int, ...]] = {
    401: (194,),  # REQUIRED_PASSWORD
    403: (192, 193, 497, 512, 516),  # UNKNOWN_USER, WRONG_PASSWORD, ACCESS_DENIED, ..., AUTHENTICATION_FAILED
    # BAD_ARGUMENTS, CANNOT_PARSE_*, ILLEGAL_COLUMN, SYNTAX_ERROR, INCORRECT_DATA, TYPE_MISMATCH...
    400: (36, 427, 6, 25, 26, 38, 41, 72, 441, 675, 676, 27, 376, 15, 44, 37, 123, 8, 167, 168, 223, 62, 117, 53, 321),
    # UNKNOWN_TABLE, UNKNOWN_FUNCTION, UNKNOWN_IDENTIFIER, UNKNOWN_DATABASE, UNKNOWN_SETTING, UNKNOWN_FORMAT...
    404: (60, 46, 47, 50, 56, 81, 115, 152, 63, 73, 336, 78, 511),
    408: (159,),  # TIMEOUT_EXCEEDED
    411: (381,),  # HTTP_LENGTH_REQUIRED
    413: (229,),  # QUERY_IS_TOO_LARGE
    415: (779,),  # UNSUPPORTED_MEDIA_TYPE
    501: (48,),  # NOT_IMPLEMENTED
    503: (209, 76, 439),  # SOCKET_TIMEOUT, CANNOT_OPEN_FILE, CANNOT_SCHEDULE_TASK
}
_STATUS_BY_CODE = {code: status for status, codes in _STATUS_GROUPS.items() for code in codes}

NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
UNKNOWN_COMPRESSION_METHOD = 89
READONLY = 164
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
AUTHENTICATION_FAILED = 516
UNKNOWN_EXCEPTION = 1002

_CODE_RE = re.compile(r"Code: (\d+)\.")
_NAME_BY_CODE = {
    48: "NOT_IMPLEMENTED",
    62: "SYNTAX_ERROR",
    89: "UNKNOWN_COMPRESSION_METHOD",
    164: "READONLY",
    271: "CANNOT_DECOMPRESS",
    372: "SESSION_NOT_FOUND",
    373: "SESSION_IS_LOCKED",
    516: "AUTHENTICATION_FAILED",
    1002: "UNKNOWN_EXCEPTION",
}


class ClickHouseError(Exception):
    """An error to answer with ClickHouse's text (``Code: N. DB::Exception: ... (NAME)``) and HTTP status."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def make(cls, code: int, message: str) -> ClickHouseError:
        name = _NAME_BY_CODE.get(code, "UNKNOWN_EXCEPTION")
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chDB raises RuntimeError/ChdbError whose text holds ClickHouse's message after a wrapper prefix."""
        text = str(exc).strip()
        start = text.find("Code: ")
        if start < 0:
            return cls.make(UNKNOWN_EXCEPTION, text or type(exc).__name__)
        text = text[start:]
        match = _CODE_RE.match(text)
        return cls(int(match.group(1)) if match else UNKNOWN_EXCEPTION, text)

    @property
    def status(self) -> int:
        return http_status(self.code)


def http_status(code: int) -> int:
    return _STATUS_BY_CODE.get(code, 500)


# SQL shape helpers ------------------------------------------------------------------------------------------
# Whitespace and comments. One whitespace character per repetition: `(?:\s+)*` backtracks exponentially.
_NOISE_ITEM = r"\s|--[^\n]*(?:\n|$)|/\*.*?\*/"
_LEADING_NOISE = rf"(?:{_NOISE_ITEM})*"
# The patterns below stay linear on any input: the INSERT head ends with a non-space character before the
# whitespace that precedes FORMAT, so no two quantifiers compete for the same characters.
# An INSERT whose data follows (query parameter form: the data is the whole body).
_INSERT_HEAD_RE = re.compile(
    r"\s*(?P<head>INSERT\s+INTO\s.*?\S)\s+(?:FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)|(?P<values>VALUES))[\s;]*",
    re.IGNORECASE | re.DOTALL,
)
# An INSERT at the start of a body, its data starting on the next line.
_BODY_INSERT_RE = re.compile(
    _LEADING_NOISE + r"(?P<head>INSERT\s+INTO\s.*?\S)\s+FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)[ \t]*(?:\r?\n|$)",
    re.IGNORECASE | re.DOTALL,
)
# A FORMAT clause at the end of a statement (trailing whitespace and semicolons already stripped).
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+(?P<fmt>[A-Za-z0-9_]+)(?:\s+SETTINGS\s[^;]*)?\Z", re.IGNORECASE)
_FORMAT_WORD_RE = re.compile(r"\bFORMAT\s+[A-Za-z0-9_]+", re.IGNORECASE)
# Statements a GET may not run (ClickHouse's GET implies readonly). Anything else goes to the engine, so a
# typo still gets its syntax error rather than a readonly one.
_MODIFYING_RE = re.compile(
    _LEADING_NOISE + r"(?:INSERT|CREATE|DROP|ALTER|TRUNCATE|RENAME|OPTIMIZE|DELETE|UPDATE|ATTACH|DETACH|GRANT"
    r"|REVOKE|SYSTEM|KILL|EXCHANGE|UNDROP|BACKUP|RESTORE|MOVE)\b",
    re.IGNORECASE | re.DOTALL,
)
_SELECT_RE = re.compile(rf"(?:\(|{_NOISE_ITEM})*(?:SELECT|WITH)\b", re.IGNORECASE | re.DOTALL)
# Statements that change a connection's state (current database, settings, temporary tables).
_STATEFUL_RE = re.compile(
    _LEADING_NOISE + r"(?:SET|USE|CREATE\s+TEMPORARY|DROP\s+TEMPORARY)\b", re.IGNORECASE | re.DOTALL
)
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def insert_head(query: str) -> tuple[str, str] | None:
    """(INSERT head, input format) when a query parameter is an INSERT whose data is the request body."""
    match = _INSERT_HEAD_RE.fullmatch(query)
    if not match:
        return None
    return match.group("head"), ("Values" if match.group("values") else match.group("fmt"))


def body_insert_head(prefix: bytes) -> tuple[str, str, int] | None:
    """(INSERT head, input format, offset where the data starts) for a body starting with INSERT ... FORMAT X.

    Matched on a latin-1 view of the bytes so offsets stay byte offsets even when the data is binary.
    """
    match = _BODY_INSERT_RE.match(prefix[:MAX_INSERT_HEAD].decode("latin-1"))
    if not match:
        return None
    head = prefix[match.start("head") : match.end("head")].decode("utf-8", errors="replace")
    return head, match.group("fmt"), match.end()


def output_format(query: str, default: str) -> str | None:
    """The result format: the statement's trailing FORMAT clause, else the default (as ClickHouse decides).

    None when a FORMAT clause is there but not at the end (say, before a trailing comment): the engine will
    honour it, we just cannot name it, so the result is not streamed and its headers are the default's.
    """
    tail = query[-4096:].rstrip().rstrip(";").rstrip()  # the clause is near the end; bounded work per query
    match = _TRAILING_FORMAT_RE.search(tail)
    if match:
        return match.group("fmt")
    return None if _FORMAT_WORD_RE.search(query) else default


def is_modifying(query: str) -> bool:
    return bool(_MODIFYING_RE.match(query))


def is_select(query: str) -> bool:
    return bool(_SELECT_RE.match(query))


def changes_connection_state(query: str) -> bool:
    return bool(_STATEFUL_RE.match(query))


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def content_type(fmt: str) -> str:
    """The Content-Type ClickHouse sends for a result format."""
    if fmt.startswith(("TabSeparated", "TSV")):
        return "text/tab-separated-values; charset=UTF-8"
    if fmt.startswith("CSV"):
        header = "present" if "WithNames" in fmt else "absent"
        return f"text/csv; charset=UTF-8; header={header}"
    if fmt.startswith("JSON") and "EachRow" in fmt:
        return "application/x-ndjson; charset=UTF-8"
    if fmt.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if fmt.startswith(("Native", "RowBinary", "Parquet", "Arrow", "ORC", "Avro", "Protobuf", "MsgPack", "Npy")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


# Request parsing --------------------------------------------------------------------------------------------
@dataclass
class QueryRequest:
    """What one HTTP request asks for, before any body is read."""

    method: str
    query: str = ""
    database: str | None = None
    default_format: str = "TabSeparated"
    query_id: str = ""
    session_id: str | None = None
    session_timeout: float = 60.0
    session_check: bool = False
    close_session: bool = False
    wait_end_of_query: bool = False
    compress_response: bool = False
    decompress_body: bool = False
    http_compression: bool = False
    compression_level: int = 3
    user: str = "default"
    password: str = ""
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def apply(self, name: str, value: str) -> None:
        """Take one URL (or form) parameter: an HTTP-layer option, a bound parameter or a setting."""
        if name.startswith("param_"):
            self.params[name[len("param_") :]] = value
        elif name in _OPTION_SETTERS:
            _OPTION_SETTERS[name](self, value)
        elif name not in HTTP_ONLY_PARAMS:
            if not _SETTING_NAME_RE.fullmatch(name):
                raise ClickHouseError.make(SYNTAX_ERROR, f"Invalid setting name {name!r}")
            self.settings[name] = value


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _number(value: str, default: float) -> float:
    try:
        return float(value)
    except ValueError:
        return default


_OPTION_SETTERS: dict[str, Callable[[QueryRequest, str], None]] = {
    "query": lambda r, v: setattr(r, "query", v),
    "database": lambda r, v: setattr(r, "database", v or None),
    "default_format": lambda r, v: setattr(r, "default_format", v or "TabSeparated"),
    "query_id": lambda r, v: setattr(r, "query_id", v),
    "session_id": lambda r, v: setattr(r, "session_id", v or None),
    "session_timeout": lambda r, v: setattr(r, "session_timeout", min(_number(v, 60.0), MAX_SESSION_TIMEOUT_S)),
    "session_check": lambda r, v: setattr(r, "session_check", _flag(v)),
    "close_session": lambda r, v: setattr(r, "close_session", _flag(v)),
    "wait_end_of_query": lambda r, v: setattr(r, "wait_end_of_query", _flag(v)),
    "compress": lambda r, v: setattr(r, "compress_response", _flag(v)),
    "decompress": lambda r, v: setattr(r, "decompress_body", _flag(v)),
    "enable_http_compression": lambda r, v: setattr(r, "http_compression", _flag(v)),
    "http_zlib_compression_level": lambda r, v: setattr(r, "compression_level", int(_number(v, 3))),
    "user": lambda r, v: setattr(r, "user", v),
    "password": lambda r, v: setattr(r, "password", v),
}


class Headers(Protocol):
    def get(self, name: str, default: Any = None) -> Any: ...


def parse_request(method: str, query_string: str, headers: Headers) -> QueryRequest:
    """Build a QueryRequest from the URL parameters and the headers ClickHouse reads."""
    req = QueryRequest(method=method)
    for name, value in credentials_from_headers(headers).items():
        setattr(req, name, value)
    if headers.get("X-ClickHouse-Database"):
        req.database = headers.get("X-ClickHouse-Database")
    if headers.get("X-ClickHouse-Format"):
        req.default_format = headers.get("X-ClickHouse-Format")
    for name, value in parse_qsl(query_string, keep_blank_values=True):
        req.apply(name, value)
    if not req.query_id:
        req.query_id = str(uuid.uuid4())
    return req


def credentials_from_headers(headers: Headers) -> dict[str, str]:
    """user/password from X-ClickHouse-User/Key or HTTP basic auth (URL parameters may override them)."""
    out: dict[str, str] = {}
    auth = headers.get("Authorization") or ""
    if auth[:6].lower() == "basic ":
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            out = {"user": user or "default", "password": password}
    if headers.get("X-ClickHouse-User"):
        out["user"] = headers.get("X-ClickHouse-User")
    if headers.get("X-ClickHouse-Key") is not None:
        out["password"] = headers.get("X-ClickHouse-Key")
    return out


# Request body -----------------------------------------------------------------------------------------------
class RequestBody:
    """One request body read from the socket in pieces: Content-Length or chunked transfer encoding."""

    def __init__(self, rfile: Any, length: int | None, chunked: bool) -> None:
        self._rfile = rfile
        self._remaining = length or 0
        self._chunked = chunked
        self.done = not chunked and not length
        self._pieces: Iterator[bytes] | None = None

    def pieces(self) -> Iterator[bytes]:
        """The one reader of this body: a later call (drain after an error) resumes where the last stopped."""
        if self._pieces is None:
            self._pieces = self._chunked_pieces() if self._chunked else self._sized_pieces()
        return self._pieces

    def _sized_pieces(self) -> Iterator[bytes]:
        while self._remaining > 0:
            piece = self._rfile.read(min(self._remaining, READ_PIECE))
            if not piece:
                raise ClickHouseError.make(UNKNOWN_EXCEPTION, "Request body ended before Content-Length bytes")
            self._remaining -= len(piece)
            yield piece
        self.done = True

    def _chunked_pieces(self) -> Iterator[bytes]:
        while not self.done:
            size_line = self._rfile.readline(1024)
            if not size_line:
                raise ClickHouseError.make(UNKNOWN_EXCEPTION, "Chunked request body ended early")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                self.done = True
                return
            while size > 0:
                piece = self._rfile.read(min(size, READ_PIECE))
                if not piece:
                    raise ClickHouseError.make(UNKNOWN_EXCEPTION, "Chunked request body ended early")
                size -= len(piece)
                yield piece
            self._rfile.readline(16)  # the CRLF after each chunk

    def drain(self, limit: int = DRAIN_LIMIT) -> bool:
        """Discard what is left (so the connection stays usable); False if more than limit was left."""
        seen = 0
        with contextlib.suppress(ClickHouseError, OSError, ValueError):
            for piece in self.pieces():
                seen += len(piece)
                if seen > limit:
                    return False
        return self.done


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _FramesDecoder:
    """Decodes a body that may be several concatenated compressed frames (clients compress block by block)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._current = factory()

    def decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._current.decompress(data))
            if not self._current.eof:
                break
            data = self._current.unused_data
            self._current = self._factory()
        return b"".join(out)


def _decoder_factories() -> dict[str, Callable[[], Any]]:
    factories: dict[str, Callable[[], Any]] = {
        # 32 + MAX_WBITS: accept a zlib or gzip header, as ClickHouse's inflating reader does.
        "gzip": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
        "deflate": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
        "x-gzip": lambda: zlib.decompressobj(32 + zlib.MAX_WBITS),
    }
    with contextlib.suppress(ImportError):
        import lz4.frame

        factories["lz4"] = lz4.frame.LZ4FrameDecompressor
    with contextlib.suppress(ImportError):
        # The backport of Python 3.14's compression.zstd, which clickhouse-connect itself uses.
        from backports import zstd

        factories["zstd"] = zstd.ZstdDecompressor
    return factories


_DECODERS = _decoder_factories()


def decode_body(pieces: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """The body with its Content-Encoding removed, piece by piece."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        yield from pieces
        return
    factory = _DECODERS.get(encoding)
    if factory is None:
        raise ClickHouseError.make(UNKNOWN_COMPRESSION_METHOD, f"Unknown HTTP Content-Encoding: {encoding}")
    decoder = _FramesDecoder(factory)
    for piece in pieces:
        try:
            out = decoder.decompress(piece)
        except Exception as exc:  # each library raises its own error type
            raise ClickHouseError.make(CANNOT_DECOMPRESS, f"Cannot decompress {encoding} body: {exc}") from exc
        if out:
            yield out


def decode_native_blocks(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """``decompress=1``: ClickHouse's own compressed framing (checksum, method, sizes, payload).

    Checksums are not verified (as with http_native_compression_disable_checksumming_on_decompress):
    the transport is loopback TCP, and CityHash128 is not available here.
    """
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= 25:
            method = buf[16]
            compressed_size = int.from_bytes(buf[17:21], "little")  # includes the 9-byte method/sizes header
            size = int.from_bytes(buf[21:25], "little")
            end = 16 + compressed_size
            if len(buf) < end:
                break
            yield _native_block(method, bytes(buf[25:end]), size)
            del buf[:end]
    if buf:
        raise ClickHouseError.make(CANNOT_DECOMPRESS, "Truncated compressed block in request body")


def _native_block(method: int, payload: bytes, size: int) -> bytes:
    if method == 0x02:
        return payload
    try:
        if method == 0x82:
            import lz4.block

            return lz4.block.decompress(payload, uncompressed_size=size)
        if method == 0x90:
            from backports import zstd

            return zstd.decompress(payload)
    except Exception as exc:
        raise ClickHouseError.make(CANNOT_DECOMPRESS, f"Cannot decompress block: {exc}") from exc
    raise ClickHouseError.make(UNKNOWN_COMPRESSION_METHOD, f"Unknown compression method 0x{method:02x}")


def peek(pieces: Iterator[bytes], want: int = MAX_INSERT_HEAD) -> tuple[bytes, Iterator[bytes]]:
    """Read ahead until a newline or `want` bytes (enough to see an INSERT head); return it and the rest."""
    head = bytearray()
    for piece in pieces:
        head += piece
        if b"\n" in head or len(head) >= want:
            break
    return bytes(head), pieces


# Response compression ---------------------------------------------------------------------------------------
class _Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _ZlibEncoder:
    def __init__(self, level: int, wbits: int) -> None:
        self._obj = zlib.compressobj(max(1, min(level, 9)), zlib.DEFLATED, wbits)

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data) + self._obj.flush(zlib.Z_SYNC_FLUSH)

    def flush(self) -> bytes:
        return self._obj.flush()


class _Lz4Encoder:
    """One LZ4 frame for the whole response: clickhouse-connect reads it with a single frame decompressor."""

    def __init__(self) -> None:
        import lz4.frame

        self._obj = lz4.frame.LZ4FrameCompressor()
        self._started = False

    def compress(self, data: bytes) -> bytes:
        prefix = b"" if self._started else self._obj.begin()
        self._started = True
        return prefix + self._obj.compress(data)

    def flush(self) -> bytes:
        prefix = b"" if self._started else self._obj.begin()
        self._started = True
        return prefix + self._obj.flush()


class _ZstdEncoder:
    def __init__(self) -> None:
        from backports import zstd

        self._obj = zstd.ZstdCompressor()
        self._block = zstd.ZstdCompressor.FLUSH_BLOCK

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data, self._block)

    def flush(self) -> bytes:
        return self._obj.flush()


def _encoder_factories() -> dict[str, Callable[[int], _Encoder]]:
    factories: dict[str, Callable[[int], _Encoder]] = {
        "gzip": lambda level: _ZlibEncoder(level, 16 + zlib.MAX_WBITS),
        "deflate": lambda level: _ZlibEncoder(level, zlib.MAX_WBITS),
    }
    if "lz4" in _DECODERS:
        factories["lz4"] = lambda level: _Lz4Encoder()
    if "zstd" in _DECODERS:
        factories["zstd"] = lambda level: _ZstdEncoder()
    return factories


_ENCODERS = _encoder_factories()


def choose_encoding(accept_encoding: str) -> str | None:
    """The first encoding the client lists that we can produce (clients list their preference first)."""
    for item in accept_encoding.split(","):
        name = item.split(";", 1)[0].strip().lower()
        if name in _ENCODERS:
            return name
    return None


# The engine: chDB connections ----------------------------------------------------------------------------
class EngineConnection:
    """One chDB connection plus the per-request state last set on it, so a request only pays for changes."""

    def __init__(self, path: str) -> None:
        import chdb

        self.raw = chdb.connect(path)
        self.database: str | None = None
        self.settings: dict[str, str] = {}
        self.reusable = True

    def prepare(self, database: str | None, settings: dict[str, str]) -> None:
        """Make the connection's current database and settings those of the request."""
        if database is not None and database != self.database:
            self.database = None
            self._run(f"USE {quote_identifier(database)}")
            self.database = database
        if settings == self.settings:
            return
        assignments = [
            f"{name} = {quote_string(value)}" for name, value in settings.items() if self.settings.get(name) != value
        ]
        assignments += [f"{name} = DEFAULT" for name in self.settings if name not in settings]
        try:
            self._run("SET " + ", ".join(assignments))
        except ClickHouseError:
            self.reusable = False  # partly applied: its state is no longer known
            raise
        self.settings = dict(settings)

    def _run(self, sql: str) -> Any:
        try:
            return self.raw.query(sql, "TabSeparated")
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None

    def query(self, sql: str, fmt: str, params: dict[str, str]) -> Any:
        try:
            return self.raw.query(sql, fmt, params=params)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None

    def stream(self, sql: str, fmt: str, params: dict[str, str]) -> Iterator[Any]:
        """Result blocks as chDB produces them; the first is fetched by the caller before answering."""
        try:
            result = self.raw.send_query(sql, fmt, params=params)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        try:
            while True:
                try:
                    block = result.fetch()
                except Exception as exc:
                    raise ClickHouseError.from_engine(exc) from None
                if block is None:
                    return
                yield block
        finally:
            with contextlib.suppress(Exception):
                result.close()

    def insert(self, head: str, fmt: str, data: Iterable[bytes]) -> Any:
        """Stream INSERT data into chDB as it arrives (constant memory, parsing overlaps the upload)."""
        try:
            inserter = self.raw.send_insert(head, fmt)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        try:
            for piece in data:
                if piece:
                    inserter.append(piece)
            return inserter.finish()
        except ClickHouseError:
            raise
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        finally:
            with contextlib.suppress(Exception):
                inserter.cancel()  # a no-op after finish()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


@dataclass
class _Session:
    conn: EngineConnection
    timeout: float
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Engine:
    """The chDB engine of one data directory: a pool of connections plus one connection per HTTP session.

    chDB runs queries of different connections in parallel, and a connection's session state (USE, SET,
    temporary tables) is its own, so sessionless requests borrow a pooled connection and a ``session_id``
    keeps its own connection until it times out.
    """

    def __init__(self, data_dir: Path, max_idle: int = 16) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = str(data_dir)
        # Keeps the engine up while pooled connections come and go (chDB shuts down with its last connection).
        self._anchor = EngineConnection(self.path)
        version, tz = self._anchor.query("SELECT version(), timezone()", "TabSeparated", {}).bytes().split(b"\t")
        self.version = version.decode()
        self.timezone = tz.decode().strip()
        self._max_idle = max_idle
        self._idle: list[EngineConnection] = []
        self._sessions: dict[str, _Session] = {}
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def connection(self, req: QueryRequest) -> Iterator[EngineConnection]:
        if req.session_id:
            with self._session(req) as conn:
                yield conn
            return
        conn = self._borrow()
        try:
            yield conn
        finally:
            self._give_back(conn)

    def _borrow(self) -> EngineConnection:
        with self._cond:
            if self._closed:
                raise ClickHouseError.make(UNKNOWN_EXCEPTION, "The server is shutting down")
            self._busy += 1
            if self._idle:
                return self._idle.pop()
        try:
            return EngineConnection(self.path)
        except Exception as exc:
            self._release_busy()
            raise ClickHouseError.from_engine(exc) from None

    def _give_back(self, conn: EngineConnection) -> None:
        with self._cond:
            keep = conn.reusable and not self._closed and len(self._idle) < self._max_idle
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._release_busy()

    def _release_busy(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def _session(self, req: QueryRequest) -> Iterator[EngineConnection]:
        session_id = req.session_id or ""
        with self._cond:
            if self._closed:
                raise ClickHouseError.make(UNKNOWN_EXCEPTION, "The server is shutting down")
            self._expire_sessions()
            session = self._sessions.get(session_id)
            if session is None and req.session_check:
                raise ClickHouseError.make(SESSION_NOT_FOUND, f"Session {session_id} not found")
            if session is None:
                session = _Session(EngineConnection(self.path), req.session_timeout)
                self._sessions[session_id] = session
            if not session.lock.acquire(blocking=False):
                raise ClickHouseError.make(SESSION_IS_LOCKED, f"Session {session_id} is locked by a concurrent client")
            self._busy += 1
        try:
            yield session.conn
        finally:
            session.timeout = req.session_timeout
            session.last_used = time.monotonic()
            session.lock.release()
            if req.close_session or not session.conn.reusable:  # a half-applied SET: start the session afresh
                self._close_session(session_id)
            self._release_busy()

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for session_id, session in list(self._sessions.items()):
            if now - session.last_used > session.timeout and not session.lock.locked():
                del self._sessions[session_id]
                session.conn.close()

    def _close_session(self, session_id: str) -> None:
        with self._cond:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.conn.close()

    def close(self, grace_s: float = 10.0) -> None:
        """Wait for running queries (up to grace_s), then close every connection so chDB flushes its data."""
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: self._busy <= 0, timeout=grace_s)
            conns = self._idle + [s.conn for s in self._sessions.values()]
            self._idle, self._sessions = [], {}
        for conn in conns:
            conn.close()
        self._anchor.close()


# HTTP server ------------------------------------------------------------------------------------------------
class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: Engine, user: str, password: str | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, ClickHouseHandler)
        self.engine = engine
        self.user = user
        self.password = password
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
        return RequestBody(self.rfile, size, chunked)

    def _execute(self, req: QueryRequest, body: RequestBody) -> None:
        if req.compress_response:
            raise ClickHouseError.make(
                NOT_IMPLEMENTED,
                "compress=1 (ClickHouse-compressed responses) is not supported by this endpoint; "
                "use enable_http_compression=1 with Accept-Encoding instead",
            )
        data = None if body.done else self._decoded(req, body)
        content_type = (self.headers.get("Content-Type") or "").lower()
        if data is not None and content_type.startswith("multipart/form-data"):
            self._apply_form(req, b"".join(data))
            data = None
        if req.method == "GET" and not req.query and data is None:
            self._send_simple(200, b"Ok.\n")
            return
        statement, insert = split_statement(req.query, data)
        if req.method == "GET" and (insert is not None or is_modifying(statement)):
            raise ClickHouseError.make(
                READONLY,
                "Cannot execute query in readonly mode. For queries over HTTP, method GET implies "
                "readonly. You should use method POST for modifying queries",
            )
        started = time.perf_counter()
        with self.server.engine.connection(req) as conn:
            conn.prepare(self._database(req), {**SERVER_SETTINGS, **req.settings})
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
        pieces: Iterator[bytes] = decode_body(body.pieces(), self.headers.get("Content-Encoding") or "")
        if req.decompress_body:
            pieces = decode_native_blocks(pieces)
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

    def _encoder(self, req: QueryRequest) -> tuple[str | None, _Encoder | None]:
        if not req.http_compression:
            return None, None
        name = choose_encoding(self.headers.get("Accept-Encoding") or "")
        return (name, _ENCODERS[name](req.compression_level)) if name else (None, None)

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


def split_statement(query: str, data: Iterator[bytes] | None) -> tuple[str, tuple[str, str, Iterator[bytes]] | None]:
    """(SQL text, insert) where insert is (INSERT head, input format, data pieces) when data is streamed.

    ClickHouse's rule: the statement is the ``query`` parameter followed by the body; for an INSERT, whatever
    follows ``FORMAT <name>`` (or ``VALUES``) is the data. Data is streamed, never decoded as text.
    """
    if data is None:
        return query, None
    if query.strip():
        head = insert_head(query)
        if head is not None:
            return query, (head[0], head[1], data)
        rest = b"".join(data)
        return (query + "\n" + rest.decode("utf-8", errors="replace")) if rest else query, None
    prefix, data = peek(data)
    found = body_insert_head(prefix)
    if found is not None:
        head_sql, fmt, offset = found
        return head_sql, (head_sql, fmt, _chain(prefix[offset:], data))
    text = (prefix + b"".join(data)).decode("utf-8", errors="replace")
    if not text.strip():
        raise ClickHouseError.make(SYNTAX_ERROR, "Empty query")
    return text, None


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


# Process entry point ----------------------------------------------------------------------------------------
def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a chDB data directory over ClickHouse's HTTP interface.")
    parser.add_argument("--data-dir", required=True, type=Path, help="chDB data directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--user", default="default", help="the user clients must give when a password is set")
    parser.add_argument("--password-env", help="name of the environment variable holding the password")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = os.environ.get(args.password_env) if args.password_env else None
    try:
        engine = Engine(args.data_dir.absolute())
    except Exception as exc:  # typically: another process holds the data directory
        log.error("cannot open chDB data directory %s: %s", args.data_dir, exc)
        return 1
    try:
        server = EndpointServer((args.host, args.port), engine, args.user, password or None)
    except OSError as exc:
        engine.close()
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    import chdb

    log.info(
        "listening on http://%s:%d (chDB %s, ClickHouse %s), data in %s, %s",
        args.host,
        args.port,
        chdb.__version__,
        engine.version,
        args.data_dir.absolute(),
        f"user {args.user} with password" if password else "no password",
    )

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return, so it must run outside the serving (main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        engine.close()
        log.info("stopped; data flushed to %s", args.data_dir.absolute())
    return 0


# The stack component ----------------------------------------------------------------------------------------
@dataclass
class ClickHouseEndpoint(Component):
    """The local stack's ClickHouse: this module run as its own process, owning the chDB data directory."""

    url: str = "http://127.0.0.1:8123"
    data_dir: Path = Path(".flywheel/clickhouse")
    user: str = "default"
    password: str | None = None
    settings: Settings | None = None  # for after_ready's migrations

    @classmethod
    def from_settings(cls, settings: Settings) -> ClickHouseEndpoint:
        from services.core.settings import url_port

        parts = urlsplit(settings.clickhouse_url)
        host = parts.hostname or "127.0.0.1"
        port = url_port(settings.clickhouse_url, 8123)
        secret = settings.clickhouse_password
        return cls(
            name="clickhouse",
            ports=[Port(host, port, "FLYWHEEL_CLICKHOUSE_URL")],
            url=settings.clickhouse_url,
            data_dir=settings.path("clickhouse"),
            user=settings.clickhouse_user,
            password=secret.get_secret_value() if secret is not None else None,
            settings=settings,
        )

    @property
    def host(self) -> str:
        return self.ports[0].host if self.ports else "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ports[0].port if self.ports else 8123

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "services.stack.clickhouse_endpoint", "--data-dir", str(self.data_dir)]
        cmd += ["--host", self.host, "--port", str(self.port), "--user", self.user]
        if self.password:
            cmd += ["--password-env", PASSWORD_ENV]  # the name only: the secret never reaches a command line
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(PASSWORD_ENV, None)
        if self.password:
            env[PASSWORD_ENV] = self.password
        return env

    def cwd(self) -> Path | None:
        return Path(__file__).resolve().parents[2]  # so `-m services.stack...` resolves from any directory

    def prepare(self) -> None:
        if urlsplit(self.url).scheme != "http":
            raise StackError(
                f"{self.name}: the local ClickHouse endpoint serves plain http; "
                f"set FLYWHEEL_CLICKHOUSE_URL to an http:// URL (got {self.url})"
            )
        if importlib.util.find_spec("chdb") is None:  # not imported here: that would start an engine in this process
            raise StackError(f"{self.name}: chDB is not installed; pip install chdb")
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def ready(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1.0)  # direct: no proxy variables
        try:
            conn.request("GET", "/ping")
            resp = conn.getresponse()
            return bool(resp.status == 200 and resp.read() == b"Ok.\n")
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def endpoints(self) -> dict[str, str]:
        return {"clickhouse": self.url}

    def after_ready(self) -> None:
        if self.settings is None:
            return
        from services.core.clickhouse import apply_migrations, client

        ch = client(self.settings, ensure_database=True)
        try:
            applied = apply_migrations(ch)
        finally:
            ch.close()
        if applied:
            log.info("applied ClickHouse migrations: %s", ", ".join(applied))


if __name__ == "__main__":
    sys.exit(main())
