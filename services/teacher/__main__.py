"""``python -m services.teacher``: the reference teacher's OpenAI-compatible HTTP server.

    python -m services.teacher --host 127.0.0.1 --port 8100 --data-dir data --latency-ms 400 --flaw-rate 0.03

Defaults come from the settings (FLYWHEEL_DATA_DIR, FLYWHEEL_REFERENCE_TEACHER_LATENCY_MS,
FLYWHEEL_REFERENCE_TEACHER_FLAW_RATE, host and port of FLYWHEEL_TEACHER_URL); arguments override them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from services.core.settings import Settings, SettingsError
from services.teacher.datasets import DataSetError, load_file, registry_dir
from services.teacher.reference import DEFAULT_LATENCY_SIGMA, ReferenceTeacher
from services.teacher.server import create_app
from services.teacher.workloads import load_workloads, missing_files

log = logging.getLogger("reference-teacher")


def parse_args(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    url = urlsplit(settings.teacher_url)
    parser = argparse.ArgumentParser(
        prog="python -m services.teacher",
        description="The reference teacher (offline stand-in for a frontier model) over an OpenAI-compatible API.",
    )
    parser.add_argument("--host", default=url.hostname or "127.0.0.1")
    parser.add_argument("--port", type=int, default=url.port or 8100)
    parser.add_argument("--prefix", default=url.path or "/v1", help="API path prefix (default: /v1)")
    parser.add_argument("--data-dir", type=Path, default=settings.data_dir)
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="also answer this labelled data set of your own (CSV, TSV or JSONL; docs/own-data.md) as "
        "reference/<file name>; repeatable",
    )
    parser.add_argument("--mapping", type=Path, default=None, help="with one --data: its labels' tools and replies")
    parser.add_argument(
        "--registry",
        type=Path,
        default=registry_dir(settings.home),
        help="where data sets of your own are registered (flywheel replay/demo --data); served as reference/<name>",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=settings.reference_teacher_latency_ms,
        help="median answer latency in ms; 0 = instant",
    )
    parser.add_argument(
        "--latency-sigma",
        type=float,
        default=DEFAULT_LATENCY_SIGMA,
        help="lognormal shape of the latency; 0 = always the median",
    )
    parser.add_argument(
        "--flaw-rate",
        type=float,
        default=settings.reference_teacher_flaw_rate,
        help="share of flawed answers (hedging, invalid tool, malformed JSON), each a third",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the flaw choice and the latency draws")
    args = parser.parse_args(argv)
    if not 0.0 <= args.flaw_rate <= 1.0:
        parser.error("--flaw-rate must be within [0, 1]")
    if args.latency_ms < 0 or args.latency_sigma < 0:
        parser.error("--latency-ms and --latency-sigma must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    args = parse_args(argv, settings)
    missing = missing_files(args.data_dir)
    if missing:
        print(
            f"reference teacher: data set files missing: {', '.join(map(str, missing))} "
            "(--data-dir / FLYWHEEL_DATA_DIR)",
            file=sys.stderr,
        )
        return 2
    if args.mapping is not None and len(args.data) != 1:
        print("reference teacher: --mapping goes with exactly one --data", file=sys.stderr)
        return 2
    try:
        own = {w.name: w for w in (load_file(path, args.mapping) for path in args.data)}
    except DataSetError as exc:
        print(f"reference teacher: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    teacher = ReferenceTeacher(
        {**load_workloads(args.data_dir), **own},
        latency_ms=args.latency_ms,
        latency_sigma=args.latency_sigma,
        flaw_rate=args.flaw_rate,
        seed=args.seed,
        registry=args.registry,
    )
    log.info(
        "reference teacher (an offline stand-in, not a model): %s loaded in %.1fs; latency median %.0f ms, "
        "flaw rate %.3f, seed %d; serving http://%s:%d%s",
        ", ".join(teacher.models),
        time.perf_counter() - start,
        args.latency_ms,
        args.flaw_rate,
        args.seed,
        args.host,
        args.port,
        args.prefix,
    )
    # run_app stops cleanly on SIGTERM/SIGINT (the process manager's stop); no access log: it would cost more
    # than answering at the request rates of the router benchmark.
    web.run_app(create_app(teacher, args.prefix), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
