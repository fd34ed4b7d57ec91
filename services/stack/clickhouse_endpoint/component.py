"""The local stack's ClickHouse as a stack component: the endpoint run as its own process."""

from __future__ import annotations

import http.client
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from services.stack.clickhouse_endpoint.cli import unsafe_bind
from services.stack.clickhouse_endpoint.limits import Limits
from services.stack.process import Component, Port, StackError

if TYPE_CHECKING:
    from services.core.settings import Settings

log = logging.getLogger("clickhouse-endpoint")

PASSWORD_ENV = "FLYWHEEL_CLICKHOUSE_PASSWORD"  # noqa: S105 - a variable name, not a secret


@dataclass
class ClickHouseEndpoint(Component):
    """The local stack's ClickHouse: this module run as its own process, owning the chDB data directory."""

    url: str = "http://127.0.0.1:8123"
    data_dir: Path = Path(".flywheel/clickhouse")
    user: str = "default"
    password: str | None = None
    settings: Settings | None = None  # for after_ready's migrations
    limits: Limits = field(default_factory=Limits)

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
            limits=Limits.from_settings(settings),
        )

    @property
    def host(self) -> str:
        return self.ports[0].host if self.ports else "127.0.0.1"

    @property
    def port(self) -> int:
        return self.ports[0].port if self.ports else 8123

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "services.stack.clickhouse_endpoint", "--data-dir", str(self.data_dir)]
        cmd += ["--host", self.host, "--port", str(self.port), "--user", self.user, *self.limits.args()]
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
        refusal = unsafe_bind(self.host, self.password)
        if refusal:
            raise StackError(f"{self.name}: {refusal}")
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
