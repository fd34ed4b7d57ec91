"""What a query is, from its text: an INSERT whose data follows, its output format, a statement that changes
the connection's state. Pattern matching on the statement's start and end only; what a query may *do* is
``policy.py``'s business, and the engine's own ``readonly`` enforces GET."""

from __future__ import annotations

import re
from collections.abc import Iterator

from services.stack.clickhouse_endpoint.errors import SYNTAX_ERROR, ClickHouseError

MAX_INSERT_HEAD = 1 << 16  # an INSERT ... FORMAT head at the start of a body is looked for in this many bytes

# Whitespace and comments. One whitespace character per repetition: `(?:\s+)*` backtracks exponentially.
_NOISE_ITEM = r"\s|--[^\n]*(?:\n|$)|/\*.*?\*/"
_LEADING_NOISE = rf"(?:{_NOISE_ITEM})*"
# The patterns below stay linear on any input: the INSERT head ends with a non-space character before the
# whitespace that precedes FORMAT, so no two quantifiers compete for the same characters.
# An INSERT whose data follows (query parameter form: the data is the whole body).
_INSERT_HEAD_RE = re.compile(
    r"\s*(?P<head>INSERT\s+INTO\s.*?\S)\s+(?:FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)|(?P<values>VALUES))[\s;]*",
    re.IGNORECASE | re.DOTALL,
)
# An INSERT at the start of a body, its data starting on the next line.
_BODY_INSERT_RE = re.compile(
    _LEADING_NOISE + r"(?P<head>INSERT\s+INTO\s.*?\S)\s+FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)[ \t]*(?:\r?\n|$)",
    re.IGNORECASE | re.DOTALL,
)
# A FORMAT clause at the end of a statement (trailing whitespace and semicolons already stripped).
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+(?P<fmt>[A-Za-z0-9_]+)(?:\s+SETTINGS\s[^;]*)?\Z", re.IGNORECASE)
_FORMAT_WORD_RE = re.compile(r"\bFORMAT\s+[A-Za-z0-9_]+", re.IGNORECASE)
# Statements that only read, for a GET inside a session (whose connection cannot be made readonly for one
# request: the engine's readonly cannot be lifted again). Multi-statements are refused before this is asked.
_READ_RE = re.compile(
    rf"(?:\(|{_NOISE_ITEM})*(?:SELECT|WITH|SHOW|DESC|DESCRIBE|EXISTS|EXPLAIN)\b",
    re.IGNORECASE | re.DOTALL,
)
_SELECT_RE = re.compile(rf"(?:\(|{_NOISE_ITEM})*(?:SELECT|WITH)\b", re.IGNORECASE | re.DOTALL)
# Statements that change a connection's state (current database, settings, temporary tables).
_STATEFUL_RE = re.compile(
    _LEADING_NOISE + r"(?:SET|USE|CREATE\s+TEMPORARY|DROP\s+TEMPORARY)\b", re.IGNORECASE | re.DOTALL
)


def insert_head(query: str) -> tuple[str, str] | None:
    """(INSERT head, input format) when a query parameter is an INSERT whose data is the request body."""
    match = _INSERT_HEAD_RE.fullmatch(query)
    if not match:
        return None
    return match.group("head"), ("Values" if match.group("values") else match.group("fmt"))


def body_insert_head(prefix: bytes) -> tuple[str, str, int] | None:
    """(INSERT head, input format, offset where the data starts) for a body starting with INSERT ... FORMAT X.

    Matched on a latin-1 view of the bytes so offsets stay byte offsets even when the data is binary.
    """
    match = _BODY_INSERT_RE.match(prefix[:MAX_INSERT_HEAD].decode("latin-1"))
    if not match:
        return None
    head = prefix[match.start("head") : match.end("head")].decode("utf-8", errors="replace")
    return head, match.group("fmt"), match.end()


def output_format(query: str, default: str) -> str | None:
    """The result format: the statement's trailing FORMAT clause, else the default (as ClickHouse decides).

    None when a FORMAT clause is there but not at the end (say, before a trailing comment): the engine will
    honour it, we just cannot name it, so the result is not streamed and its headers are the default's.
    """
    tail = query[-4096:].rstrip().rstrip(";").rstrip()  # the clause is near the end; bounded work per query
    match = _TRAILING_FORMAT_RE.search(tail)
    if match:
        return match.group("fmt")
    return None if _FORMAT_WORD_RE.search(query) else default


def is_read_only(query: str) -> bool:
    return bool(_READ_RE.match(query))


def is_select(query: str) -> bool:
    return bool(_SELECT_RE.match(query))


def changes_connection_state(query: str) -> bool:
    return bool(_STATEFUL_RE.match(query))


def split_statement(query: str, data: Iterator[bytes] | None) -> tuple[str, tuple[str, str, Iterator[bytes]] | None]:
    """(SQL text, insert) where insert is (INSERT head, input format, data pieces) when data is streamed.

    ClickHouse's rule: the statement is the ``query`` parameter followed by the body; for an INSERT, whatever
    follows ``FORMAT <name>`` (or ``VALUES``) is the data. Data is streamed, never decoded as text.
    """
    if data is None:
        return query, None
    if query.strip():
        head = insert_head(query)
        if head is not None:
            return query, (head[0], head[1], data)
        rest = b"".join(data)
        return (query + "\n" + rest.decode("utf-8", errors="replace")) if rest else query, None
    prefix, data = peek(data)
    found = body_insert_head(prefix)
    if found is not None:
        head_sql, fmt, offset = found
        return head_sql, (head_sql, fmt, _chain(prefix[offset:], data))
    text = (prefix + b"".join(data)).decode("utf-8", errors="replace")
    if not text.strip():
        raise ClickHouseError.make(SYNTAX_ERROR, "Empty query")
    return text, None


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def peek(pieces: Iterator[bytes], want: int = MAX_INSERT_HEAD) -> tuple[bytes, Iterator[bytes]]:
    """Read ahead until a newline or `want` bytes (enough to see an INSERT head); return it and the rest."""
    head = bytearray()
    for piece in pieces:
        head += piece
        if b"\n" in head or len(head) >= want:
            break
    return bytes(head), pieces
