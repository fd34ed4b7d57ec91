"""Weight formats of the student's linear layers, chosen per version by measured agreement (not assumed).

* ``fp32``: as trained.
* ``bf16``: the transformer's linear layers keep bfloat16 weights and multiply in bfloat16 (oneDNN uses the
  CPU's AVX512-BF16 instructions: about 2.2x the fp32 matrix-multiply rate measured here); activations,
  norms, attention and the output layer stay fp32.
* ``int8``: int8 weights (one scale per output channel) times int8 activations (one scale per token), with
  int32 accumulation (``torch._int_mm``: about 4x the fp32 rate here); the output layer stays fp32.

``torch.ao``'s ``quantize_dynamic`` is not one of them: one scale per tensor for the activations broke this
model (the first label token agreed with fp32 on 18 % of messages, DESIGN.md).
"""

from __future__ import annotations

from typing import Any

FORMATS = ("fp32", "bf16", "int8")


class WeightFormatError(ValueError):
    """A weight format that is unknown or cannot run on this machine; the message names it."""


class BF16Matmul:
    """``x @ weight.T`` in bfloat16 (fp32 accumulation). The weight is reordered once into oneDNN's blocked layout
    where this torch build allows it: the plain call reorders it at every call, which at the few rows of a
    decode step costs a quarter to a half of the multiply. Results are the plain call's, bit for bit."""

    def __init__(self, weight: Any) -> None:
        import torch

        self.torch = torch
        self.weight = weight.detach().to(torch.bfloat16).contiguous()
        self.packed = None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            probe = torch.zeros((2, self.weight.shape[1]), dtype=torch.bfloat16)
            if torch.equal(
                torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""),
                torch.nn.functional.linear(probe, self.weight),
            ):
                self.packed = packed
        except (AttributeError, RuntimeError):
            pass  # no oneDNN here: the plain call

    def __call__(self, x: Any) -> Any:
        x = x.to(self.torch.bfloat16)
        if self.packed is not None:
            return self.torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return self.torch.nn.functional.linear(x, self.weight)


def _linear_classes() -> tuple[type, type]:
    import torch
    from torch import nn

    class BF16Linear(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.matmul = BF16Matmul(linear.weight)
            self.weight = nn.Parameter(self.matmul.weight, requires_grad=False)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.matmul(x).to(x.dtype)
            return out if self.bias is None else out + self.bias

    class Int8Linear(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            weight = linear.weight.detach().float()
            scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.register_buffer("qweight_t", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
            self.register_buffer("scale", scale)
            self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, shape[-1]).float()
            x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            qx = torch.round(flat / x_scale).to(torch.int8)
            rows = qx.shape[0]
            if rows <= 16:  # the int8 kernel wants more than 16 rows: pad (the extra rows are dropped)
                qx = torch.cat([qx, qx.new_zeros((17 - rows, qx.shape[1]))])
            acc = torch._int_mm(qx, self.qweight_t)[:rows]
            out = acc.float() * x_scale * self.scale
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*shape[:-1], -1).to(x.dtype)

    return BF16Linear, Int8Linear


def apply_weight_format(model: Any, fmt: str) -> Any:
    """Convert ``model``'s transformer linear layers to ``fmt`` in place (the output layer is left as it is)."""
    if fmt not in FORMATS:
        raise WeightFormatError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})")
    if fmt == "fp32":
        return model
    import torch
    from torch import nn

    bf16, int8 = _linear_classes()
    wrapper = bf16 if fmt == "bf16" else int8
    body = getattr(model, model.base_model_prefix)
    targets = [(name, module) for name, module in body.named_modules() if isinstance(module, nn.Linear)]
    if not targets:
        raise WeightFormatError(f"weight format {fmt}: the model has no linear layers to convert")
    converted = []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        converted.append(wrapper(module))
        setattr(parent, child, converted[-1])
    # Fail at load, not at the first request, where the CPU cannot run the format.
    try:
        with torch.inference_mode():
            converted[0](torch.randn(2, targets[0][1].in_features))
    except RuntimeError as exc:
        raise WeightFormatError(f"weight format {fmt} does not run on this machine: {exc}") from exc
    return model
