"""A packed forward pass for Llama-family students: the rows of a batch without padding.

The fast decoder feeds each row its own number of tokens per pass (a prompt, a label, a draft). Through the
Hugging Face forward every row is padded to the longest one, and the padding is computed like real tokens in
every linear layer (most of the cost). Here the rows' tokens are concatenated into one sequence for the linear
layers, norms and MLP (the same Hugging Face modules, so weight formats apply unchanged); only attention, a small
part of the cost, sees a padded ``[rows, longest feed]`` view. Keys and values live in one preallocated buffer
per layer indexed by position, so a rejected draft position is simply written over by the next pass's token and
a finished row costs nothing: no masks over stale entries, no cache copies as rows leave.

The computation is the Hugging Face one (same modules, rotary embedding and attention scaling); only shapes
differ, so results agree to float rounding (``tests/unit/test_fast_decoder.py`` compares answers and
confidences with the plain decode). Models outside the supported families keep the Hugging Face forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Model types whose decoder layers are norm -> q/k/v -> rotary -> attention -> o, norm -> MLP, with no extra
# per-head norms or sliding windows: the Hugging Face modules are reused as they are.
SUPPORTED = frozenset({"llama", "mistral", "qwen2"})


def supports(body: Any) -> bool:
    config = getattr(body, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED:
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return False  # a window would change which keys a long answer sees
    layers = getattr(body, "layers", None)
    if not layers or not all(hasattr(body, name) for name in ("embed_tokens", "norm", "rotary_emb")):
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")) and not any(
        hasattr(attn, name) for name in ("q_norm", "k_norm")
    )


@dataclass(frozen=True)
class Fused:
    """Several bfloat16 linear layers with one input as one multiply; ``split`` is each layer's output size."""

    matmul: Any
    bias: Any | None
    split: list[int]

    def __call__(self, x: Any) -> list[Any]:
        out = self.matmul(x).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return list(out.split(self.split, dim=-1))


@dataclass(frozen=True)
class AttentionLayout:
    """Rows attended in one call: their queries padded to the longest feed."""

    tokens: Any | None  # the rows' tokens in the packed sequence (None: all of them, in order)
    padded_at: Any  # where each of those tokens sits in the padded [rows x widest] queries
    rows: int
    widest: int
    span: int
    mask: Any  # [rows, 1, widest, span], True where a query may look
    pick: Any | None  # the rows' slots in the key/value buffers (None: all, in order)


@dataclass
class KVBuffers:
    """Keys and values of ``rows`` rows, ``length`` positions each: one ``[rows, length, kv heads, head dim]``
    tensor per layer for each."""

    keys: list[Any]
    values: list[Any]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1])


class PackedForward:
    """Forward passes over packed rows for one loaded body (see the module's docstring)."""

    def __init__(self, body: Any) -> None:
        import torch

        self.torch = torch
        self.body = body
        config = body.config
        attn = body.layers[0].self_attn
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(attn, "head_dim", 0) or config.hidden_size // self.heads)
        self.dtype = body.embed_tokens.weight.dtype
        self.fused = [self._fuse(layer) for layer in body.layers]

    def _fuse(self, layer: Any) -> tuple[Fused | None, Fused | None]:
        """One multiply for q/k/v and one for gate/up where the layers are bfloat16 (``weights.BF16Matmul``):
        fewer, larger calls, bit for bit the separate ones' results."""
        from services.student_runtime.weights import BF16Matmul

        def fuse(modules: list[Any]) -> Fused | None:
            if not all(isinstance(getattr(m, "matmul", None), BF16Matmul) for m in modules):
                return None
            torch = self.torch
            biases = [m.bias if m.bias is not None else torch.zeros(m.weight.shape[0]) for m in modules]
            bias = torch.cat(biases) if any(m.bias is not None for m in modules) else None
            return Fused(
                BF16Matmul(torch.cat([m.weight for m in modules])), bias, [int(m.weight.shape[0]) for m in modules]
            )

        attn, mlp = layer.self_attn, layer.mlp
        qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = None
        if all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            gate_up = fuse([mlp.gate_proj, mlp.up_proj])
        return qkv, gate_up

    def buffers(self, rows: int, length: int) -> KVBuffers:
        """Empty buffers for ``rows`` rows of ``length`` positions."""
        torch = self.torch
        shape = (rows, length, self.kv_heads, self.head_dim)
        # Zeros, not empty: a masked position still enters attention as 0 x value, and garbage can be NaN.
        return KVBuffers(
            [torch.zeros(shape, dtype=self.dtype) for _ in self.body.layers],
            [torch.zeros(shape, dtype=self.dtype) for _ in self.body.layers],
        )

    def grow(self, kv: KVBuffers, length: int) -> KVBuffers:
        """``kv`` with room for ``length`` positions per row, its contents kept."""
        grown = self.buffers(kv.keys[0].shape[0], length)
        for old, new in zip(kv.keys + kv.values, grown.keys + grown.values, strict=True):
            new[:, : old.shape[1]] = old
        return grown

    def fill(self, kv: KVBuffers, slot: int, prefix: tuple[tuple[Any, Any], ...]) -> None:
        """Write a cached prefix (per layer, HF layout ``[1, kv heads, n, head dim]``) at positions 0..n-1 of
        ``slot``."""
        for layer, (pk, pv) in enumerate(prefix):
            n = pk.shape[2]
            kv.keys[layer][slot, :n] = pk[0].transpose(0, 1)
            kv.values[layer][slot, :n] = pv[0].transpose(0, 1)

    def _attention_layouts(self, feeds: list[tuple[int, int, list[int]]], kv: KVBuffers) -> list[AttentionLayout]:
        """The attention calls of a pass over the fed rows (finished rows are left out). Every row is padded to
        the longest feed of its call: when prompts (tens of tokens) and decode steps (a few) share a pass, as
        rows joining a running batch do, the short rows get a call of their own instead of padding to the
        prompts."""
        widths = sorted(len(ids) for _, _, ids in feeds)
        whole = len(widths) * widths[-1]  # padded queries of one call
        # Short rows are the first k: the padded queries of the two calls, at the best k.
        cost, cut = min(
            (
                (k * widths[k - 1] + (len(widths) - k) * widths[-1], widths[k - 1])
                for k in range(1, len(widths))
                if widths[k - 1] < widths[-1]
            ),
            default=(whole, None),
        )
        if cost > 0.7 * whole:  # a second call costs something too: only a clear saving splits
            cut = None
        if cut is None:
            return [self._layout(feeds, list(range(len(feeds))), kv, whole=True)]
        short = [i for i, (_, _, ids) in enumerate(feeds) if len(ids) <= cut]
        long = [i for i, (_, _, ids) in enumerate(feeds) if len(ids) > cut]
        return [self._layout(feeds, short, kv), self._layout(feeds, long, kv)]

    def _layout(
        self, feeds: list[tuple[int, int, list[int]]], chosen: list[int], kv: KVBuffers, whole: bool = False
    ) -> AttentionLayout:
        torch = self.torch
        starts = [0]
        for _, _, ids in feeds:
            starts.append(starts[-1] + len(ids))
        group = [feeds[i] for i in chosen]
        widest = max(len(ids) for _, _, ids in group)
        span = max(pos + len(ids) for _, pos, ids in group)  # positions any query can see
        query_pos = torch.full((len(group), widest), -1, dtype=torch.long)
        padded_at, tokens = [], []
        for row, (i, (_, pos, ids)) in enumerate(zip(chosen, group, strict=True)):
            n = len(ids)
            padded_at.extend(range(row * widest, row * widest + n))
            tokens.extend(range(starts[i], starts[i] + n))
            query_pos[row, :n] = torch.arange(pos, pos + n)
        # A query sees every position up to its own; a padding query sees position 0 only (its output is dropped,
        # and a row of -inf would give NaN).
        mask = torch.arange(span).view(1, 1, span) <= query_pos.unsqueeze(-1)
        mask[:, :, 0] = True
        fed = [slot for slot, _, _ in group]
        pick = None if fed == list(range(kv.keys[0].shape[0])) else torch.tensor(fed, dtype=torch.long)
        return AttentionLayout(
            None if whole else torch.tensor(tokens, dtype=torch.long),
            torch.tensor(padded_at, dtype=torch.long),
            len(group),
            widest,
            span,
            mask.unsqueeze(1),
            pick,
        )

    def _attend(self, layouts: list[AttentionLayout], q: Any, keys: Any, values: Any, scaling: float) -> Any:
        """Attention of the pass's queries over their rows' keys/values: ``[queries, heads x head dim]``."""
        torch = self.torch
        out = None if layouts[0].tokens is None else q.new_empty((q.shape[0], self.heads * self.head_dim))
        for layout in layouts:
            mine = q if layout.tokens is None else q[layout.tokens]
            padded = q.new_zeros((layout.rows * layout.widest, self.heads, self.head_dim))
            padded[layout.padded_at] = mine
            padded = padded.view(layout.rows, layout.widest, self.heads, self.head_dim).transpose(1, 2)
            k, v = keys[:, : layout.span], values[:, : layout.span]
            if layout.pick is not None:
                k, v = k.index_select(0, layout.pick), v.index_select(0, layout.pick)
            got = torch.nn.functional.scaled_dot_product_attention(
                padded,
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=layout.mask,
                scale=scaling,
                enable_gqa=self.heads != self.kv_heads,
            )
            got = got.transpose(1, 2).reshape(layout.rows * layout.widest, -1)[layout.padded_at]
            if layout.tokens is None:
                return got
            out[layout.tokens] = got
        return out

    def __call__(self, kv: KVBuffers, feeds: list[tuple[int, int, list[int]]]) -> Any:
        """Run ``feeds`` (row slot, position of its first token, token ids; each row at most once) and return the
        last hidden states, ``[sum of feed lengths, hidden]`` in ``feeds`` order."""
        torch = self.torch
        body = self.body
        ids_flat, pos_flat, slot_flat = [], [], []
        for slot, pos, ids in feeds:
            ids_flat.extend(ids)
            pos_flat.extend(range(pos, pos + len(ids)))
            slot_flat.extend([slot] * len(ids))
        total = len(ids_flat)
        positions = torch.tensor(pos_flat, dtype=torch.long)
        slots = torch.tensor(slot_flat, dtype=torch.long)
        layouts = self._attention_layouts(feeds, kv)
        with torch.inference_mode():
            x = body.embed_tokens(torch.tensor([ids_flat], dtype=torch.long))
            cos, sin = body.rotary_emb(x, positions.unsqueeze(0))
            cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [total, 1, head dim]
            half = self.head_dim // 2
            for index, layer in enumerate(body.layers):
                attn = layer.self_attn
                qkv, gate_up = self.fused[index]
                h = layer.input_layernorm(x)
                q, k, v = qkv(h) if qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
                q = q.reshape(total, self.heads, self.head_dim)
                k = k.reshape(total, self.kv_heads, self.head_dim)
                v = v.reshape(total, self.kv_heads, self.head_dim)
                q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
                kv.keys[index][slots, positions] = k
                kv.values[index][slots, positions] = v
                out = self._attend(layouts, q, kv.keys[index], kv.values[index], attn.scaling)
                x = x + attn.o_proj(out).unsqueeze(0)
                h = layer.post_attention_layernorm(x)
                if gate_up is None:
                    x = x + layer.mlp(h)
                else:
                    gate, up = gate_up(h)
                    x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
            return body.norm(x)[0]
