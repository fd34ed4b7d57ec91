"""One HTTP request as ClickHouse reads it: URL parameters, headers and credentials into a ``QueryRequest``;
the body read from the socket in pieces, within the endpoint's size limit."""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl

from services.stack.clickhouse_endpoint.errors import (
    QUERY_IS_TOO_LARGE,
    SYNTAX_ERROR,
    UNKNOWN_EXCEPTION,
    ClickHouseError,
)

READ_PIECE = 1 << 20  # body bytes read from the socket per step
DRAIN_LIMIT = 1 << 30  # after an error, read at most this much of the unread body before closing instead
MAX_SESSION_TIMEOUT_S = 3600.0
_SETTING_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

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

    def __init__(self, rfile: Any, length: int | None, chunked: bool, limit: int | None = None) -> None:
        self._rfile = rfile
        self._remaining = length or 0
        self._chunked = chunked
        self.done = not chunked and not length
        self._pieces: Iterator[bytes] | None = None
        self.limit = limit
        self.received = 0
        self.refused = False  # over the limit: not drained, the connection is closed after the error

    def check_size(self) -> None:
        """Refuse a declared Content-Length over the limit before reading any of it."""
        if self.limit is not None and not self._chunked and self._remaining > self.limit:
            self.refused = True
            raise _too_large(self.limit, f"Content-Length {self._remaining}")

    def pieces(self) -> Iterator[bytes]:
        """The one reader of this body: a later call (drain after an error) resumes where the last stopped."""
        if self._pieces is None:
            self._pieces = self._counted(self._chunked_pieces() if self._chunked else self._sized_pieces())
        return self._pieces

    def _counted(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            self.received += len(piece)
            if self.limit is not None and self.received > self.limit:
                self.refused = True
                raise _too_large(self.limit, f"more than {self.limit} bytes received")
            yield piece

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
        if self.refused:
            return False
        seen = 0
        with contextlib.suppress(ClickHouseError, OSError, ValueError):
            for piece in self.pieces():
                seen += len(piece)
                if seen > limit:
                    return False
        return self.done


def _too_large(limit: int, what: str) -> ClickHouseError:
    return ClickHouseError.make(
        QUERY_IS_TOO_LARGE,
        f"Request body too large ({what}); this endpoint accepts at most {limit} bytes per request "
        "(FLYWHEEL_CLICKHOUSE_MAX_BODY_MB)",
    )
