"""The logger's ClickHouse writes: idempotent batch inserts that retry until they succeed.

Interactions (the hot path): the batch's Avro records, their bodies wrapped in one object container
(``framing``), are loaded into a session's temporary staging table, then one ``INSERT ... SELECT`` maps them onto
``interactions`` (``rows.INTERACTION_SELECT``), leaving out

* request ids already stored: looked up by primary key in ``interaction_ids`` (migration 0006, filled by a
  materialized view in the same insert), so a replayed record and a request served twice are both found,
  however long ago the first was written;
* repeats inside the batch (``LIMIT 1 BY request_id``).

So a plain ``count()`` is exact, not only ``FINAL``, as long as one writer at a time handles a request id:
the logger's lanes split the partitions (the record key is the request id), and a rebalance lets the writes
in flight finish first (``service``). The table's ReplacingMergeTree key stays the backstop. All of it runs
in ClickHouse, in one statement after the load: nothing is decoded in Python. The staging table lives in an
HTTP session: behind a load balancer in front of several ClickHouse servers, sessions must be sticky.

Lifecycle events (a few a day): typed records → rows (``rows``) → ``client.insert``, skipping event ids
already in the table (one lookup a batch).

Failures. Nothing here commits offsets; a write returns only once its rows are durable, so the caller commits
after it. ClickHouse unreachable, or a server-side failure that is not about the data (out of memory, a
missing table...): logged with the URL and retried with backoff, for as long as it takes (nothing lost,
nothing skipped). Data that ClickHouse refuses (parse errors, type mismatches: a bug upstream): retried
``data_attempts`` times, then isolated: records the Python codec cannot decode are rejected with the codec's
reason, the rest is bisected until the rows ClickHouse refuses are found; those come back as ``rejected``
(the caller sends them to the DLQ) and every other row is written. A stop request (SIGTERM) ends the retries
with ``SinkStopped``: the batch was not written and must not be committed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    OperationalError,
    ProgrammingError,
)

from services.core.clickhouse import ClickHouseUnavailable, client
from services.core.codec import HEADER_LEN, MAGIC, AvroCodec, DecodeError
from services.core.records import Interaction, Record
from services.logger.framing import ContainerWriter, clickhouse_structure, compact_schema_json
from services.logger.rows import (
    INTERACTION_COLUMNS,
    INTERACTION_SELECT,
    INTERACTION_SELECT_SETTINGS,
    TableSpec,
)

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from services.core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

STAGING_TABLE = "logger_staging"
INSERT_SETTINGS = {
    **INTERACTION_SELECT_SETTINGS,
    # ReplacingMergeTree would collapse rows with equal keys inside each inserted block; the INSERT already
    # keeps one row per request id (LIMIT 1 BY), so skip that pass (about 20 % more rows/s, measured).
    "optimize_on_insert": 0,
}
REJECTED = "rejected"  # DeadLetter.error_kind of rows that ClickHouse refused

# Server error codes that mean "this data is wrong" (retrying cannot help; the rows go to the DLQ once
# isolated). Everything else the server says is treated as an operational problem and retried for ever:
# misfiling an outage as bad data would dead-letter good records.
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        25,  # CANNOT_PARSE_ESCAPE_SEQUENCE
        26,  # CANNOT_PARSE_QUOTED_STRING
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
        691,  # UNKNOWN_ELEMENT_OF_ENUM
    }
)
STD_EXCEPTION = 1001  # the Avro reader's own exceptions arrive as this code
UNKNOWN_TABLE = 60
_SERVER_CODE_RE = re.compile(r"Code: (\d+)")


class ErrorClass(Enum):
    CONNECTIVITY = "connectivity"  # no answer from ClickHouse
    SERVER = "server"  # ClickHouse answered with an error that is not about the data
    DATA = "data"  # ClickHouse (or the client, while encoding) refused the data


def server_code(exc: BaseException) -> int | None:
    match = _SERVER_CODE_RE.search(str(exc))
    return int(match.group(1)) if match else None


def classify(exc: BaseException) -> ErrorClass:
    if isinstance(exc, OperationalError | ClickHouseUnavailable | OSError):
        return ErrorClass.CONNECTIVITY
    if isinstance(exc, ProgrammingError):
        return ErrorClass.SERVER  # our SQL or column list against this table: every row would fail alike
    if isinstance(exc, DataError | TypeError | ValueError):
        return ErrorClass.DATA  # clickhouse-connect could not encode a value for its column
    if isinstance(exc, DatabaseError):
        code = server_code(exc)
        if code in DATA_ERROR_CODES or (code == STD_EXCEPTION and "avro" in str(exc).lower()):
            return ErrorClass.DATA
        if code is None:
            return ErrorClass.CONNECTIVITY  # an HTTP failure without ClickHouse's error text (a proxy)
    return ErrorClass.SERVER


class SinkStopped(Exception):
    """A stop was requested while a write was retrying: the batch was not (known to be) written."""


class DataRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rejected:
    index: int  # position in the written batch
    kind: str  # DeadLetter.error_kind: a codec DecodeError kind, or "rejected" (ClickHouse refused it)
    reason: str


@dataclass
class WriteResult:
    received: int
    written: int
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        """Rows left out because they were already in the table (or repeated in the batch)."""
        return self.received - self.written - len(self.rejected)


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.5
    max_s: float = 30.0
    data_attempts: int = 3  # tries of a batch that ClickHouse refuses as data before isolating bad rows

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * 2 ** min(attempt, 30))


class _Writer:
    """A ClickHouse client that is (re)connected on demand, and the retry loop around each write."""

    def __init__(
        self,
        settings: Settings,
        retry: RetryPolicy,
        stop: threading.Event,
        connect: Callable[[], Client],
    ) -> None:
        self.settings = settings
        self.retry = retry
        self.stop = stop
        self._connect = connect
        self._client: Client | None = None

    @property
    def ch(self) -> Client:
        if self._client is None:
            self._client = self._connect()
            self.on_connect(self._client)
        return self._client

    def on_connect(self, ch: Client) -> None:
        """Per-connection set-up (sessions' temporary tables)."""

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a broken connection must not hide the error being handled
                log.debug("logger: closing the ClickHouse client failed", exc_info=True)
            self._client = None

    def attempt(self, action: Callable[[], T], what: str, data_attempts: int | None = None) -> T:
        """Run ``action`` until it succeeds. Operational failures are retried for ever (with backoff, until a
        stop); data errors ``data_attempts`` times, then DataRejected."""
        data_attempts = self.retry.data_attempts if data_attempts is None else data_attempts
        failures = data_failures = 0
        while True:
            # A stop ends only the waits between tries of an outage: data errors are retried at once, a
            # bounded number of times, so a final flush still isolates bad rows and writes the rest.
            try:
                return action()
            except Exception as exc:
                kind = classify(exc)
                if kind is ErrorClass.DATA:
                    data_failures += 1
                    if data_failures >= data_attempts:
                        raise DataRejected(_short(exc)) from exc
                    log.warning(
                        "logger: ClickHouse refused %s (try %d of %d): %s",
                        what,
                        data_failures,
                        data_attempts,
                        _short(exc),
                    )
                else:
                    delay = self.retry.delay(failures)
                    log.error(
                        "logger: %s at ClickHouse %s failed (%s: %s); nothing is committed, retrying in %.1f s",
                        what,
                        self.settings.clickhouse_url,
                        kind.value,
                        _short(exc),
                        delay,
                    )
                    if kind is ErrorClass.CONNECTIVITY:
                        self.close()  # a new connection (and session) on the next try
                    if self.stop.wait(delay):
                        raise SinkStopped(f"{what}: stopped while retrying") from exc
                failures += 1

    def write_isolating(
        self, count: int, insert: Callable[[list[int]], int], what: str, reject: Callable[[int, str], None]
    ) -> int:
        """Write rows 0..count-1 with ``insert(indices) -> rows written``; on a data error after the
        configured tries, bisect until the refused rows are found (each goes to ``reject``). Returns rows
        written."""
        indices = list(range(count))
        try:
            return self.attempt(lambda: insert(indices), what)
        except DataRejected as exc:
            log.error("logger: ClickHouse refuses %s as data (%s); finding the rows at fault", what, exc.reason)
            return self._bisect(indices, insert, what, reject)

    def _bisect(
        self, indices: list[int], insert: Callable[[list[int]], int], what: str, reject: Callable[[int, str], None]
    ) -> int:
        if not indices:
            return 0
        try:
            return self.attempt(lambda: insert(indices), f"{what} ({len(indices)} rows)", data_attempts=1)
        except DataRejected as exc:
            if len(indices) == 1:
                reject(indices[0], exc.reason)
                return 0
            mid = len(indices) // 2
            return self._bisect(indices[:mid], insert, what, reject) + self._bisect(indices[mid:], insert, what, reject)


def _short(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."


class InteractionSink(_Writer):
    """Writes batches of interaction records, single-object encoded in the latest schema version (the caller
    checked the header: ``prefix``)."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event | None = None,
        retry: RetryPolicy | None = None,
        codec: AvroCodec | None = None,
        connect: Callable[[], Client] | None = None,
    ) -> None:
        self.codec = codec or AvroCodec()
        latest = self.codec.latest[Interaction.SCHEMA]
        self.prefix = MAGIC + latest.fingerprint  # the single-object header of a latest-version record
        schema_text = latest.path.read_text()
        self.container = ContainerWriter(compact_schema_json(schema_text))
        self.staging_structure = clickhouse_structure(json.loads(schema_text))
        self.insert_sql = interaction_insert_sql()
        # A session of its own: the staging table is a temporary table, private to this logger and dropped
        # by ClickHouse when the session ends, so a killed logger leaves nothing behind.
        session = f"flywheel-logger-{uuid.uuid4()}"
        super().__init__(
            settings,
            retry or RetryPolicy(),
            stop or threading.Event(),
            connect or (lambda: client(settings, session_id=session)),
        )

    def on_connect(self, ch: Client) -> None:
        self._create_staging(ch)

    def _create_staging(self, ch: Client) -> None:
        ch.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS {STAGING_TABLE} ({self.staging_structure}) ENGINE = Memory")

    def write(self, records: Sequence[bytes]) -> WriteResult:
        """Write the batch; returns once every row is in ClickHouse (or rejected). Raises SinkStopped."""
        if not records:
            return WriteResult(0, 0)
        try:
            written = self.attempt(lambda: self._insert(records), f"insert of {len(records)} interactions")
            return WriteResult(len(records), written)
        except DataRejected as exc:
            log.error(
                "logger: ClickHouse refuses a batch of %d interactions as data (%s); finding the records at fault",
                len(records),
                exc.reason,
            )
        rejected: list[Rejected] = []
        decodable: list[int] = []
        for index, data in enumerate(records):
            try:
                self.codec.decode(data, Interaction)
            except DecodeError as err:
                rejected.append(Rejected(index, err.kind, err.reason))
            else:
                decodable.append(index)

        def insert(positions: list[int]) -> int:
            return self._insert([records[decodable[p]] for p in positions])

        def reject(position: int, reason: str) -> None:
            rejected.append(Rejected(decodable[position], REJECTED, reason))

        written = self.write_isolating(len(decodable), insert, "interactions", reject) if decodable else 0
        rejected.sort(key=lambda r: r.index)
        return WriteResult(len(records), written, rejected)

    def _insert(self, records: Sequence[bytes]) -> int:
        ch = self.ch
        try:
            ch.command(f"TRUNCATE TABLE {STAGING_TABLE}")  # leftovers of a failed try
        except DatabaseError as exc:
            if server_code(exc) != UNKNOWN_TABLE:
                raise
            self._create_staging(ch)  # the session expired while idle, and its table with it
        container = self.container.container(records, skip=HEADER_LEN)
        ch.raw_insert(STAGING_TABLE, None, container, fmt="Avro")
        summary = ch.query(self.insert_sql, settings=INSERT_SETTINGS).summary
        # A server that reports no summary (some proxies): count every row as written. The summary counts the
        # rows the materialized view writes too: one interaction_ids row per interaction (migration 0006).
        if "written_rows" not in summary:
            return len(records)
        return int(summary["written_rows"]) // ROWS_WRITTEN_PER_INTERACTION


ROWS_WRITTEN_PER_INTERACTION = 2  # its row in interactions, and its id in interaction_ids (the view)


def interaction_insert_sql() -> str:
    """The INSERT ... SELECT from the staging table: mapped rows, minus request ids already stored."""
    # Built from constants only: no value from a record reaches the SQL text.
    return (
        f"INSERT INTO interactions ({', '.join(INTERACTION_COLUMNS)})\n"  # noqa: S608
        f"{INTERACTION_SELECT}\n"
        f"FROM {STAGING_TABLE} AS src\n"
        "WHERE src.request_id NOT IN (\n"
        "    SELECT request_id FROM interaction_ids\n"
        f"    WHERE request_id IN (SELECT request_id FROM {STAGING_TABLE}))\n"
        "LIMIT 1 BY src.request_id"
    )


class LifecycleSink(_Writer):
    """Writes typed lifecycle records (model events, dataset snapshots, retrain triggers)."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event | None = None,
        retry: RetryPolicy | None = None,
        connect: Callable[[], Client] | None = None,
    ) -> None:
        connect = connect or (lambda: client(settings))
        super().__init__(settings, retry or RetryPolicy(), stop or threading.Event(), connect)

    def write(self, spec: TableSpec, records: Sequence[Record]) -> WriteResult:
        if not records:
            return WriteResult(0, 0)
        rejected: list[Rejected] = []

        def reject(index: int, reason: str) -> None:
            rejected.append(Rejected(index, REJECTED, reason))

        written = self.write_isolating(
            len(records),
            lambda indices: self._insert(spec, [records[i] for i in indices]),
            f"insert of {len(records)} {spec.table} rows",
            reject,
        )
        rejected.sort(key=lambda r: r.index)
        return WriteResult(len(records), written, rejected)

    def _insert(self, spec: TableSpec, records: Sequence[Record]) -> int:
        ch = self.ch
        ids = list(dict.fromkeys(spec.record_id(r) for r in records))
        # Table and column names come from the TableSpec constants; the ids are a bound parameter.
        sql = f"SELECT {spec.id_column} FROM {spec.table} WHERE {spec.id_column} IN {{ids:Array(String)}}"  # noqa: S608
        stored = {row[0] for row in ch.query(sql, parameters={"ids": ids}).result_rows}
        rows: list[tuple[Any, ...]] = []
        for rec in records:
            rid = spec.record_id(rec)
            if rid not in stored:
                stored.add(rid)  # a repeat inside the batch too
                rows.append(spec.row(rec))
        if rows:
            ch.insert(spec.table, rows, column_names=list(spec.columns))
        return len(rows)
