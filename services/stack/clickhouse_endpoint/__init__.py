"""The local stack's ClickHouse: chDB (ClickHouse's engine in-process) behind ClickHouse's HTTP interface.

Only one process may open a chDB data directory, so this process owns it and serves the part of ClickHouse's
HTTP interface that clients use:

* queries by GET/POST: the ``query`` parameter and/or the body, concatenated as ClickHouse does; GET runs with
  the engine's ``readonly``; ``database``, ``default_format``, ``query_id``, ``session_id`` parameters;
  settings as URL parameters; server-side ``param_*`` binding (also as multipart form fields);
* INSERT data streamed from the body into chDB in any input format (Native, RowBinary, JSONEachRow, CSV...),
  with the body's ``Content-Encoding`` (gzip, deflate, lz4, zstd) or ``decompress=1`` framing removed;
* results in any output format, streamed block by block unless ``wait_end_of_query=1`` or the format has a
  header; compressed when asked with ``enable_http_compression=1`` and ``Accept-Encoding``;
* the ``X-ClickHouse-*`` headers, ``/ping``, errors as ClickHouse's text and HTTP status, and an optional
  user/password (basic auth, ``X-ClickHouse-User``/``X-ClickHouse-Key`` or ``user``/``password``).

Every service and CLI therefore uses an ordinary ``http://`` ClickHouse URL, exactly as against a real server.

Safe to expose: without a password it only binds loopback; table functions, engines and statements that would
touch files, other hosts or programs are refused (``policy.py``); the body size, decompression ratio,
concurrent queries, sessions, ``max_execution_time`` and ``max_threads`` are capped (``limits.py``, each a
``FLYWHEEL_CLICKHOUSE_*`` setting).

Deliberate differences: without a configured password any credentials are accepted (loopback only);
``compress=1`` (ClickHouse's own response framing) and external data (file fields) answer NOT_IMPLEMENTED;
large INSERTs are squashed into parts of 131072 rows rather than ~1M; a GET inside a session may only run a
reading statement (SELECT, SHOW, DESCRIBE, EXISTS, EXPLAIN).

Modules: ``statements`` (what a query is), ``policy`` (what it may do), ``request`` (URL, headers, body),
``codecs`` (compression, content types), ``engine`` (chDB connections, sessions), ``server`` (HTTP),
``cli`` (the process), ``component`` (the stack's view of it).
Run as ``python -m services.stack.clickhouse_endpoint --data-dir DIR --host 127.0.0.1 --port 8123``; the
password, if any, comes from the environment variable named by ``--password-env``.
"""

from services.stack.clickhouse_endpoint.component import PASSWORD_ENV, ClickHouseEndpoint

__all__ = ["PASSWORD_ENV", "ClickHouseEndpoint"]
