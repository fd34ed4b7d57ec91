"""ClickHouse SQL cut into tokens: enough to split statements and to see names, never to parse.

Used by the migrations (statements split on the ``;`` that end them) and by the local ClickHouse endpoint's
query policy (which table functions, engines and settings a query names). Strings, quoted identifiers and
comments are single tokens, so nothing inside a literal is mistaken for code. Where ClickHouse's lexer is more
lenient (nested ``/* */`` comments, ``$$`` heredocs) this one sees *more* code, never less: a policy built on
it may refuse a harmless query but cannot be walked around with a comment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal, NamedTuple

Kind = Literal["space", "comment", "string", "ident", "word", "number", "punct"]

# One alternative per kind, tried in order; each is linear (no two quantifiers compete for the same text).
# An unterminated literal or comment runs to the end, as ClickHouse reads it (then refuses it).
_TOKEN_RE = re.compile(
    r"""(?P<space>\s+)
    |(?P<comment>--[^\n]*|\#[^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<string>'(?:[^'\\]|\\.|'')*(?:'|\Z))
    |(?P<ident>"(?:[^"\\]|\\.|"")*(?:"|\Z)|`(?:[^`\\]|\\.|``)*(?:`|\Z))
    |(?P<word>[A-Za-z_][A-Za-z0-9_]*)
    |(?P<number>[0-9][0-9A-Za-z_.]*)
    |(?P<punct>.)""",
    re.VERBOSE | re.DOTALL,
)


class Token(NamedTuple):
    kind: Kind
    text: str  # as written
    start: int
    end: int

    @property
    def name(self) -> str:
        """A word or quoted identifier as the name it stands for (quotes and escapes removed), lower-cased."""
        if self.kind == "ident":
            return _unescape(self.text[1:-1], self.text[0]).lower()
        return self.text.lower()

    @property
    def is_code(self) -> bool:
        return self.kind not in ("space", "comment")


def tokens(sql: str) -> Iterator[Token]:
    """Every token of the text in order, whitespace and comments included (their text joins back to `sql`)."""
    for match in _TOKEN_RE.finditer(sql):
        yield Token(match.lastgroup, match.group(), match.start(), match.end())  # type: ignore[arg-type]


def code_tokens(sql: str) -> list[Token]:
    """The tokens that are code: no whitespace, no comments."""
    return [token for token in tokens(sql) if token.is_code]


def split_statements(sql: str) -> list[str]:
    """Split SQL text on the ``;`` that end statements, ignoring those inside quotes and comments.

    Statements that hold nothing but comments are dropped.
    """
    statements: list[str] = []
    current: list[str] = []
    has_code = False
    for token in tokens(sql):
        if token.kind == "punct" and token.text == ";":
            if has_code:
                statements.append("".join(current).strip())
            current, has_code = [], False
            continue
        current.append(token.text)
        has_code = has_code or token.is_code
    if has_code:
        statements.append("".join(current).strip())
    return statements


def string_value(token: Token) -> str:
    """The text a string literal stands for."""
    return _unescape(token.text[1:-1], "'")


def _unescape(body: str, quote: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif body.startswith(quote * 2, i):
            out.append(quote)
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)
