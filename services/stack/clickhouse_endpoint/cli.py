"""``python -m services.stack.clickhouse_endpoint``: serve a chDB data directory over ClickHouse's HTTP interface."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from services.core.network import public_bind_refusal
from services.stack.clickhouse_endpoint.engine import Engine
from services.stack.clickhouse_endpoint.limits import Limits
from services.stack.clickhouse_endpoint.policy import Policy
from services.stack.clickhouse_endpoint.server import EndpointServer

log = logging.getLogger("clickhouse-endpoint")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a chDB data directory over ClickHouse's HTTP interface.")
    parser.add_argument("--data-dir", required=True, type=Path, help="chDB data directory (created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless a password is set)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--user", default="default", help="the user clients must give when a password is set")
    parser.add_argument("--password-env", help="name of the environment variable holding the password")
    Limits.add_arguments(parser)
    return parser.parse_args(argv)


def unsafe_bind(host: str, password: str | None) -> str | None:
    """Why binding `host` is refused, or None: without a password only loopback is served."""
    return public_bind_refusal(
        host,
        bool(password),
        "a password",
        "read and change every table",
        "set FLYWHEEL_CLICKHOUSE_PASSWORD or bind 127.0.0.1",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    password = (os.environ.get(args.password_env) if args.password_env else None) or None
    refusal = unsafe_bind(args.host, password)
    if refusal:
        log.error("%s", refusal)
        return 2
    limits = Limits.from_arguments(args)
    try:
        engine = Engine(
            args.data_dir.absolute(), max_concurrent=limits.max_concurrent_queries, max_sessions=limits.max_sessions
        )
    except Exception as exc:  # typically: another process holds the data directory
        log.error("cannot open chDB data directory %s: %s", args.data_dir, exc)
        return 1
    policy = Policy(limits, engine.table_functions())
    try:
        server = EndpointServer((args.host, args.port), engine, args.user, password, policy)
    except OSError as exc:
        engine.close()
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    import chdb

    log.info(
        "listening on http://%s:%d (chDB %s, ClickHouse %s), data in %s, %s; %s",
        args.host,
        args.port,
        chdb.__version__,
        engine.version,
        args.data_dir.absolute(),
        f"user {args.user} with password" if password else "no password",
        limits,
    )

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever to return, so it must run outside the serving (main) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        engine.close()
        log.info("stopped; data flushed to %s", args.data_dir.absolute())
    return 0


if __name__ == "__main__":
    sys.exit(main())
