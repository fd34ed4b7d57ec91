"""The logger's write policy without I/O: when a batch is flushed (by size, bytes and age, on a hand-driven
clock), and how a write is retried, given up on a stop, or narrowed down to the rows ClickHouse refuses."""

from __future__ import annotations

import threading

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError

from services.core.settings import Settings
from services.logger.batching import Batcher, BatchPolicy
from services.logger.sink import (
    ErrorClass,
    RetryPolicy,
    SinkStopped,
    _Writer,
    classify,
    interaction_insert_sql,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_an_empty_batch_is_never_due(clock: FakeClock) -> None:
    batcher: Batcher[int] = Batcher(BatchPolicy(max_rows=3, max_age_s=0.2), clock)
    clock.advance(60)
    assert not batcher.due() and batcher.age() == 0.0
    assert batcher.wait_s(idle_s=0.5) == 0.5  # nothing to wait for: the reader's idle poll


def test_flush_by_size(clock: FakeClock) -> None:
    batcher: Batcher[int] = Batcher(BatchPolicy(max_rows=3, max_age_s=10), clock)
    batcher.add(1)
    batcher.add(2)
    assert not batcher.due() and batcher.room() == 1
    batcher.add(3)
    assert batcher.due() and batcher.full()
    assert batcher.take() == [1, 2, 3]
    assert len(batcher) == 0 and not batcher.due() and batcher.room() == 3


def test_room_never_drops_below_one(clock: FakeClock) -> None:
    batcher: Batcher[int] = Batcher(BatchPolicy(max_rows=1, max_age_s=10), clock)
    batcher.add(1)
    assert batcher.room() == 1  # a reader asked for 0 records would spin


def test_flush_by_age_counts_from_the_first_row(clock: FakeClock) -> None:
    # Times that are exact in binary floating point, so the boundary is exact too.
    batcher: Batcher[str] = Batcher(BatchPolicy(max_rows=100, max_age_s=0.25), clock)
    clock.advance(5)  # idle time before the first row does not count
    batcher.add("a")
    clock.advance(0.125)
    batcher.add("b")
    assert not batcher.due()
    assert batcher.wait_s(idle_s=0.5) == 0.125
    clock.advance(0.125)
    assert batcher.due() and batcher.wait_s(idle_s=0.5) == 0.0
    assert batcher.take() == ["a", "b"]
    # The next batch's age starts at its own first row.
    clock.advance(1.0)
    batcher.add("c")
    assert not batcher.due() and batcher.age() == 0.0


def test_flush_by_bytes(clock: FakeClock) -> None:
    batcher: Batcher[bytes] = Batcher(BatchPolicy(max_rows=100, max_age_s=10, max_bytes=1000), clock)
    batcher.add(b"x", nbytes=600)
    assert not batcher.due()
    batcher.add(b"y", nbytes=400)
    assert batcher.due() and batcher.nbytes == 1000
    batcher.take()
    assert batcher.nbytes == 0


def test_zero_age_flushes_every_read(clock: FakeClock) -> None:
    batcher: Batcher[int] = Batcher(BatchPolicy(max_rows=100, max_age_s=0), clock)
    batcher.add(1)
    assert batcher.due()


@pytest.mark.parametrize("bad", [{"max_rows": 0}, {"max_age_s": -1}, {"max_bytes": 0}])
def test_policy_refuses_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        BatchPolicy(**bad)


# The sink's retry and isolation policy, with fake writes ---------------------------------------------
def data_error(code: int = 27) -> DatabaseError:
    return DatabaseError(
        f"Received ClickHouse exception, code: {code}, server response: Code: {code}. DB::Exception: x"
    )


def test_errors_are_classified_by_what_retrying_can_fix() -> None:
    assert classify(OperationalError("connection refused")) is ErrorClass.CONNECTIVITY
    assert classify(ConnectionResetError()) is ErrorClass.CONNECTIVITY
    assert classify(data_error(27)) is ErrorClass.DATA  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    assert classify(data_error(53)) is ErrorClass.DATA  # TYPE_MISMATCH
    avro = DatabaseError("code: 1002, server response: Code: 1001, type: avro::Exception, e.what() = EOF reached")
    assert classify(avro) is ErrorClass.DATA
    assert classify(data_error(60)) is ErrorClass.SERVER  # UNKNOWN_TABLE: not the data's fault
    assert classify(data_error(241)) is ErrorClass.SERVER  # MEMORY_LIMIT_EXCEEDED
    assert classify(DatabaseError("HTTP 502 Bad Gateway")) is ErrorClass.CONNECTIVITY
    assert classify(TypeError("cannot encode")) is ErrorClass.DATA
    assert classify(ProgrammingError("Unrecognized column 'x' in table")) is ErrorClass.SERVER  # our bug


def test_backoff_doubles_up_to_the_cap() -> None:
    retry = RetryPolicy(initial_s=0.5, max_s=4.0)
    assert [retry.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert retry.delay(10_000) == 4.0


def writer(stop: threading.Event | None = None, data_attempts: int = 3) -> _Writer:
    settings = Settings(clickhouse_url="http://127.0.0.1:1")

    class NoClient:
        def close(self) -> None:
            pass

    return _Writer(settings, RetryPolicy(0.001, 0.002, data_attempts), stop or threading.Event(), NoClient)  # type: ignore[arg-type]


def test_an_outage_is_retried_until_it_ends_and_logged_with_the_url(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def action() -> int:
        calls.append(1)
        if len(calls) < 5:
            raise OperationalError("Connection refused")
        return 42

    assert writer().attempt(action, "insert of 3 interactions") == 42
    assert len(calls) == 5
    assert "http://127.0.0.1:1" in caplog.text and "nothing is committed" in caplog.text


def test_a_stop_ends_the_retries_without_success() -> None:
    stop = threading.Event()
    calls = []

    def action() -> int:
        calls.append(1)
        stop.set()  # SIGTERM while ClickHouse is down
        raise OperationalError("Connection refused")

    with pytest.raises(SinkStopped):
        writer(stop).attempt(action, "insert")
    assert len(calls) == 1


def test_a_stop_still_lets_the_final_flush_try_once() -> None:
    stop = threading.Event()
    stop.set()
    assert writer(stop).attempt(lambda: 7, "final flush") == 7


def test_a_stop_does_not_cut_short_the_isolation_of_bad_rows() -> None:
    stop = threading.Event()
    stop.set()  # the final flush at SIGTERM holds a bad row: it still goes to the DLQ, the rest is written
    refused: list[int] = []

    def insert(indices: list[int]) -> int:
        if 2 in indices:
            raise data_error()
        return len(indices)

    assert writer(stop).write_isolating(4, insert, "batch", lambda i, why: refused.append(i)) == 3
    assert refused == [2]


def test_data_errors_are_tried_n_times_then_the_bad_rows_are_isolated() -> None:
    bad = {3, 11}
    tries: list[list[int]] = []
    refused: list[tuple[int, str]] = []

    def insert(indices: list[int]) -> int:
        tries.append(indices)
        if bad & set(indices):
            raise data_error()
        return len(indices)

    written = writer(data_attempts=3).write_isolating(16, insert, "batch", lambda i, why: refused.append((i, why)))
    assert written == 14
    assert sorted(i for i, _ in refused) == [3, 11]
    assert all("Code: 27" in why for _, why in refused)
    assert tries[:3] == [list(range(16))] * 3  # N tries of the whole batch first
    written_rows = [i for t in tries[3:] if not bad & set(t) for i in t]
    assert sorted(written_rows) == [i for i in range(16) if i not in bad]  # each good row written once


def test_a_server_error_is_not_mistaken_for_bad_data() -> None:
    calls = []

    def insert(indices: list[int]) -> int:
        calls.append(indices)
        if len(calls) < 4:
            raise data_error(241)  # out of memory: retried, never dead-lettered
        return len(indices)

    refused: list[int] = []
    assert writer().write_isolating(5, insert, "batch", lambda i, why: refused.append(i)) == 5
    assert refused == [] and all(c == list(range(5)) for c in calls)


def test_dedupe_sql_looks_request_ids_up_by_primary_key_at_any_distance() -> None:
    sql = interaction_insert_sql()
    assert "SELECT request_id FROM interaction_ids" in sql and "received_at" not in sql.split("WHERE")[-1]
    assert "request_id IN (SELECT request_id FROM logger_staging)" in sql
    assert sql.rstrip().endswith("LIMIT 1 BY src.request_id")
