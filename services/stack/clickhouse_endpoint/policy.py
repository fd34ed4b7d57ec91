"""What a query may do on this endpoint, decided from its tokens before the engine sees it.

chDB runs as the service's user with every privilege, and has no access control to grant less. So whoever
reaches the port could read and write files (``file()``, ``INTO OUTFILE``, a ``File`` engine), reach other
hosts (``url()``, ``remote()``, ``s3()``, a ``MySQL`` database engine) or run programs (``executable()``).
The policy refuses, with ClickHouse's ACCESS_DENIED:

* every table function but an allow-list of local ones (new table functions in a chDB upgrade are refused
  until added here), and the ``file`` function;
* table and database engines but an allow-list of local ones, and dictionary sources other than a local
  ClickHouse query;
* ``INTO OUTFILE``, ``FROM INFILE``, ``BACKUP``, ``RESTORE``, ``ATTACH ... FROM 'path'``,
  ``SYSTEM SHUTDOWN``/``KILL``; a ``{parameter}`` used as a function name;

and, as ClickHouse's HTTP interface does, more than one statement per request (SYNTAX_ERROR). The limits on
``max_execution_time`` and ``max_threads`` hold wherever a query sets them (URL parameter, ``SET``,
``SETTINGS``), as ClickHouse's settings constraints would (SETTING_CONSTRAINT_VIOLATION).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from services.core.sql_lexer import Token, code_tokens, string_value
from services.stack.clickhouse_endpoint.errors import (
    ACCESS_DENIED,
    SETTING_CONSTRAINT_VIOLATION,
    SYNTAX_ERROR,
    ClickHouseError,
)
from services.stack.clickhouse_endpoint.limits import Limits

# Local, side-effect-free table functions (lower-cased).
ALLOWED_TABLE_FUNCTIONS = frozenset(
    """numbers numbers_mt zeros zeros_mt generate_series generateseries values sqlstandardvalues null input format
    generaterandom merge view viewifpermitted viewexplain dictionary loop primes mergetreeindex""".split()
)
# Known when the engine cannot be asked (its own list, system.table_functions, is added at start).
KNOWN_REMOTE_FUNCTIONS = frozenset(
    """file url s3 s3cluster gcs cosn oss remote remotesecure cluster clusterallreplicas hdfs hdfscluster mysql
    postgresql sqlite mongodb redis odbc jdbc executable python eval filesystem azureblobstorage urlcluster
    filecluster deltalake hudi iceberg""".split()
)
# Local table and database engines (lower-cased); every *MergeTree but the Replicated ones is allowed too.
ALLOWED_ENGINES = frozenset(
    """memory log tinylog stripelog null set join buffer view materializedview merge dictionary generaterandom
    embeddedrocksdb atomic ordinary lazy""".split()
)
CAPPED_SETTINGS = ("max_execution_time", "max_threads")


@dataclass
class Policy:
    limits: Limits = field(default_factory=Limits)
    table_functions: frozenset[str] = KNOWN_REMOTE_FUNCTIONS  # every table function the engine has, lower-cased

    def __post_init__(self) -> None:
        self.refused_functions = (self.table_functions | KNOWN_REMOTE_FUNCTIONS) - ALLOWED_TABLE_FUNCTIONS

    def profile(self) -> dict[str, str]:
        """Settings every request starts from (its own settings override them, within the limits)."""
        return {
            # A large INSERT is squashed into parts of this many rows instead of ClickHouse's ~1M: parts are
            # then written while the body still streams in, so parsing and writing overlap the upload (about a
            # third faster for 1M rows).
            "min_insert_block_size_rows": "131072",
            "max_execution_time": str(self.limits.max_execution_time_s),
            "max_threads": str(self.limits.default_threads),
        }

    def check_settings(self, settings: Mapping[str, str]) -> None:
        """A request's URL settings: within the limits."""
        for name in CAPPED_SETTINGS:
            if name in settings:
                self._check_value(name, settings[name])

    def check(self, sql: str) -> None:
        """Refuse what the endpoint does not run (see the module's docstring); return if the query may run."""
        toks = code_tokens(sql)
        _one_statement(toks)
        if toks and toks[0].kind == "word":
            self._check_statement_kind(toks)
        for i, token in enumerate(toks):
            following = toks[i + 1] if i + 1 < len(toks) else None
            after = toks[i + 2] if i + 2 < len(toks) else None
            if following is not None and following.text == "(":
                self._check_call(token)
            if token.kind == "word":
                self._check_word(token, following, after, toks[i + 1 :])

    # ------------------------------------------------------------------------------------------------
    def _check_call(self, token: Token) -> None:
        if token.kind in ("word", "ident") and token.name in self.refused_functions:
            raise _denied(
                f"The {token.name}() function is disabled on this endpoint: it reads or writes files, reaches "
                "other hosts or runs programs as the server"
            )
        if token.text == "}":
            raise _denied("A query parameter cannot name a function on this endpoint")

    def _check_word(self, token: Token, following: Token | None, after: Token | None, rest: list[Token]) -> None:
        word = token.name
        if word == "into" and following is not None and following.name == "outfile":
            raise _denied("INTO OUTFILE is disabled on this endpoint: it writes files as the server")
        if word == "from" and following is not None and following.name == "infile":
            raise _denied("FROM INFILE is disabled on this endpoint: it reads files as the server")
        if word == "engine" and following is not None and following.text == "=" and after is not None:
            if after.kind in ("word", "ident") and not _allowed_engine(after.name):
                raise _denied(
                    f"The {after.text} engine is disabled on this endpoint: only local engines "
                    "(MergeTree family, Memory, Log, ...) may be used"
                )
        if word == "source" and following is not None and following.text == "(":
            _check_dictionary_source(rest[1:])
        if word in CAPPED_SETTINGS and following is not None and following.text == "=" and after is not None:
            value = string_value(after) if after.kind == "string" else after.text
            if after.text == "-":
                value = "-1"
            self._check_value(word, value)

    def _check_statement_kind(self, toks: list[Token]) -> None:
        first = toks[0].name
        second = toks[1].name if len(toks) > 1 else ""
        if first in ("backup", "restore"):
            raise _denied(f"{first.upper()} is disabled on this endpoint: it writes or reads files as the server")
        if first == "system" and second in ("shutdown", "kill"):
            raise _denied(f"SYSTEM {second.upper()} is disabled on this endpoint")
        if first == "attach":
            for token, following in itertools.pairwise(toks):
                if token.name == "from" and following.kind == "string":
                    raise _denied("ATTACH ... FROM a path is disabled on this endpoint")

    def _check_value(self, name: str, value: str) -> None:
        try:
            number = float(value.strip())
        except ValueError:
            number = -1.0  # DEFAULT, an expression...: not provably within the limit
        if name == "max_execution_time":
            cap = self.limits.max_execution_time_s
            if not 0 < number <= cap:
                raise _constraint(f"Setting max_execution_time should be greater than 0 and at most {cap}", value)
        elif name == "max_threads":
            cap = self.limits.max_threads
            auto_ok = number == 0 and self.limits.default_threads == self.limits.max_threads
            if not (0 < number <= cap or auto_ok):
                raise _constraint(f"Setting max_threads should be between 1 and {cap}", value)


def _one_statement(toks: list[Token]) -> None:
    ends = [i for i, token in enumerate(toks) if token.kind == "punct" and token.text == ";"]
    if ends and any(token.text != ";" for token in toks[ends[0] :]):
        raise ClickHouseError.make(SYNTAX_ERROR, "Multi-statements are not allowed: send one statement per request")


def _allowed_engine(name: str) -> bool:
    return name in ALLOWED_ENGINES or (name.endswith("mergetree") and not name.startswith("replicated"))


def _check_dictionary_source(inside: Iterable[Token]) -> None:
    """SOURCE(CLICKHOUSE(...)) without a host (a query of this server), or SOURCE(NULL())."""
    toks = list(inside)
    kind = toks[0].name if toks else ""
    if kind == "null":
        return
    if kind != "clickhouse":
        raise _denied(f"Dictionary source {kind.upper() or '?'} is disabled on this endpoint")
    depth = 0
    for token in toks[1:]:
        depth += {"(": 1, ")": -1}.get(token.text, 0)
        if depth <= 0 and token.text == ")":
            return
        if token.name in ("host", "port"):
            raise _denied("A dictionary source on another host is disabled on this endpoint")


def _denied(message: str) -> ClickHouseError:
    return ClickHouseError.make(ACCESS_DENIED, message)


def _constraint(message: str, value: str) -> ClickHouseError:
    return ClickHouseError.make(
        SETTING_CONSTRAINT_VIOLATION,
        f"{message} on this endpoint (got {value!r}; FLYWHEEL_CLICKHOUSE_MAX_EXECUTION_TIME_S and "
        "FLYWHEEL_CLICKHOUSE_MAX_THREADS set the limits)",
    )
