"""``flywheel``: the command line of slm-flywheel (local stack, SQL, and later the services and the demo)."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from services.core.settings import Settings, SettingsError

if TYPE_CHECKING:
    from services.router.state import RouterState

# Rich cuts tables to 80 columns when the output is not a terminal (a log file, CI), which turned figures into
# "$0.1…". Outside a terminal: $COLUMNS if set, else wide enough that numbers stay whole.
WIDE_OUTPUT = 200


def output_width(stream: Any) -> int | None:
    """The width for a console writing to `stream`: None (ask the terminal) for a terminal."""
    if hasattr(stream, "isatty") and stream.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else WIDE_OUTPUT


console = Console(width=output_width(sys.stdout))
err_console = Console(stderr=True, width=output_width(sys.stderr))
F = TypeVar("F", bound=Callable[..., Any])


def _known_errors() -> tuple[type[BaseException], ...]:
    from services.core.agents import AgentConfigError, UnknownAgentError
    from services.core.clickhouse import ClickHouseError
    from services.core.dead_letters import DeadLetterError
    from services.core.topics import TopicError
    from services.demo.own_data import OwnDataError
    from services.export import ExportError
    from services.stack.process import StackError
    from services.teacher.datasets import DataSetError

    return (
        SettingsError,
        StackError,
        TopicError,
        ClickHouseError,
        FileNotFoundError,
        AgentConfigError,
        UnknownAgentError,
        DeadLetterError,
        ExportError,
        DataSetError,
        OwnDataError,
        TimeoutError,
        click.UsageError,
    )


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
    _print_agents(settings)


def _print_agents(settings: Settings) -> None:
    """Each agent's lifecycle stage and, in the grace period, its progress (needs ClickHouse)."""
    from services.core.clickhouse import ClickHouseError
    from services.curator.service import grace_progress

    try:
        progress = grace_progress(settings)
        lifecycles = _lifecycles(settings)
    except ClickHouseError as exc:
        console.print(f"[dim]agents: ClickHouse not reachable ({str(exc).splitlines()[0]})[/]")
        return
    for status in progress:
        life = lifecycles.get(status.agent_id)
        stage = life.stage if life else "grace"
        if stage == "grace":
            console.print(status.describe(), highlight=False)
        else:
            student = f", student {life.model_name} v{life.model_version}" if life and life.has_student else ""
            console.print(f"{status.agent_id}: {stage}{student}", highlight=False)
        if life and life.last_failure:
            console.print(f"{status.agent_id}: the last training job failed at {life.last_failure}", highlight=False)


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
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "tsv", "json"]), default="table", show_default=True)
@click.option(
    "--param", "params", multiple=True, metavar="NAME=VALUE", help="A query parameter ({NAME:Type} in the SQL)"
)
@friendly_errors
def sql(query: str, fmt: str, params: tuple[str, ...]) -> None:
    """Run a SQL query on ClickHouse and print the result.

    Queries from docs/sql.md take their parameters with --param, e.g.
    flywheel sql "$(cat q.sql)" --param agent=support-bot --param days=7
    """
    from services.core.clickhouse import client

    parameters = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.UsageError(f"--param {item!r}: expected NAME=VALUE")
        parameters[name] = value
    result = client(_settings()).query(query, parameters=parameters or None)
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
        lambda r: console.print(f"  {'[green]✓' if r.ok else '[red]✗'}[/] {r.part:<10} {r.ms:7.0f} ms  {r.detail}"),
    )
    return all(r.ok for r in results)


@main.command()
@friendly_errors
def smoke() -> None:
    """Round-trip a record through Kafka, a query through ClickHouse and an inference through Triton."""
    if not _smoke(_settings()):
        sys.exit(1)


def own_data_options(data_help: str) -> Callable[[F], F]:
    """``--data FILE`` and ``--mapping FILE`` (a data set of your own, docs/own-data.md)."""

    def decorate(func: F) -> F:
        func = click.option(
            "--mapping",
            "mapping_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="With --data: labels to tools and replies (YAML or JSON); default one tool per label",
        )(func)
        return click.option(
            "--data", "data_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=data_help
        )(func)

    return decorate


@main.command()
@click.option("--short", is_flag=True, help="Shorter live and recovery phases (training is the same): a first look")
@click.option(
    "--workload",
    "workload_name",
    type=click.Choice(["banking77", "nlupp"]),
    default="banking77",
    show_default=True,
    help="banking77: the support-bot agent; nlupp: the banking-nlu agent (several intents and slots)",
)
@click.option("--reset", is_flag=True, help="Stop the stack and delete FLYWHEEL_HOME first (starts from nothing)")
@click.option("--smoke-only", is_flag=True, help="Only start the stack and check every part answers")
@own_data_options(
    "Your own labelled data set (CSV, TSV or JSONL: text, label, optional arguments and split) instead of "
    "--workload; its agent <name>-bot is added to FLYWHEEL_HOME/agents.yaml (docs/own-data.md)"
)
@friendly_errors
def demo(
    short: bool, workload_name: str, reset: bool, smoke_only: bool, data_file: Path | None, mapping_file: Path | None
) -> None:
    """Start the local stack and run the whole flywheel: grace period, training, the student live, drift,
    retraining and recovery, then a report (also written to FLYWHEEL_HOME/demo/report.md and .json)."""
    import asyncio

    from rich.markdown import Markdown

    from services.core.agents import load_agents
    from services.demo.plan import AGENT_FOR_WORKLOAD, make_plan
    from services.demo.run import Demo, DemoError, check_fresh, reset_home
    from services.teacher.workloads import load_workload

    settings = _settings()
    if mapping_file is not None and data_file is None:
        raise click.UsageError("--mapping goes with --data")
    if reset:
        reset_home(settings)
        console.print(f"reset: deleted {settings.home.absolute()}")
        settings = _settings()  # FLYWHEEL_HOME/agents.yaml, if there was one, went with it
    held_back = 5
    if data_file is not None:
        settings, agent_id, workload, held_back = _own_data_demo(settings, data_file, mapping_file)
    else:
        agent_id = AGENT_FOR_WORKLOAD[workload_name]
        workload = load_workload(workload_name, settings.data_dir)
    _stack_up(settings)
    if not _smoke(settings):
        sys.exit(1)
    if smoke_only:
        console.print("[bold green]the local stack is up and every part answered.[/]")
        return
    agent_cfg = load_agents(settings.agents_file).agent(agent_id)
    plan = make_plan(
        workload,
        agent_cfg.grace_period.min_unique_intents,
        short=short,
        agent_id=agent_id,
        held_back=held_back,
        grace_conversations=agent_cfg.grace_period.min_conversations,
    )
    try:
        check_fresh(settings, agent_id)
        report = asyncio.run(Demo(settings, plan, console, settings.home.absolute() / "demo").run())
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    console.rule("[bold]report[/]")
    console.print(Markdown(report.markdown()))
    out = settings.home.absolute() / "demo"
    console.print(
        f"report: {out / 'report.md'} and {out / 'report.json'}; the stack keeps running: try "
        "`flywheel status`, `flywheel models " + agent_id + "`, `flywheel dashboard`, `flywheel down`"
    )


def _own_data_demo(settings: Settings, data_file: Path, mapping_file: Path | None):
    """Register a data set of your own and give it the demo agent: (settings reading the agents file that holds
    it, agent id, workload, intents held back for the drift phase)."""
    from services.core.agents import load_agents
    from services.curator.labelling import Embedder
    from services.demo.own_data import TEMPLATE_AGENT, cluster_threshold, demo_agent, demo_sizes, write_agents_file
    from services.demo.plan import frequent_intents
    from services.stack.local import LocalStack
    from services.teacher.datasets import load_file, register

    workload = load_file(data_file, mapping_file)
    template = load_agents(settings.agents_file).agent(TEMPLATE_AGENT)
    first, held_back = demo_sizes(len(workload.intents), template.grace_period.min_unique_intents)
    with console.status("calibrating the intent clusters on the data set (MiniLM embeddings)..."):
        threshold = cluster_threshold(workload, frequent_intents(workload)[:first], Embedder().embed)
    agent = demo_agent(workload, template, first, threshold)
    target = settings.home.absolute() / "agents.yaml"
    running = [p.name for p in LocalStack(settings).status() if p.pid is not None and p.name in SERVICE_PARTS]
    if running and settings.agents_file.absolute() != target:
        raise click.ClickException(
            f"the stack's services ({', '.join(running)}) are running with {settings.agents_file}, which does not "
            f"hold {agent.agent_id}: stop them first (`flywheel down`), or run with --reset"
        )
    base = settings.agents_file if settings.agents_file.absolute() != target else target
    write_agents_file(base, agent, target)
    register(workload, settings.home.absolute())
    console.print(
        f"data set [bold]{workload.name}[/]: {len(workload.examples('train'))} train and "
        f"{len(workload.examples('test'))} test messages, {len(workload.intents)} labels, {len(workload.tools)} "
        f"tools; agent [bold]{agent.agent_id}[/] in {target} (teacher: {workload.model}; intent clusters join at "
        f"cosine {threshold:.2f})"
    )
    return settings.model_copy(update={"agents_file": target}), agent.agent_id, workload, held_back


SERVICE_PARTS = ("logger", "router", "gateway", "curator", "trainer", "drift_monitor")


@main.command()
@click.argument("text")
@click.option("--agent", "agent_id", required=True, help="An agent of agents.yaml")
@click.option("--conversation", "conversation_id", default=None, help="Keeps a conversation's requests in order")
@click.option("--intent", default=None, help="The intent label, if you know it")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, help="Seconds to wait for the answer")
@click.option("--json", "as_json", is_flag=True, help="Print the whole response record as JSON")
@friendly_errors
def send(
    text: str, agent_id: str, conversation_id: str | None, intent: str | None, timeout_s: float, as_json: bool
) -> None:
    """Send one user message to an agent through Kafka and print the answer."""
    import uuid

    from services.client import SyncFlywheelClient
    from services.core.records import ChatMessage, InferenceRequest

    settings = _settings()
    request = InferenceRequest(
        conversation_id=conversation_id or f"cli-{uuid.uuid4().hex[:12]}",
        agent_id=agent_id,
        intent=intent,
        messages=[ChatMessage(role="user", content=text)],
        metadata={"source": "flywheel send"},
    )
    with SyncFlywheelClient(settings) as client:
        response = client.submit(request, timeout_s)
    if as_json:
        click.echo(response.model_dump_json(indent=2))
    elif response.error:
        err_console.print(f"[bold red]error:[/] {response.error}", highlight=False)
    else:
        calls = "".join(f"\n  tool call: {c.name}({c.arguments})" for c in response.tool_calls)
        console.print(response.content or "", highlight=False, markup=False, end="")
        console.print(calls, highlight=False, markup=False)
        confidence = f", confidence {response.confidence:.2f}" if response.confidence is not None else ""
        version = f" v{response.model_version}" if response.model_version else ""
        console.print(
            f"[dim]served by {response.served_by}{version} in {response.latency_ms:.0f} ms{confidence}, "
            f"${response.cost_usd:.6f}[/]"
        )
    if response.error:
        sys.exit(1)


@main.command()
@click.option("--agent", "agent_id", required=True, help="An agent of agents.yaml")
@click.option("--count", default=100, show_default=True, help="Requests to send")
@click.option("--rate", default=20.0, show_default=True, help="Requests per second (0 = as fast as possible)")
@click.option(
    "--workload", "workload_name", type=click.Choice(["banking77", "nlupp"]), default="banking77", show_default=True
)
@own_data_options(
    "Replay your own labelled data set (CSV, TSV or JSONL) instead of --workload; the reference teacher answers "
    "it as reference/<name> (docs/own-data.md)"
)
@click.option("--intents", default=None, help="Comma-separated intents to draw from (default: all)")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="train", show_default=True)
@click.option("--label-share", default=0.0, show_default=True, help="Share of requests carrying the client's label")
@click.option("--seed", default=7, show_default=True)
@friendly_errors
def replay(
    agent_id: str,
    count: int,
    rate: float,
    workload_name: str,
    intents: str | None,
    split: str,
    label_share: float,
    seed: int,
    data_file: Path | None,
    mapping_file: Path | None,
) -> None:
    """Replay a data set's user messages as conversations through the router (the demo's traffic)."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from services.core.agents import load_agents
    from services.workload import replay as run_replay

    settings = _settings()
    agent_cfg = load_agents(settings.agents_file).agent(agent_id)
    if data_file is not None:
        from services.teacher.datasets import load_file, register

        workload = load_file(data_file, mapping_file)
        register(workload, settings.home.absolute())
        workload_name = workload.name
        if agent_cfg.teacher.model.startswith("reference/") and agent_cfg.teacher.model != workload.model:
            err_console.print(
                f"[yellow]note:[/] {agent_id}'s teacher is {agent_cfg.teacher.model}; the reference teacher answers "
                f"this data set as {workload.model} (set teacher.model in agents.yaml)",
                highlight=False,
            )
    elif mapping_file is not None:
        raise click.UsageError("--mapping goes with --data")
    chosen = [i.strip() for i in intents.split(",") if i.strip()] if intents else None
    with Progress(
        TextColumn("replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[split]}"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("replay", total=count, split="")

        def progress(r) -> None:
            split_text = " ".join(f"{k} {v}" for k, v in sorted(r.served_by.items()))
            bar.update(task, completed=r.answered + r.errors, split=split_text)

        result = asyncio.run(
            run_replay(
                settings,
                agent_id,
                workload_name,
                count,
                rate or None,
                chosen,
                split,
                label_share,
                seed,
                progress=progress,
            )
        )
    served = ", ".join(f"{k}: {v}" for k, v in sorted(result.served_by.items())) or "nothing"
    console.print(
        f"{result.answered}/{result.sent} answered in {result.seconds:.1f} s ({served}); {result.errors} errors; "
        f"intent matches the gold label in {result.accuracy:.1%}"
    )
    if result.errors:
        sys.exit(1)


THRESHOLDS = ("confidence_threshold", "shadow_rate")


@main.group()
def agent() -> None:
    """Inspect agents and change them at run time."""


@agent.command("list")
@friendly_errors
def agent_list() -> None:
    """The agents of agents.yaml with the mode, tier and thresholds routing applies now (run-time changes
    included) and where each came from, their lifecycle stage and student."""
    settings = _settings()
    state = _router_state(settings)
    table = Table(title=str(settings.agents_file), title_justify="left")
    for col in ("agent", "mode", "tier", "confidence threshold", "shadow rate", "teacher model", "stage", "student"):
        table.add_column(col)
    for agent_id, rt in state.runtime.items():
        life = rt.lifecycle
        student = f"{life.model_name} v{life.model_version}" if life.has_student else "none"
        cells = {e.name: f"{e.value} ({e.source})" for e in state.effective(agent_id)}
        table.add_row(
            agent_id,
            cells["mode"],
            cells["tier"],
            cells["confidence_threshold"],
            cells["shadow_rate"],
            rt.config.teacher.model,
            life.stage,
            student,
        )
    console.print(table)


def _lifecycle_events(settings: Settings) -> list:
    from services.core.clickhouse import client
    from services.core.lifecycle_store import read_lifecycle_events

    ch = client(settings)
    try:
        return read_lifecycle_events(ch)
    finally:
        ch.close()


def _lifecycles(settings: Settings) -> dict:
    from services.core.lifecycle import fold

    events = _lifecycle_events(settings)
    return {a: fold(a, [e for e in events if e.agent_id == a]) for a in {e.agent_id for e in events}}


def _router_state(settings: Settings) -> RouterState:
    """What the router applies now, rebuilt the way the router builds it: agents.yaml, the lifecycle events
    (ClickHouse), then the run-time changes on flywheel.control (refused ones change nothing, as in the router)."""
    import asyncio

    from services.core.agents import load_agents
    from services.core.codec import AvroCodec, DecodeError
    from services.core.kafka import read_to_end
    from services.core.records import AgentControl
    from services.core.topics import CONTROL
    from services.router.state import RouterState

    state = RouterState(load_agents(settings.agents_file))
    for event in _lifecycle_events(settings):
        state.apply_lifecycle(event)
    codec = AvroCodec()
    for msg in asyncio.run(read_to_end(settings, CONTROL.name)):
        try:
            state.apply_control(codec.decode(msg.value, AgentControl))
        except DecodeError:
            continue  # the logger dead-letters it; it changed nothing in the router either
    return state


@agent.command("set")
@click.argument("agent_id")
@click.option("--mode", type=click.Choice(["teacher", "student", "auto"]))
@click.option("--tier", type=click.Choice(["cost-optimized", "accuracy-optimized"]))
@click.option(
    "--threshold",
    "thresholds",
    multiple=True,
    metavar="NAME=VALUE",
    help=f"One of {', '.join(THRESHOLDS)}, in [0, 1]; repeatable",
)
@friendly_errors
def agent_set(agent_id: str, mode: str | None, tier: str | None, thresholds: tuple[str, ...]) -> None:
    """Change an agent's mode, tier or thresholds at run time (a record on flywheel.control)."""
    import asyncio

    from services.core.agents import load_agents
    from services.core.codec import AvroCodec
    from services.core.kafka import Publisher, create_producer
    from services.core.records import AgentControl
    from services.core.topics import CONTROL

    settings = _settings()
    load_agents(settings.agents_file).agent(agent_id)  # unknown agent: a clear error naming the known ones
    values: dict[str, float] = {}
    for item in thresholds:
        name, sep, raw = item.partition("=")
        if not sep or name not in THRESHOLDS:
            raise click.UsageError(
                f"--threshold {item!r}: expected NAME=VALUE with NAME one of {', '.join(THRESHOLDS)}"
            )
        try:
            value = float(raw)
        except ValueError:
            raise click.UsageError(f"--threshold {item!r}: {raw!r} is not a number") from None
        if not 0 <= value <= 1:
            raise click.UsageError(f"--threshold {item!r}: must be between 0 and 1")
        values[name] = value
    if mode is None and tier is None and not values:
        raise click.UsageError("nothing to change: give --mode, --tier or --threshold")
    if mode == "student":
        life = _lifecycles(settings).get(agent_id)
        if life is None or not life.has_student:
            raise click.UsageError(f"{agent_id}: mode student refused, the agent has no promoted student yet")
    control = AgentControl(agent_id=agent_id, mode=mode, tier=tier, thresholds=values, changed_by="flywheel agent set")

    async def publish() -> None:
        producer = create_producer(settings)
        await producer.start()
        try:
            await Publisher(producer, AvroCodec()).send(CONTROL, control, key=agent_id)
        finally:
            await producer.stop()

    asyncio.run(publish())
    changes = {k: v for k, v in (("mode", mode), ("tier", tier)) if v} | values
    console.print(f"{agent_id}: " + ", ".join(f"{k}={v}" for k, v in changes.items()))


@main.command("import")
@click.option("--agent", "agent_id", required=True, help="The agent whose history it is (of agents.yaml)")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@friendly_errors
def import_history(agent_id: str, path: Path) -> None:
    """Import an agent's teacher history (JSONL: chat fine-tuning lines, or request/response pairs as gateways
    log them) as interactions: they count toward the grace period and are curated like live traffic.
    Importing the same file again adds nothing; bad lines are listed in FILE.rejected.jsonl."""
    import asyncio

    from services.history_import import import_file, rejected_path

    sent, known, bad = asyncio.run(import_file(_settings(), agent_id, path))
    again = f" ({known} already imported)" if known else ""
    console.print(f"imported {sent} interaction{'s' if sent != 1 else ''} for {agent_id} from {path}{again}")
    if bad:
        first = "; ".join(f"line {b.number}: {b.reason}" for b in bad[:3])
        err_console.print(
            f"[yellow]{len(bad)} bad line{'s' if len(bad) != 1 else ''}[/] ({first}{' ...' if len(bad) > 3 else ''});"
            f" all in {rejected_path(path)}",
            highlight=False,
        )


@main.command("export")
@click.argument("agent_id")
@click.argument("version", type=int, required=False)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="A new folder")
@friendly_errors
def export(agent_id: str, version: int | None, out: Path) -> None:
    """Write a student version (default: the newest) as a folder that runs with transformers alone: merged
    weights and tokenizer, its answer template and label constraint, the decoder, answer.py and a README."""
    from services.export import export_student

    chosen, folder = export_student(_settings(), agent_id, version, out)
    console.print(f"exported {agent_id} version {chosen} to {folder}: try `python {folder / 'answer.py'}`")


@main.group()
def dlq() -> None:
    """Dead letters: records a service could not process, stored with the reason (list, show, replay)."""


@dlq.command("list")
@click.option("--topic", help="Only those of this source topic (e.g. requests)")
@click.option("--kind", help="Only this error kind (e.g. unknown_agent, schema)")
@click.option("--limit", type=int, default=50, show_default=True)
@friendly_errors
def dlq_list(topic: str | None, kind: str | None, limit: int) -> None:
    """The newest dead letters, with their ids (for show and replay)."""
    from services.core.clickhouse import client
    from services.core.dead_letters import list_letters

    letters = list_letters(client(_settings()), topic, kind, limit)
    table = Table(title=f"dead letters (newest {limit})", title_justify="left")
    for col in ("id", "when (UTC)", "source", "kind", "error", "replays"):
        table.add_column(col, overflow="fold")
    for letter in letters:
        source = f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}"
        error = letter.error if len(letter.error) <= 100 else letter.error[:99] + "…"
        when = f"{letter.created_at:%Y-%m-%d %H:%M:%S}"
        table.add_row(letter.id, when, source, letter.error_kind, error, str(letter.replays))
    console.print(table)
    console.print(f"[dim]{len(letters)} dead letter{'s' if len(letters) != 1 else ''}[/]")


@dlq.command("show")
@click.argument("letter_id")
@friendly_errors
def dlq_show(letter_id: str) -> None:
    """One dead letter in full: where it came from, why it failed, and the record (decoded when it can be)."""
    from services.core.clickhouse import client
    from services.core.dead_letters import describe_value, get_letter

    letter = get_letter(client(_settings()), letter_id)
    shape, value = describe_value(letter)
    click.echo(
        json.dumps(
            {
                "id": letter.id,
                "source": {
                    "topic": letter.source_topic,
                    "partition": letter.source_partition,
                    "offset": letter.source_offset,
                },
                "service": letter.service,
                "error_kind": letter.error_kind,
                "error": letter.error,
                "created_at": letter.created_at.isoformat(),
                "replays": letter.replays,
                "key": letter.key.decode("utf-8", errors="replace") if letter.key is not None else None,
                shape: value,
            },
            indent=2,
            default=str,
        )
    )


@dlq.command("replay")
@click.argument("letter_ids", nargs=-1)
@click.option("--topic", help="Every dead letter of this source topic (with --kind, of that kind only)")
@click.option("--kind", help="With --topic: only this error kind")
@click.option(
    "--fixed",
    "fixed_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A corrected record (JSON, the source topic's record type) to send instead of one letter's bytes",
)
@click.option("--limit", type=int, default=1000, show_default=True, help="With --topic: at most this many")
@friendly_errors
def dlq_replay(
    letter_ids: tuple[str, ...], topic: str | None, kind: str | None, fixed_file: str | None, limit: int
) -> None:
    """Send dead letters back to their source topic, once what made them fail is fixed (an agent added, a
    record corrected with --fixed)."""
    import asyncio

    from services.core.clickhouse import client
    from services.core.dead_letters import get_letter, list_letters, replacement_value, replay

    if bool(letter_ids) == bool(topic):
        raise click.UsageError("give dead-letter ids, or --topic (and --kind) to replay all of them")
    if fixed_file and len(letter_ids) != 1:
        raise click.UsageError("--fixed replaces the record of exactly one dead letter: give its id")
    settings = _settings()
    ch = client(settings)
    letters = [get_letter(ch, i) for i in letter_ids] if letter_ids else list_letters(ch, topic, kind, limit)
    values = {}
    if fixed_file:
        fixed = json.loads(Path(fixed_file).read_text())
        values[letters[0].id] = replacement_value(letters[0], fixed)
    sent = asyncio.run(replay(settings, letters, values))
    console.print(f"replayed {sent} dead letter{'s' if sent != 1 else ''} to their source topics")


@main.command()
@click.argument("agent_id")
@friendly_errors
def models(agent_id: str) -> None:
    """An agent's student versions with their metrics and gate verdicts."""
    from services.trainer.service import models_text

    console.print(models_text(_settings(), agent_id), highlight=False, markup=False)


@main.command()
@click.argument("agent_id")
@click.argument("version", type=int, required=False)
@friendly_errors
def rollback(agent_id: str, version: int | None) -> None:
    """Serve an earlier student version again (the one before the current, or VERSION)."""
    import asyncio

    from services.trainer.models import RollbackError
    from services.trainer.service import rollback_and_emit

    try:
        event = asyncio.run(rollback_and_emit(_settings(), agent_id, version))
    except RollbackError as exc:
        raise click.UsageError(str(exc)) from None
    target = event.lineage.get("rolled_back_to", "?")
    console.print(f"{agent_id}: rolled back to version {target}, now serving as Triton version {event.model_version}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one)")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Port  [default: FLYWHEEL_DASHBOARD_PORT, 8765]"
)
@friendly_errors
def dashboard(host: str, port: int | None) -> None:
    """Serve the dashboard: per agent, stage, traffic split, agreement, cost saved, latency and events."""
    from services.dashboard.server import DashboardError, serve

    settings = _settings()

    def ready(url: str) -> None:
        console.print(f"dashboard: [bold]{url}[/] (ClickHouse {settings.clickhouse_url}); Ctrl-C to stop")

    try:
        serve(settings, host, settings.dashboard_port if port is None else port, ready)
    except DashboardError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("dashboard stopped")


@main.command("run")
@click.argument(
    "service",
    type=click.Choice(["router", "logger", "gateway", "teacher", "curator", "trainer", "drift_monitor"]),
)
def run_service(service: str) -> None:
    """Run one service in the foreground (what `flywheel up` starts in the background)."""
    import runpy

    sys.argv = [f"services.{service}"]
    runpy.run_module(f"services.{service}", run_name="__main__")


@main.command("config")
@friendly_errors
def show_config() -> None:
    """Show the effective settings (secrets masked)."""
    console.print_json(json.dumps(_settings().as_dict(), default=str))


if __name__ == "__main__":
    main()
