"""The one way the project talks to ClickHouse: an HTTP client from the settings, and the schema migrations.

Every service and CLI gets its client from ``client(settings)``, always over HTTP to
``settings.clickhouse_url`` (the local stack serves chDB behind the same interface, see
``services.stack.clickhouse_endpoint``).

Migrations are numbered SQL files in ``infra/clickhouse/`` (``0001_interactions.sql``...). A file may hold
several statements separated by ``;``. Each file is applied once, in order, and recorded in
``schema_migrations`` (version, name, checksum, applied_at) only after all its statements succeeded. A file
that was applied is never edited: a changed checksum is an error naming the file; changes go in a new file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import clickhouse_connect

# clickhouse-connect's base error: what its client raises for a server error (with ClickHouse's text) or a
# transport failure. Ours derive from it, so callers catch every ClickHouse failure with one class.
from clickhouse_connect.driver.exceptions import ClickHouseError, OperationalError

from services.core.network import is_loopback
from services.core.sql_lexer import split_statements

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from services.core.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "infra" / "clickhouse"
MIGRATIONS_TABLE = "schema_migrations"
_MIGRATION_NAME_RE = re.compile(r"(?P<version>\d{4,})_(?P<name>[A-Za-z0-9][A-Za-z0-9_\-]*)\.sql")


class ClickHouseUnavailable(ClickHouseError):
    """ClickHouse did not answer at the configured URL; the message names the URL and what to do."""


class MigrationError(ClickHouseError):
    """A migration file is misnamed, was edited after being applied, or failed; the message names it."""


# The client -------------------------------------------------------------------------------------------------
def client(
    settings: Settings, /, database: str | None = None, *, ensure_database: bool = False, **kwargs: Any
) -> Client:
    """A clickhouse-connect client over HTTP to ``settings.clickhouse_url``.

    ``database`` defaults to ``settings.clickhouse_database``; with ``ensure_database`` it is created first if
    missing. Extra keyword arguments go to ``clickhouse_connect.get_client`` (e.g. ``settings=``).
    Raises ClickHouseUnavailable, naming the URL, when nothing answers there.
    """
    url = settings.clickhouse_url
    target = database or settings.clickhouse_database
    options = _connection_options(settings) | kwargs
    try:
        ch = clickhouse_connect.get_client(database=None if ensure_database else target, **options)
    except OperationalError as exc:
        raise ClickHouseUnavailable(
            f"ClickHouse is not reachable at {url} ({_root_cause(exc)}); start the local stack "
            "(flywheel up) or point FLYWHEEL_CLICKHOUSE_URL at a running server"
        ) from exc
    if ensure_database:
        try:
            ch.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(target)}")
        except Exception:
            ch.close()
            raise
        ch.database = target
    return ch


def _connection_options(settings: Settings) -> dict[str, Any]:
    parts = urlsplit(settings.clickhouse_url)
    secure = parts.scheme == "https"
    password = settings.clickhouse_password
    return {
        "host": parts.hostname,
        "port": parts.port or (8443 if secure else 8123),
        "interface": parts.scheme,
        "username": settings.clickhouse_user,
        "password": password.get_secret_value() if password is not None else "",
        # A proxy path (http://host:port/some/path) is kept, as ClickHouse behind a reverse proxy needs it.
        "proxy_path": parts.path.strip("/"),
        # Sessionless: one client can then be shared by threads (a session allows one query at a time).
        "autogenerate_session_id": False,
        # Compression pays over a network; on loopback it only costs CPU (inserts ~10 % slower, measured).
        "compress": not is_loopback(parts.hostname or ""),
    }


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def param_time(value: datetime) -> str:
    """A ``DateTime64(6, 'UTC')`` query parameter that keeps its microseconds (clickhouse-connect sends a
    ``datetime`` parameter rounded to whole seconds)."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# Migrations -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    checksum: str

    @property
    def filename(self) -> str:
        return self.path.name

    def statements(self) -> list[str]:
        return split_statements(self.path.read_text(encoding="utf-8"))


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The *.sql files of the directory, in version order; a misnamed or duplicate version is an error."""
    if not directory.is_dir():
        return []
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME_RE.fullmatch(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_description.sql (e.g. 0001_interactions.sql)")
        version = int(match.group("version"))
        if version in found:
            raise MigrationError(f"{path}: version {version} is also used by {found[version].path.name}")
        checksum = hashlib.sha256(path.read_bytes()).hexdigest()
        found[version] = Migration(version, match.group("name"), path, checksum)
    return [found[v] for v in sorted(found)]


def apply_migrations(ch: Client, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not yet applied, in order; return their file names (empty when up to date).

    Runs in the client's database. Not safe against two processes migrating the same database at once: the
    local stack runs it once, from the process that starts ClickHouse.
    """
    migrations = load_migrations(directory)
    _ensure_migrations_table(ch)
    applied = _applied(ch)
    for migration in migrations:
        _check_unchanged(migration, applied.get(migration.version))
    done: list[str] = []
    for migration in migrations:
        if migration.version not in applied:
            _apply(ch, migration)
            done.append(migration.filename)
    return done


def _ensure_migrations_table(ch: Client) -> None:
    ch.command(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
        " version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)"
        ") ENGINE = MergeTree ORDER BY version"
    )


def _applied(ch: Client) -> dict[int, tuple[str, str]]:
    sql = f"SELECT version, name, checksum FROM {MIGRATIONS_TABLE} ORDER BY version"  # noqa: S608 - a constant
    rows = ch.query(sql).result_rows
    return {int(version): (name, checksum) for version, name, checksum in rows}


def _check_unchanged(migration: Migration, recorded: tuple[str, str] | None) -> None:
    if recorded is None:
        return
    name, checksum = recorded
    if checksum != migration.checksum or name != migration.name:
        raise MigrationError(
            f"{migration.path}: changed after it was applied (recorded {name}, checksum {checksum[:12]}; "
            f"now {migration.name}, checksum {migration.checksum[:12]}). Applied migrations are never "
            "edited; restore the file and put the change in a new numbered migration"
        )


def _apply(ch: Client, migration: Migration) -> None:
    statements = migration.statements()
    for index, statement in enumerate(statements, start=1):
        try:
            ch.command(statement)
        except Exception as exc:
            raise MigrationError(
                f"{migration.path}: statement {index} of {len(statements)} failed, nothing recorded "
                f"(statements before it stay applied; make them idempotent, e.g. IF NOT EXISTS): {exc}"
            ) from exc
    ch.insert(
        MIGRATIONS_TABLE,
        [[migration.version, migration.name, migration.checksum]],
        column_names=["version", "name", "checksum"],
    )
    log.info("applied migration %s", migration.filename)
