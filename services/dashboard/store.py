"""What the dashboard reads from ClickHouse (the only I/O besides HTTP): the queries of
``services.dashboard.queries`` turned into the typed rows of ``services.dashboard.data``, and the lifecycle
events through ``services.core.lifecycle_store`` (the same reading every service starts from)."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from services.core.clickhouse import ClickHouseError, ClickHouseUnavailable, client
from services.core.lifecycle import LifecycleEvent
from services.core.lifecycle_store import read_lifecycle_events
from services.dashboard import queries
from services.dashboard.data import AgentTotals, AgreementRow, CostRow, LatencyRow, TrafficRow, Window, WindowRows

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from services.core.settings import Settings


class MissingTables(ClickHouseError):
    """The database lacks the flywheel's tables: the migrations were not applied there."""


class DashboardStore:
    """Intention-revealing reads over one ClickHouse client. Thread-safe: the server runs each read in a worker
    thread, and a lock keeps one query at a time on the client."""

    def __init__(self, ch: Client) -> None:
        self.ch = ch
        self._lock = threading.Lock()

    def check_schema(self, database: str) -> None:
        """Raise MissingTables, naming them, when the migrations were not applied to ``database``."""
        rows = self._query(queries.PRESENT_TABLES_SQL, {"tables": list(queries.REQUIRED_TABLES)})
        missing = sorted(set(queries.REQUIRED_TABLES) - {r["name"] for r in rows})
        if missing:
            raise MissingTables(
                f"ClickHouse database {database!r} has no table {', '.join(missing)}: apply the migrations "
                "(flywheel up does) or point FLYWHEEL_CLICKHOUSE_DATABASE at the flywheel's database"
            )

    def totals(self, agent_id: str = "") -> list[AgentTotals]:
        """All-time figures per agent (every agent when ``agent_id`` is empty)."""
        rows = self._query(queries.SUMMARY_SQL, {"agent": agent_id})
        return [
            AgentTotals(
                agent_id=r["agent_id"],
                requests=int(r["requests"]),
                student_served=int(r["student_served"]),
                teacher_served=int(r["teacher_served"]),
                failed=int(r["failed"]),
                actual_usd=float(r["actual_usd"]),
                teacher_only_usd=float(r["teacher_only_usd"]),
                shadow_samples=int(r["shadow_samples"]),
                shadow_agreed=int(r["shadow_agreed"]),
                first_at=_utc(r["first_at"]),
                last_at=_utc(r["last_at"]),
            )
            for r in rows
        ]

    def window_rows(self, agent_id: str, window: Window) -> WindowRows:
        params = {"agent": agent_id, "since": window.since, "bucket": window.bucket_s}
        return WindowRows(
            traffic=[
                TrafficRow(int(r["t"]), r["served_by"], r["route_reason"], int(r["requests"]))
                for r in self._query(queries.TRAFFIC_SQL, params)
            ],
            agreement=[
                AgreementRow(int(r["t"]), int(r["samples"]), int(r["agreed"]))
                for r in self._query(queries.AGREEMENT_SQL, params)
            ],
            cost=[
                CostRow(int(r["t"]), int(r["requests"]), float(r["actual_usd"]), float(r["teacher_only_usd"]))
                for r in self._query(queries.COST_SQL, params)
            ],
            latency=[
                LatencyRow(
                    r["served_by"],
                    int(r["requests"]),
                    float(r["p50_ms"]),
                    float(r["p95_ms"]),
                    float(r["p95_end_to_end_ms"]),
                )
                for r in self._query(queries.LATENCY_SQL, params)
            ],
        )

    def lifecycle_events(self) -> list[LifecycleEvent]:
        with self._lock:
            return read_lifecycle_events(self.ch)

    def close(self) -> None:
        self.ch.close()

    def _query(self, sql: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.ch.query(sql, parameters=parameters).named_results())


def open_store(settings: Settings) -> DashboardStore:
    """Connect and check the flywheel's tables are there; each failure names the setting to change
    (ClickHouseUnavailable: FLYWHEEL_CLICKHOUSE_URL; MissingTables: FLYWHEEL_CLICKHOUSE_DATABASE)."""
    database = settings.clickhouse_database
    try:
        ch = client(settings)
    except ClickHouseUnavailable:
        raise
    except ClickHouseError as exc:
        if "UNKNOWN_DATABASE" not in str(exc):
            raise
        raise MissingTables(
            f"ClickHouse at {settings.clickhouse_url} has no database {database!r}: set FLYWHEEL_CLICKHOUSE_DATABASE "
            "to the flywheel's database, or start the local stack (flywheel up) to create it"
        ) from exc
    store = DashboardStore(ch)
    try:
        store.check_schema(database)
    except Exception:
        store.close()
        raise
    return store


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
