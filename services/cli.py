"""``flywheel``: the command line of slm-flywheel (local stack, SQL, and later the services and the demo)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from services.core.settings import Settings, SettingsError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _known_errors() -> tuple[type[BaseException], ...]:
    from services.core.clickhouse import ClickHouseError
    from services.core.topics import TopicError
    from services.stack.process import StackError

    return (SettingsError, StackError, TopicError, ClickHouseError, FileNotFoundError)


def friendly_errors(func: F) -> F:
    """Known failures become one red line naming the cause and exit code 1, not a traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except _known_errors() as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@click.group()
@click.pass_context
def main(ctx: click.Context) -> None:
    """slm-flywheel: distil a frontier teacher into a small student from an agent's own traffic."""
    ctx.ensure_object(dict)


def _settings() -> Settings:
    return Settings.load()


def _stack_up(settings: Settings) -> None:
    from services.stack.local import LocalStack

    stack = LocalStack(settings)
    with console.status("starting the local stack...") as status:

        def progress(name: str, msg: str) -> None:
            status.update(f"{name}: {msg}...")
            if msg in ("ready", "already running"):
                console.print(f"  [green]✓[/] {name} {msg}")

        endpoints = stack.up(progress)
    table = Table(title="local stack", title_justify="left")
    table.add_column("part")
    table.add_column("listens on")
    for name, eps in endpoints.items():
        table.add_row(name, "\n".join(f"{k}: {v}" for k, v in eps.items()))
    console.print(table)
    console.print(f"logs in {settings.log_dir}; stop with [bold]flywheel down[/]")


@main.command()
@friendly_errors
def up() -> None:
    """Start the local stack (broker, ClickHouse endpoint, Triton), create topics, apply migrations."""
    _stack_up(_settings())


@main.command()
@friendly_errors
def down() -> None:
    """Stop every part of the local stack."""
    from services.stack.local import LocalStack

    stopped = LocalStack(_settings()).down()
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@main.command()
@friendly_errors
def status() -> None:
    """Show each part of the local stack: running or not, where it listens."""
    from services.stack.local import LocalStack

    settings = _settings()
    table = Table(title=f"local stack ({settings.home.absolute()})", title_justify="left")
    for col in ("part", "state", "pid", "listens on", "note"):
        table.add_column(col)
    for part in LocalStack(settings).status():
        colour = {"running": "green", "stopped": "dim"}.get(part.state, "red")
        table.add_row(
            part.name,
            f"[{colour}]{part.state}[/]",
            str(part.pid or ""),
            "\n".join(f"{k}: {v}" for k, v in part.endpoints.items()),
            part.note,
        )
    console.print(table)


def format_rows(columns: list[str], rows: list[tuple], fmt: str) -> str:
    if fmt == "json":
        return json.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=str, indent=2)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buf.getvalue().rstrip("\n")


@main.command()
@click.argument("query")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "tsv", "json"]), default="table", show_default=True
)
@friendly_errors
def sql(query: str, fmt: str) -> None:
    """Run a SQL query on ClickHouse and print the result."""
    from services.core.clickhouse import client

    result = client(_settings()).query(query)
    columns, rows = list(result.column_names), [tuple(r) for r in result.result_rows]
    if fmt != "table":
        click.echo(format_rows(columns, rows, fmt))
        return
    table = Table(show_lines=False)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    console.print(table)
    console.print(f"[dim]{len(rows)} row{'s' if len(rows) != 1 else ''}[/]")


def _smoke(settings: Settings) -> bool:
    from services.stack.smoke import run_smoke

    console.print("smoke round trip:")
    results = run_smoke(
        settings,
        lambda r: console.print(
            f"  {'[green]✓' if r.ok else '[red]✗'}[/] {r.part:<10} {r.ms:7.0f} ms  {r.detail}"
        ),
    )
    return all(r.ok for r in results)


@main.command()
@friendly_errors
def smoke() -> None:
    """Round-trip a record through Kafka, a query through ClickHouse and an inference through Triton."""
    if not _smoke(_settings()):
        sys.exit(1)


@main.command()
@friendly_errors
def demo() -> None:
    """Start the local stack and run the demo (for now: a smoke round trip through every part)."""
    settings = _settings()
    _stack_up(settings)
    if not _smoke(settings):
        sys.exit(1)
    console.print("[bold green]the local stack is up and every part answered.[/] Try:")
    console.print('  flywheel sql "SELECT version, name, applied_at FROM schema_migrations"')
    console.print("  flywheel status\n  flywheel down")


@main.command("config")
@friendly_errors
def show_config() -> None:
    """Show the effective settings (secrets masked)."""
    console.print_json(json.dumps(_settings().as_dict(), default=str))


if __name__ == "__main__":
    main()
