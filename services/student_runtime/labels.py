"""Constrained labels: a prefix trie over the valid labels' token ids, and the per-answer cursor through it.

The text after ``prefix`` must be one of the labels followed by ``suffix``. Only the first occurrence of the
prefix in an answer is constrained; with an empty prefix the answer starts with the label (classification),
with an empty suffix the label ends the answer (EOS follows it). The cursor's decisions are those of the plain
decode in ``reference.LabelConstraint``, step for step: the fast decoder relies on it.
"""

from __future__ import annotations

from typing import Any

END = -1  # trie key marking a complete label sequence


def build_trie(sequences: list[list[int]]) -> dict[int, Any]:
    trie: dict[int, Any] = {}
    for seq in sequences:
        node = trie
        for tok in seq:
            node = node.setdefault(tok, {})
        node[END] = {}
    return trie


class LabelTrie:
    """The labels of one student version, tokenised as training tokenises them (label and suffix together)."""

    def __init__(self, tokenizer: Any, labels: list[str], prefix: str, suffix: str, eos_id: int) -> None:
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.sequences: dict[str, list[int]] = {}
        for label in labels:
            seq = list(tokenizer.encode(label + suffix, add_special_tokens=False))
            if not suffix:
                seq.append(eos_id)
            self.sequences[label] = seq
        self.root = build_trie(list(self.sequences.values()))
        self.prefix_ids: list[int] = list(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else []

    def cursor(self, prompt_text: str) -> LabelCursor:
        started = self.prefix == "" or prompt_text.endswith(self.prefix)
        return LabelCursor(self, 0 if started else None)


class LabelCursor:
    """Where one answer stands: before the label (``start`` None), inside it, or after it (``end`` set)."""

    __slots__ = ("chosen", "end", "node", "start", "tokens", "trie")

    def __init__(self, trie: LabelTrie, start: int | None) -> None:
        self.trie = trie
        self.tokens: list[int] = []
        self.start = start
        self.end: int | None = None
        self.node: dict[int, Any] | None = trie.root if start is not None else None
        self.chosen: list[int] | None = None  # the whole label, when a label head chose it at once

    def copy(self) -> LabelCursor:
        other = LabelCursor.__new__(LabelCursor)
        other.trie, other.tokens, other.start, other.end, other.node, other.chosen = (
            self.trie,
            list(self.tokens),
            self.start,
            self.end,
            self.node,
            self.chosen,
        )
        return other

    @property
    def at_label_start(self) -> bool:
        """The next token is the label's first (call after ``allowed``)."""
        return self.start is not None and self.end is None and self.start == len(self.tokens)

    def choose(self, sequence: list[int]) -> None:
        """The label is decided (a label head chose it): its tokens are the only ones allowed from here."""
        self.chosen = list(sequence)

    def allowed(self) -> list[int] | None:
        """Token ids allowed next, or None when this step is unconstrained (idempotent)."""
        if self.end is not None:
            return None
        if self.start is None:
            text = self.trie.tokenizer.decode(self.tokens, skip_special_tokens=False)
            if not text.endswith(self.trie.prefix):
                return None
            self.start, self.node = len(self.tokens), self.trie.root
        assert self.node is not None
        if END in self.node:  # the label (and its suffix) is complete: free generation again
            self.end = len(self.tokens)
            return None
        if self.chosen is not None:
            return [self.chosen[len(self.tokens) - self.start]]
        children = [t for t in self.node if t != END]
        return children or None

    def advance(self, token: int) -> None:
        self.tokens.append(token)
        if self.start is not None and self.end is None and self.node is not None:
            self.node = self.node.get(token, {})

    @property
    def label_tokens(self) -> list[int]:
        if self.start is None:
            return []
        return self.tokens[self.start : self.end if self.end is not None else len(self.tokens)]
