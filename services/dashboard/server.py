"""The dashboard's HTTP server (aiohttp): one self-contained page and the JSON it draws from.

Routes:

* ``GET /``: the page (``static/index.html``: inline CSS and JS, charts drawn as SVG; no CDN, it works offline).
* ``GET /api/agents``: every agent with its stage and headline figures (``data.agent_list``).
* ``GET /api/agent/{agent_id}?window=auto|1h|6h|24h|7d|30d``: every panel of one agent (``data.agent_page``).
* ``GET /health``: ``ok`` once the server listens.

ClickHouse is read on each API call (in a worker thread: clickhouse-connect is blocking), so the page shows
what is stored now; a ClickHouse failure is a 503 whose JSON names the cause, and the page keeps retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

from services.core.agents import AgentsFile, load_agents
from services.core.clickhouse import ClickHouseError
from services.core.settings import Settings
from services.dashboard import data
from services.dashboard.store import DashboardStore, open_store

log = logging.getLogger("dashboard")
PAGE = Path(__file__).resolve().parent / "static" / "index.html"


class DashboardError(RuntimeError):
    """The dashboard cannot start (port taken, page missing); the message names the setting to change."""


class UnknownAgent(LookupError):
    def __init__(self, agent_id: str, known: list[str]) -> None:
        super().__init__(agent_id)
        self.agent_id = agent_id
        self.known = known

    def __str__(self) -> str:
        return f"no agent {self.agent_id!r}: not in the agents file, no traffic, no lifecycle events"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Dashboard:
    """Reads through the store and assembles the JSON documents (blocking; the handlers call it in a thread)."""

    def __init__(
        self, store: DashboardStore, agents: AgentsFile | None, clock: Callable[[], datetime] = _utcnow
    ) -> None:
        self.store = store
        self.agents = agents
        self.clock = clock

    def agent_list(self) -> dict[str, Any]:
        now = self.clock()
        listed = data.agent_list(self.agents, self.store.totals(), self.store.lifecycle_events())
        return {"generated_at": now.isoformat(), "agents": listed}

    def agent_page(self, agent_id: str, window_name: str) -> dict[str, Any]:
        now = self.clock()
        data.choose_window(window_name, now, None)  # a bad window name fails before any query
        totals = next(iter(self.store.totals(agent_id)), None)
        events = self.store.lifecycle_events()
        if not data.known(agent_id, self.agents, totals, events):
            known = sorted({*(self.agents.agents if self.agents else ()), *(e.agent_id for e in events)})
            raise UnknownAgent(agent_id, known)
        window = data.choose_window(window_name, now, totals.first_at if totals else None)
        config = self.agents.agents.get(agent_id) if self.agents else None
        rows = self.store.window_rows(agent_id, window)
        page = data.agent_page(agent_id, window, config, events, rows, totals)
        return {"generated_at": now.isoformat(), **page}


DASHBOARD_KEY: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)
PAGE_KEY: web.AppKey[str] = web.AppKey("page", str)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


def _json(body: dict[str, Any]) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def index(request: web.Request) -> web.Response:
    return web.Response(
        text=request.app[PAGE_KEY], content_type="text/html", charset="utf-8", headers={"Cache-Control": "no-store"}
    )


async def api_agents(request: web.Request) -> web.Response:
    try:
        return _json(await asyncio.to_thread(request.app[DASHBOARD_KEY].agent_list))
    except ClickHouseError as exc:
        return _error(f"ClickHouse: {_first_line(exc)}", 503)


async def api_agent(request: web.Request) -> web.Response:
    agent_id = request.match_info["agent_id"]
    window = request.query.get("window", data.AUTO)
    try:
        return _json(await asyncio.to_thread(request.app[DASHBOARD_KEY].agent_page, agent_id, window))
    except data.WindowError as exc:
        return _error(str(exc), 400)
    except UnknownAgent as exc:
        return web.json_response({"error": str(exc), "known": exc.known}, status=404)
    except ClickHouseError as exc:
        return _error(f"ClickHouse: {_first_line(exc)}", 503)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(dashboard: Dashboard, page: Path = PAGE) -> web.Application:
    if not page.is_file():
        raise DashboardError(f"the dashboard page {page} is missing (a broken install: reinstall slm-flywheel)")
    app = web.Application()
    app[DASHBOARD_KEY] = dashboard
    app[PAGE_KEY] = page.read_text(encoding="utf-8")
    app.router.add_get("/", index)
    app.router.add_get("/api/agents", api_agents)
    app.router.add_get("/api/agent/{agent_id}", api_agent)
    app.router.add_get("/health", health)
    return app


def open_dashboard(settings: Settings) -> Dashboard:
    """Connect to ClickHouse, check the flywheel's tables are there and read the agents file: every failure a
    clear error (ClickHouseUnavailable names FLYWHEEL_CLICKHOUSE_URL, AgentConfigError the agents file)."""
    agents = load_agents(settings.agents_file)
    return Dashboard(open_store(settings), agents)


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Listen on host:port; a taken port is a DashboardError naming --port and FLYWHEEL_DASHBOARD_PORT."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        raise DashboardError(
            f"the dashboard cannot listen on {host}:{port} ({reason}); choose another port with --port or "
            "FLYWHEEL_DASHBOARD_PORT"
        ) from exc
    return runner


def url_of(host: str, port: int) -> str:
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


async def run(dashboard: Dashboard, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Serve until cancelled (Ctrl-C) or SIGTERM."""
    runner = await start(create_app(dashboard), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Off the main thread (an embedding test) or on Windows there are no signal handlers: cancel to stop.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        on_ready(url_of(host, port))
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: Settings, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """``flywheel dashboard``: open the store, serve until Ctrl-C (KeyboardInterrupt) or SIGTERM."""
    dashboard = open_dashboard(settings)
    try:
        asyncio.run(run(dashboard, host, port, on_ready))
    finally:
        dashboard.store.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
