"""The chDB engine of one data directory: a pool of connections, one connection per HTTP session, and the
caps on concurrent queries and sessions.

chDB runs queries of different connections in parallel, and a connection's session state (USE, SET, temporary
tables) is its own, so sessionless requests borrow a pooled connection and a ``session_id`` keeps its own
connection until it times out. A connection made read-only (a GET) is never pooled: the engine's ``readonly``
cannot be lifted again, and a fresh connection costs ~2 ms.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.stack.clickhouse_endpoint.errors import (
    SESSION_IS_LOCKED,
    SESSION_NOT_FOUND,
    TOO_MANY_SIMULTANEOUS_QUERIES,
    UNKNOWN_EXCEPTION,
    ClickHouseError,
)
from services.stack.clickhouse_endpoint.request import QueryRequest


def quote_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class EngineConnection:
    """One chDB connection plus the per-request state last set on it, so a request only pays for changes."""

    def __init__(self, path: str) -> None:
        import chdb

        self.raw = chdb.connect(path)
        self.database: str | None = None
        self.settings: dict[str, str] = {}
        self.readonly = "0"
        self.reusable = True

    def prepare(self, database: str | None, settings: dict[str, str]) -> None:
        """Make the connection's current database and settings those of the request (``readonly`` last: once
        set, it cannot be lifted, and at 1 no other setting can change)."""
        if database is not None and database != self.database:
            self.database = None
            self._run(f"USE {quote_identifier(database)}")
            self.database = database
        settings = dict(settings)
        readonly = settings.pop("readonly", "0").strip() or "0"
        if settings != self.settings:
            self._apply(settings)
        if readonly != self.readonly:
            self.reusable = False  # never pooled again: the next request may need writes
            self._run(f"SET readonly = {quote_string(readonly)}")
            self.readonly = readonly

    def _apply(self, settings: dict[str, str]) -> None:
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
    """The chDB engine of one data directory: a pool of connections plus one connection per HTTP session."""

    def __init__(
        self, data_dir: Path, max_idle: int = 16, max_concurrent: int | None = None, max_sessions: int | None = None
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = str(data_dir)
        # Keeps the engine up while pooled connections come and go (chDB shuts down with its last connection).
        self._anchor = EngineConnection(self.path)
        version, tz = self._anchor.query("SELECT version(), timezone()", "TabSeparated", {}).bytes().split(b"\t")
        self.version = version.decode()
        self.timezone = tz.decode().strip()
        self._max_idle = max_idle
        self._max_concurrent = max_concurrent
        self._max_sessions = max_sessions
        self._idle: list[EngineConnection] = []
        self._sessions: dict[str, _Session] = {}
        self._busy = 0
        self._closed = False
        self._cond = threading.Condition()

    def table_functions(self) -> frozenset[str]:
        """Every table function this chDB has, lower-cased (the policy refuses those not known to be local)."""
        names = self._anchor.query("SELECT name FROM system.table_functions", "TabSeparated", {}).bytes()
        return frozenset(name.lower() for name in names.decode().split())

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

    def _admit(self) -> None:
        """Count one more running query, or refuse it (ClickHouse's max_concurrent_queries). Holds _cond."""
        if self._closed:
            raise ClickHouseError.make(UNKNOWN_EXCEPTION, "The server is shutting down")
        if self._max_concurrent is not None and self._busy >= self._max_concurrent:
            raise ClickHouseError.make(
                TOO_MANY_SIMULTANEOUS_QUERIES,
                f"Too many simultaneous queries. Maximum: {self._max_concurrent} "
                "(FLYWHEEL_CLICKHOUSE_MAX_CONCURRENT_QUERIES); retry shortly",
            )
        self._busy += 1

    def _borrow(self) -> EngineConnection:
        with self._cond:
            self._admit()
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
            self._admit()
            try:
                session = self._open_session(req, session_id)
            except BaseException:
                self._busy -= 1
                raise
        try:
            yield session.conn
        finally:
            session.timeout = req.session_timeout
            session.last_used = time.monotonic()
            session.lock.release()
            if req.close_session or not session.conn.reusable:  # a half-applied SET: start the session afresh
                self._close_session(session_id)
            self._release_busy()

    def _open_session(self, req: QueryRequest, session_id: str) -> _Session:
        """The session's connection, locked for this request (created if new and allowed). Holds _cond."""
        self._expire_sessions()
        session = self._sessions.get(session_id)
        if session is None and req.session_check:
            raise ClickHouseError.make(SESSION_NOT_FOUND, f"Session {session_id} not found")
        if session is None:
            if self._max_sessions is not None and len(self._sessions) >= self._max_sessions:
                raise ClickHouseError.make(
                    TOO_MANY_SIMULTANEOUS_QUERIES,
                    f"Too many open sessions. Maximum: {self._max_sessions} (FLYWHEEL_CLICKHOUSE_MAX_SESSIONS); "
                    "close one with close_session=1 or wait for one to time out",
                )
            session = _Session(EngineConnection(self.path), req.session_timeout)
            self._sessions[session_id] = session
        if not session.lock.acquire(blocking=False):
            raise ClickHouseError.make(SESSION_IS_LOCKED, f"Session {session_id} is locked by a concurrent client")
        return session

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
