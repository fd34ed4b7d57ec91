"""The fast greedy constrained decoder: the plain decode's answers with a fraction of its forward passes.

What it does differently from ``reference.reference_decode`` (and why the answers stay the same):

* **Forced tokens are not decided.** Inside a label, a trie node with one child leaves one valid token; the
  plain decode spends a forward pass to pick it with probability exactly 1. Here it is appended at once, and
  every forced token goes into the next forward pass together.
* **Drafts of the answer's fixed structure are verified, not generated.** The constant prefix before the label
  (``{"intent": "``) and the usual tail after each label (``", "arguments": {}}`` + EOS, from the training
  targets) are fed as a draft in the same forward pass as the prompt or the label; the model's greedy choice
  at each draft position is computed from that one pass, and the draft is accepted up to the first position
  where the model would have chosen otherwise. From there the model's own token is taken and decoding goes on,
  so the answer is the plain greedy one whatever the draft said. Rejected draft positions are masked out of the
  keys/values (explicit positions keep every row's positions contiguous). An answer that leaves its label's
  usual tail (it has arguments) gets drafts from the **tail corpus**, the common tails of training: what followed
  its last 1-3 tokens there (the arguments' keys, quotes and braces, common values).
* **A label head** (``label_head.py``), where the version has one, picks the whole label at the step where it
  starts; its tokens are then forced. With its tail decision, an answer that goes on with its label's usual
  tail is complete at that step: label, tail and EOS are written without another pass. The plain decode does
  the same.
* **Only allowed tokens are scored** at a constrained step: hidden state x those rows of the output layer,
  renormalised over them (what the plain decode's renormalised probability is).
* **The system prompt's keys/values are computed once** per loaded version (``PrefixCache``) and shared by
  every request whose tokens start with them.
* **Ragged batches:** each row feeds its own number of tokens per pass, finished rows leave the batch. For
  Llama-family models the rows are packed without padding (``packed.py``); others go through the Hugging Face
  forward right-padded and masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.student_runtime.label_head import LabelHead, head_answer
from services.student_runtime.labels import LabelCursor
from services.student_runtime.packed import PackedForward, supports
from services.student_runtime.weights import BF16Matmul

# (row in batch, column) -> (token, probability) of the full-vocabulary decisions of one pass
Decisions = dict[tuple[int, int], tuple[int, float]]

LOOKUP_KEYS = (3, 2, 1)  # lengths of the answer's last tokens looked up in the tail corpus, longest first
LOOKUP_DRAFT = 6  # tokens drafted from the tail corpus: a rejected draft costs its positions' vocabulary scores
SCREEN_TOP = 8  # words scored again in fp32 per screened row
SCREEN_MARGIN = 2.0  # logits; bfloat16's error on a logit is a few hundredths
SCREEN_TAIL = 1e-3  # largest probability mass left to the screened scores: x their error (< 8 %) < 1e-4


class NoLabels:
    """The cursor of a student without constrained labels: every step is free."""

    __slots__ = ("end", "start", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.start = self.end = None

    def copy(self) -> NoLabels:
        other = NoLabels()
        other.tokens = list(self.tokens)
        return other

    def allowed(self) -> list[int] | None:
        return None

    def advance(self, token: int) -> None:
        self.tokens.append(token)

    @property
    def label_tokens(self) -> list[int]:
        return []


@dataclass
class Row:
    """One answer being decoded."""

    index: int  # position in the caller's batch
    cursor: LabelCursor | NoLabels
    feed: list[int]  # tokens chosen (or the prompt) whose keys/values are not computed yet
    pos: int  # position id of feed[0]
    limit: int  # the most tokens the answer may have
    prefix: bool = False  # positions 0..pos-1 are the cached shared prefix (``FastDecoder.prefix``)
    probs: list[float] = field(default_factory=list)
    passes: int = 0
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return self.cursor.tokens


@dataclass(frozen=True)
class PrefixCache:
    """Keys/values of a token prefix shared by many prompts: one (keys, values) pair per layer, batch 1."""

    ids: tuple[int, ...]
    layers: tuple[tuple[Any, Any], ...]


class FastDecoder:
    """Decodes batches for one loaded student (``generator.StudentGenerator`` owns the model)."""

    def __init__(self, student: Any) -> None:
        self.s = student
        self.torch = student.torch
        model = student.model
        self.body = getattr(model, model.base_model_prefix)  # the transformer without its output layer
        self.head = model.get_output_embeddings().weight  # [vocab, hidden]
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # A bfloat16 copy of the output layer screens the vocabulary (``_free``); None where bf16 does not run.
        self.head_bf16 = self._bf16_head()
        self.screen_stats = [0, 0]  # rows screened, rows scored again in fp32
        self.prefix: PrefixCache | None = None
        self.tails: dict[tuple[int, ...], list[int]] = {}
        self.default_tail: list[int] = []
        self.lookup: dict[int, dict[tuple[int, ...], tuple[int, ...]]] = {n: {} for n in LOOKUP_KEYS}
        self.label_head: LabelHead | None = student.label_head
        # Rows packed without padding where the model family allows (``packed.py``), else the HF forward.
        self.packed = PackedForward(self.body) if supports(self.body) else None

    # Set-up -------------------------------------------------------------------------------------------------
    def _bf16_head(self) -> BF16Matmul | None:
        torch = self.torch
        try:
            head = BF16Matmul(self.head)
            head(torch.zeros((1, self.head.shape[1])))
        except RuntimeError:
            return None
        return head

    def cache_prefix(self, ids: list[int]) -> None:
        """Compute the keys/values of ``ids`` once (the system prompt shared by every request)."""
        from transformers import DynamicCache

        if not ids:
            self.prefix = None
            return
        torch = self.torch
        cache = DynamicCache()
        with torch.inference_mode():
            self.body(
                input_ids=torch.tensor([ids]),
                position_ids=torch.arange(len(ids)).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
            )
        layers = tuple((layer.keys.clone(), layer.values.clone()) for layer in cache.layers)
        self.prefix = PrefixCache(tuple(ids), layers)

    def set_tails(self, tails: dict[tuple[int, ...], list[int]], default: list[int]) -> None:
        """Drafts of what follows each label (label token ids -> tail ids ending in EOS)."""
        self.tails, self.default_tail = dict(tails), list(default)

    def usual_tail(self, label: list[int]) -> list[int]:
        """The usual tail after this label's tokens (EOS not included)."""
        return self.tails.get(tuple(label), self.default_tail)

    def set_corpus(self, corpus: list[list[int]]) -> None:
        """Index the tail corpus (token ids of the common tails, most common first): for each run of the last
        1-3 tokens, the tokens that followed it first."""
        self.lookup = {n: {} for n in LOOKUP_KEYS}
        for seq in corpus:
            for i in range(1, len(seq)):
                follow = tuple(seq[i : i + LOOKUP_DRAFT])
                for n in LOOKUP_KEYS:
                    if i >= n:
                        self.lookup[n].setdefault(tuple(seq[i - n : i]), follow)

    # Logits -------------------------------------------------------------------------------------------------
    def _scores(self, hidden: Any, rows: Any | None = None) -> Any:
        weight = self.head if rows is None else self.head.index_select(0, rows)
        logits = (hidden @ weight.T).float()
        if self.softcap:
            logits = self.torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _free(self, hidden: Any) -> list[tuple[int, float]]:
        """Greedy token and its probability over the whole vocabulary, for each row of ``hidden``: the plain
        decode's fp32 figures.

        The output layer is most of the cost of a row (49k words), so a bfloat16 copy of it screens first: the
        words within ``SCREEN_MARGIN`` of the best screened score are scored again in fp32 and the best of them
        is the fp32 argmax (bfloat16's error is far below the margin). The probability is exact over them plus
        the screened mass of the rest; a row where that rest holds more than ``SCREEN_TAIL`` of the mass (an
        uncertain step, where its error could show), or where the near words are too many, is scored in fp32
        entirely."""
        torch = self.torch
        if self.head_bf16 is None or self.softcap:
            return self._free_exact(hidden)
        approx = self.head_bf16(hidden).float()
        top_v, top_i = approx.topk(SCREEN_TOP, dim=-1)
        exact = torch.einsum("nh,nkh->nk", hidden.float(), self.head[top_i].float())
        rest = approx.scatter(1, top_i, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1)
        near_all = top_v[:, -1] < top_v[:, 0] - SCREEN_MARGIN  # every near word is among the screened top
        lse = torch.logaddexp(torch.logsumexp(exact, dim=-1), tail)
        best = exact.argmax(dim=-1)
        prob = torch.exp(exact.gather(1, best.unsqueeze(1)).squeeze(1) - lse)
        ok = near_all & (torch.exp(tail - lse) <= SCREEN_TAIL)
        out = [(int(top_i[r, best[r]]), float(prob[r])) for r in range(hidden.shape[0])]
        redo = [r for r in range(hidden.shape[0]) if not bool(ok[r])]
        if redo:
            for r, value in zip(redo, self._free_exact(hidden[redo]), strict=True):
                out[r] = value
        self.screen_stats[0] += hidden.shape[0]
        self.screen_stats[1] += len(redo)
        return out

    def _free_exact(self, hidden: Any) -> list[tuple[int, float]]:
        """The fp32 max and log-sum-exp over the whole vocabulary (without writing out a log-softmax)."""
        torch = self.torch
        scores = self._scores(hidden)
        best = scores.argmax(dim=-1)
        chosen = scores.gather(1, best.unsqueeze(1)).squeeze(1) - torch.logsumexp(scores, dim=-1)
        return [(int(t), float(torch.exp(p))) for t, p in zip(best, chosen, strict=True)]

    def _constrained(self, hidden: Any, allowed: list[int]) -> tuple[int, float]:
        torch = self.torch
        scores = self._scores(hidden.unsqueeze(0), torch.tensor(allowed, dtype=torch.long))[0]
        best = int(scores.argmax())
        return allowed[best], float(torch.exp(scores[best] - torch.logsumexp(scores, dim=0)))

    # Drafts -------------------------------------------------------------------------------------------------
    def _draft(self, row: Row) -> list[int]:
        cursor, tokens = row.cursor, row.tokens
        draft: list[int] = []
        if isinstance(cursor, LabelCursor):
            if cursor.start is None:
                want = cursor.trie.prefix_ids
                if len(tokens) < len(want) and want[: len(tokens)] == tokens:
                    draft = want[len(tokens) :]
            elif cursor.end is not None:
                tail = self.usual_tail(cursor.label_tokens)
                after = tokens[cursor.end :]
                if len(after) < len(tail) and tail[: len(after)] == after:
                    draft = tail[len(after) :]
                else:  # the answer left its label's usual tail (it has arguments): what followed these tokens
                    draft = self._lookup(after)
        return draft[: max(0, row.limit - len(tokens) - 1)]

    def _lookup(self, after: list[int]) -> list[int]:
        """A draft from the tail corpus: what followed the answer's last tokens (the longest match) in the most
        common training tail holding them."""
        for n in LOOKUP_KEYS:
            if len(after) >= n:
                found = self.lookup[n].get(tuple(after[-n:]))
                if found:
                    return list(found)
        return []

    @staticmethod
    def _free_positions(row: Row, draft: list[int]) -> list[int]:
        """Offsets into the draft (0 = the last fed token) where the decision is free, if the draft holds."""
        sim = row.cursor.copy()
        free = []
        for k in range(len(draft) + 1):
            if sim.allowed() is None:
                free.append(k)
            if k < len(draft):
                sim.advance(draft[k])
        return free

    # Decoding -----------------------------------------------------------------------------------------------
    def _plan(self, active: list[Row]) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Each row's draft for this pass, and the (row in batch, column) positions needing full-vocabulary
        logits if the drafts hold."""
        drafts = [self._draft(r) for r in active]
        free_at = [
            (b, len(row.feed) - 1 + k)
            for b, (row, draft) in enumerate(zip(active, drafts, strict=True))
            for k in self._free_positions(row, draft)
        ]
        return drafts, free_at

    def _free_map(self, free_at: list[tuple[int, int]], hidden: Any, index: tuple) -> Decisions:
        """The full-vocabulary decisions at ``free_at``, whose hidden states are ``hidden[index]``, in one call."""
        return dict(zip(free_at, self._free(hidden[index]), strict=True)) if free_at else {}

    def decode(self, rows: list[Row]) -> None:
        """Decode ``rows`` (their ``feed`` holds the prompt after the prefix, if any) until each ends or hits its
        limit."""
        active = [r for r in rows if not r.done]
        if not active:
            return
        if self.packed is not None:
            batch = LiveBatch(self, len(active))
            for row in active:
                batch.admit(row)
            while batch.rows:
                batch.step()
            return
        for uses_prefix in (True, False):
            group = [r for r in active if r.prefix == uses_prefix]
            # Padded rows are cut by prompt length: every row of a pass is padded to the longest.
            for chunk in length_groups(group):
                self._decode_padded(chunk)

    def _decode_padded(self, rows: list[Row]) -> None:
        """The Hugging Face forward: rows right-padded to the longest feed of each pass, masked (rows of one call
        all use the prefix, or none does)."""
        from transformers import DynamicCache

        torch = self.torch
        active = [r for r in rows if not r.done]
        if not active:
            return
        prefix = self.prefix if active[0].prefix else None
        if prefix is not None:
            n = len(active)
            cache = DynamicCache(
                ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix.layers]
            )
            mask = torch.ones((n, len(prefix.ids)), dtype=torch.long)
        else:
            cache = DynamicCache()
            mask = torch.zeros((len(active), 0), dtype=torch.long)
        with torch.inference_mode():
            while active:
                drafts, free_at = self._plan(active)
                width = max(len(r.feed) + len(d) for r, d in zip(active, drafts, strict=True))
                ids = torch.full((len(active), width), self.s.pad_id, dtype=torch.long)
                step_mask = torch.zeros((len(active), width), dtype=torch.long)
                positions = torch.zeros((len(active), width), dtype=torch.long)
                for b, (row, draft) in enumerate(zip(active, drafts, strict=True)):
                    seq = row.feed + draft
                    ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    step_mask[b, : len(seq)] = 1
                    positions[b] = torch.arange(row.pos, row.pos + width)
                mask = torch.cat([mask, step_mask], dim=1)
                hidden = self.body(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                ).last_hidden_state
                free = self._free_map(free_at, hidden, ([b for b, _ in free_at], [c for _, c in free_at]))
                base = mask.shape[1] - width
                for b, (row, draft) in enumerate(zip(active, drafts, strict=True)):
                    row.passes += 1
                    valid = self._accept(row, draft, hidden[b], free, b)
                    mask[b, base + valid :] = 0  # rejected draft positions and padding: never attended again
                keep = [b for b, r in enumerate(active) if not r.done]
                if len(keep) < len(active):
                    if keep:
                        index = torch.tensor(keep, dtype=torch.long)
                        cache.batch_select_indices(index)
                        mask = mask.index_select(0, index)
                    active = [active[b] for b in keep]

    def _accept(self, row: Row, draft: list[int], hidden: Any, free: Decisions, b: int) -> int:
        """Take the row's decisions from this pass; returns how many of its fed columns stay valid."""
        seq = row.feed + draft
        col = len(row.feed) - 1
        cursor = row.cursor
        eos = self.s.eos_ids
        limit = row.limit
        token = None
        while True:
            if len(cursor.tokens) >= limit:
                row.done = True
                break
            allowed = cursor.allowed()
            if allowed is None:
                token, prob = free.get((b, col)) or self._free(hidden[col].unsqueeze(0))[0]
            elif self.label_head is not None and isinstance(cursor, LabelCursor) and cursor.at_label_start:
                # The whole label in one decision (and, with the tail decision, whether its usual tail follows).
                chosen, prob, usual = self.label_head.decide(hidden[col], self.s.tail_decision)
                cursor.choose(chosen)
                token = chosen[0]
                if usual:  # the rest of the answer is known: written, not fed
                    rest = head_answer(chosen, self.usual_tail(chosen), self.s.end_id, limit - len(cursor.tokens))
                    for k, tok in enumerate(rest):
                        cursor.allowed()
                        cursor.advance(tok)
                        row.probs.append(prob if k == 0 else 1.0)
                    cursor.allowed()
                    row.done = True
                    break
            elif len(allowed) == 1:
                token, prob = allowed[0], 1.0
            else:
                token, prob = self._constrained(hidden[col], allowed)
            cursor.advance(token)
            row.probs.append(prob)
            if token in eos:
                row.done = True
                break
            if col + 1 < len(seq) and seq[col + 1] == token:  # the draft's next token is the model's choice
                col += 1
                continue
            break
        valid = col + 1
        row.pos += valid
        row.feed = []
        if row.done:
            return valid
        row.feed.append(token)
        # Tokens forced by the label trie: appended without a decision, fed together in the next pass.
        while len(cursor.tokens) < limit:
            allowed = cursor.allowed()
            if allowed is None or len(allowed) != 1:
                break
            cursor.advance(allowed[0])
            row.probs.append(1.0)
            if allowed[0] in eos:
                row.done = True
                break
            row.feed.append(allowed[0])
        if len(cursor.tokens) >= limit:
            row.done = True
        return valid


def length_groups(rows: list[Row], min_size: int = 4, ratio: float = 1.3) -> list[list[Row]]:
    """Rows sorted by prompt length and cut where a chunk of at least ``min_size`` would pad the next row's
    prompt by more than ``ratio``: every row of a pass is padded to its longest, and padding is computed too."""
    ordered = sorted(rows, key=lambda r: len(r.feed))
    chunks: list[list[Row]] = []
    for row in ordered:
        if chunks and (len(chunks[-1]) < min_size or len(row.feed) <= ratio * len(chunks[-1][0].feed)):
            chunks[-1].append(row)
        else:
            chunks.append([row])
    if len(chunks) > 1 and len(chunks[-1]) < min_size:  # a short last chunk joins the one before
        chunks[-2].extend(chunks.pop())
    return chunks


class LiveBatch:
    """Rows of a packed model decoded together, joining and leaving between forward passes.

    Each row holds a slot of key/value buffers kept across passes; a row that ends frees its slot at once, and a
    row admitted later joins the next pass (its prompt is fed in the same pass as the other rows' decode
    steps). Serving (``scheduler.Scheduler``) keeps one batch running for all requests; ``FastDecoder.decode``
    admits a whole batch and runs it out. A row's answer does not depend on which rows share its passes."""

    def __init__(self, decoder: FastDecoder, capacity: int) -> None:
        if decoder.packed is None:
            raise ValueError("a live batch needs a packed model (packed.supports)")
        self.d = decoder
        self.capacity = int(capacity)
        self.kv = decoder.packed.buffers(self.capacity, 1)
        self.rows: dict[int, Row] = {}  # slot -> row, in order of admission

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def admit(self, row: Row) -> None:
        """Give ``row`` a slot; it is fed in the next ``step``."""
        if not self.free:
            raise ValueError(f"the live batch is full ({self.capacity} rows)")
        slot = next(i for i in range(self.capacity) if i not in self.rows)
        need = row.pos + len(row.feed) + row.limit + 1  # no position of the row goes further
        if need > self.kv.length:
            self.kv = self.d.packed.grow(self.kv, max(need, 2 * self.kv.length))
        if row.prefix and self.d.prefix is not None:
            self.d.packed.fill(self.kv, slot, self.d.prefix.layers)
        self.rows[slot] = row

    def step(self) -> list[Row]:
        """One forward pass over every row; returns the rows that ended in it (their slots are free again)."""
        torch = self.d.torch
        slots = list(self.rows)
        active = [self.rows[s] for s in slots]
        with torch.inference_mode():
            drafts, free_at = self.d._plan(active)
            seqs = [row.feed + draft for row, draft in zip(active, drafts, strict=True)]
            hidden = self.d.packed(self.kv, [(s, r.pos, seq) for s, r, seq in zip(slots, active, seqs, strict=True)])
            offsets = [0]
            for seq in seqs:
                offsets.append(offsets[-1] + len(seq))
            free = self.d._free_map(free_at, hidden, ([offsets[b] + c for b, c in free_at],))
            for b, (row, draft) in enumerate(zip(active, drafts, strict=True)):
                row.passes += 1
                # A rejected draft position is written over by the next pass (keys are kept by position).
                self.d._accept(row, draft, hidden[offsets[b] : offsets[b + 1]], free, b)
        ended = [s for s in slots if self.rows[s].done]
        return [self.rows.pop(s) for s in ended]

    def drop(self) -> list[Row]:
        """Remove every row (after a failed pass); returns them."""
        rows = list(self.rows.values())
        self.rows.clear()
        return rows
