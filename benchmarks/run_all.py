"""Run every benchmark and write one Markdown table of the figures against the goals the issues set.

Each benchmark runs as its own subprocess (``python benchmarks/bench_<name>.py ... --json F``) with a bounded
time; its output goes to a log file, its figures (a flat JSON object) into the table, with the goal, the
distance to it, the command that produced the figure and the date and machine. Quick settings by default
(minutes); ``--full`` uses each benchmark's long settings and also runs the distillation benchmark (15 min or
more). The demo's quality and cost figures are read from the demo's report when there is one.

    python benchmarks/run_all.py                       # quick, every benchmark but distillation
    python benchmarks/run_all.py --full                # long settings, distillation included
    python benchmarks/run_all.py --only router,logger  # or --skip triton; --out elsewhere.md

Every benchmark starts its own stack on free ports under a temporary directory, so it runs beside a
developer's stack without touching it. The figures are as contended as the machine is: the load average at
the start is in the report's header.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.report import FIGURES, Row, derive, render_report, rows_for  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "RESULTS.md"
# The scripts' own default place for the base's fp32 copy, named here because each benchmark runs with its own
# TMPDIR (removed afterwards): without it every run would dequantise the base again (~30 s).
BASE_CACHE = Path(tempfile.gettempdir()) / "flywheel-base-cache"
INTERRUPT_GRACE_S = 90.0  # after SIGINT, how long a benchmark may take to stop the stack it started
# Every benchmark runs offline (the student's base is local) and with the allocator settings the trainer and the
# Triton student need (DESIGN.md: about 12x slower training without them).
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}


@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # under benchmarks/
    quick: tuple[str, ...]
    full: tuple[str, ...]
    quick_timeout_s: float
    full_timeout_s: float
    full_only: bool = False  # too long for the quick run: a "skipped (use --full)" row instead
    base_cache: bool = False  # takes --base-cache: the fp32 copy of the student's base is kept between runs

    def args(self, full: bool) -> tuple[str, ...]:
        return self.full if full else self.quick

    def timeout(self, full: bool) -> float:
        return self.full_timeout_s if full else self.quick_timeout_s

    def command(self, full: bool) -> str:
        """As a person would type it (the ``--json`` file run_all adds is left out)."""
        return shlex.join(["python", f"benchmarks/{self.script}", *self.args(full)])


BENCHES: tuple[Bench, ...] = (
    Bench("broker", "bench_broker.py", ("--messages", "50000"), (), 300, 900),
    Bench("clickhouse", "bench_clickhouse.py", ("--rows", "500000", "--repeat", "3"),
          ("--rows", "1000000", "--repeat", "5"), 600, 1800),
    Bench("triton", "bench_triton.py", ("--requests", "2000"), ("--requests", "5000", "--tiny-student"), 600, 1200),
    Bench("router", "bench_router.py", ("--requests", "5000"), ("--requests", "20000"), 900, 1800),
    Bench("logger", "bench_logger.py", ("--records", "200000", "--sink-records", "100000", "--python-records", "20000"),
          (), 900, 1800),
    Bench("hotswap", "bench_hotswap.py", ("--seconds", "30", "--swaps", "3", "--rate", "100"),
          ("--seconds", "180", "--swaps", "6", "--rate", "50", "--model", "tiny"), 600, 1200),
    # Trains a student on the demo agent's data first (about 10 minutes), unless --reuse gives its figures.
    Bench("student_latency", "bench_student_latency.py", ("--epochs", "1", "--requests", "60", "--per-level", "48"),
          (), 2400, 3600, base_cache=True),
    Bench("contention", "bench_contention.py", ("--seconds", "15"), (), 900, 1200, base_cache=True),
    Bench("distillation", "bench_distillation.py", (), (), 0, 5400, full_only=True, base_cache=True),
)  # fmt: skip
DEMO = "demo"
NAMES = (*(b.name for b in BENCHES), DEMO)


@dataclass
class Outcome:
    bench: str
    command: str
    figures: dict[str, object] | None
    status: str | None  # None: ran and wrote its figures
    seconds: float = 0.0
    log: Path | None = None


def _pump(stream: IO[bytes], log: IO[bytes], echo: bool) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()


def _stop_leftovers(tmp: Path) -> None:
    """Stop stack parts a benchmark started but could not stop (it was killed): each part's state file under
    its temporary home names the process group ProcessManager started, so only those are touched."""
    from services.stack.process import ProcessManager

    for state in tmp.rglob("run/*.json"):
        with contextlib.suppress(Exception):
            ProcessManager(state.parent, state.parent.parent / "logs").stop(state.stem, grace_s=10)


def run_bench(bench: Bench, full: bool, logs: Path, echo: bool) -> Outcome:
    command = bench.command(full)
    if bench.full_only and not full:
        return Outcome(bench.name, command, None, "skipped (use --full)")
    json_path = logs / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    log_path = logs / f"{bench.name}.log"
    tmp = Path(tempfile.mkdtemp(prefix=f"{bench.name}-", dir=logs))  # the benchmark's TMPDIR: its stack lives here
    argv = [sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args(full), "--json", str(json_path)]
    if bench.base_cache:
        argv += ["--base-cache", str(BASE_CACHE)]
    env = {**os.environ, **CHILD_ENV, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    timeout = bench.timeout(full)
    started = time.monotonic()
    status: str | None = None
    with open(log_path, "wb") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        # Its own session: on a timeout the whole group (the benchmark and e.g. the logger it spawned) is stopped.
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        assert proc.stdout is not None
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo), daemon=True)
        pump.start()
        try:
            code = proc.wait(timeout)
            status = None if code == 0 else f"failed (exit {code})"
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            # SIGINT first: the benchmark's finally blocks stop the stack it started; then the group is killed.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            _stop_leftovers(tmp)
            if isinstance(exc, KeyboardInterrupt):
                raise
            status = f"timed out after {timeout:.0f} s"
        finally:
            pump.join(10)
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    figures: dict[str, object] | None = None
    if status is None:
        try:
            loaded = json.loads(json_path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError("not a JSON object")
            figures = loaded
        except (OSError, ValueError) as exc:
            status = f"failed (no figures in {json_path.name}: {exc})"
    return Outcome(bench.name, command, figures, status, seconds, log_path)


def demo_report_path(explicit: Path | None) -> Path:
    """``--demo-report``, else ``$FLYWHEEL_HOME/demo/report.json`` (FLYWHEEL_HOME as the settings resolve it)."""
    if explicit is not None:
        return explicit
    try:
        from services.core.settings import Settings

        home = Settings.load().home
    except Exception:  # a broken configuration must not stop the benchmarks: fall back to the default home
        home = Path(os.environ.get("FLYWHEEL_HOME", ".flywheel"))
    return Path(home).absolute() / "demo" / "report.json"


def read_demo(path: Path, explicit: bool) -> Outcome:
    command = "flywheel demo"
    if not path.is_file():
        if explicit:
            raise SystemExit(f"--demo-report {path}: no such file")
        return Outcome(DEMO, command, None, "not run")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return Outcome(DEMO, f"{command} ({path})", None, f"unreadable report: {exc}")
    if not isinstance(loaded, dict):
        return Outcome(DEMO, f"{command} ({path})", None, "unreadable report: not a JSON object")
    return Outcome(DEMO, f"{command} (report: {path})", loaded, None)


def machine(full: bool) -> dict[str, str]:
    """When and where: the table's figures mean little without the cores, the memory and the load."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB RAM"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()}: {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}, {ram}".rstrip(", "),
        "load average at start (1, 5, 15 min)": f"{load} (figures measured on a loaded machine are contended)",
        "software": f"Python {platform.python_version()}, {platform.system()} {platform.release()}, commit {commit}",
        "mode": "full (`--full`)" if full else "quick (default; `--full` for the long settings and distillation)",
    }


def parse_reuse(values: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or name not in NAMES:
            raise SystemExit(f"--reuse {value}: expected NAME=PATH with NAME one of {', '.join(NAMES)}")
        if not Path(path).is_file():
            raise SystemExit(f"--reuse {value}: no such file {path}")
        out[name] = Path(path)
    return out


def parse_names(values: Sequence[str] | None, flag: str) -> set[str]:
    names = {n.strip() for v in values or () for n in v.split(",") if n.strip()}
    unknown = names - set(NAMES)
    if unknown:
        raise SystemExit(f"{flag}: unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="long settings, distillation included")
    parser.add_argument("--only", action="append", metavar="NAMES", help=f"comma-separated, of: {', '.join(NAMES)}")
    parser.add_argument("--skip", action="append", metavar="NAMES", help="comma-separated names to leave out")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown report (default: %(default)s)")
    parser.add_argument("--logs", type=Path, help="where each benchmark's output and figures go (default: a "
                        "new temporary directory)")  # fmt: skip
    parser.add_argument("--demo-report", type=Path, help="the demo's report.json (default: "
                        "$FLYWHEEL_HOME/demo/report.json when it exists)")  # fmt: skip
    parser.add_argument(
        "--reuse",
        action="append",
        metavar="NAME=PATH",
        default=[],
        help="take a benchmark's figures from the --json file of an earlier run of it (e.g. "
        "distillation=out.json) instead of running it again",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show each benchmark's output as it runs")
    args = parser.parse_args(argv)
    only, skip = parse_names(args.only, "--only"), parse_names(args.skip, "--skip")
    selected = [n for n in NAMES if (not only or n in only) and n not in skip]
    if not selected:
        raise SystemExit("nothing to run: --only/--skip left no benchmark")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    header = machine(args.full)
    print(f"benchmarks ({'full' if args.full else 'quick'}): {', '.join(selected)}; logs in {logs}")

    outcomes: list[Outcome] = []
    started = time.monotonic()
    reused = parse_reuse(args.reuse)
    for bench in BENCHES:
        if bench.name in reused:
            path = reused[bench.name]
            figures = json.loads(path.read_text())
            # The command that really produced the figures, when the benchmark recorded it.
            command = str(figures.get("command") or bench.command(True))
            outcomes.append(Outcome(bench.name, f"{command} (figures of an earlier run: {path})", figures, None))
            continue
        if bench.name not in selected:
            continue
        print(f"[{bench.name}] {bench.command(args.full)} ...", flush=True)
        outcome = run_bench(bench, args.full, logs, args.verbose)
        done = "ok" if outcome.status is None else outcome.status
        print(f"[{bench.name}] {done} ({outcome.seconds:.0f} s)", flush=True)
        outcomes.append(outcome)
    if DEMO in selected:
        path = demo_report_path(args.demo_report)
        outcomes.append(read_demo(path, explicit=args.demo_report is not None))

    rows: list[Row] = []
    notes: list[str] = []
    for outcome in outcomes:
        values = None if outcome.figures is None else derive(outcome.bench, outcome.figures)
        rows += rows_for(FIGURES[outcome.bench], values, outcome.command, outcome.status)
        if outcome.status and outcome.log is not None:
            notes.append(f"{outcome.bench}: {outcome.status}; its output: {outcome.log}")
    left_out = [n for n in NAMES if n not in selected]
    if left_out:
        notes.append(f"not selected this run: {', '.join(left_out)}")
    notes.append(
        f"every benchmark ran as a subprocess with HF_HUB_OFFLINE=1 and the malloc settings of DESIGN.md; "
        f"total {time.monotonic() - started:.0f} s; command: `python benchmarks/run_all.py"
        f"{' ' + shlex.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else ''}`"
    )
    notes.append("what each row means: docs/benchmarks.md")
    text = render_report(rows, header, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print()
    print(text)
    print(f"written to {args.out}")
    return 0 if all(o.status in (None, "skipped (use --full)", "not run") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
