"""A retrain that continues from the agent's served version (``distillation.warm_start``).

The drift retrain's snapshot holds the first one's traffic and the new: starting again from the base relearns
what the served version already knows. Continuing from its LoRA adapter and label head, for
``warm_start_epochs``, spends the training time on what changed. Only a version trained on the same base with
the same LoRA shape can be continued; otherwise the job trains from the base and says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.agents import Distillation
from services.student_runtime.generator import ADAPTER_CONFIG, SPEC_FILE, adapter_dir_of, load_spec
from services.student_runtime.label_head import head_path

log = logging.getLogger("flywheel.trainer")


@dataclass(frozen=True)
class WarmStart:
    version_dir: Path
    adapter_dir: Path
    labels: list[str]
    head: Path | None  # the version's label head file, if it has one


def mismatch(spec: dict[str, Any], adapter_config: dict[str, Any], base_path: str, cfg: Distillation) -> str | None:
    """Why the version of ``spec`` cannot be continued by a job with ``cfg`` on ``base_path`` (None: it can)."""
    if str(Path(spec.get("base_model", "")).expanduser()) != str(Path(base_path).expanduser()):
        return f"it was trained on base {spec.get('base_model')!r}, this job uses {base_path!r}"
    if adapter_config.get("r") != cfg.lora_r or adapter_config.get("lora_alpha") != cfg.lora_alpha:
        return (
            f"its LoRA is r{adapter_config.get('r')} alpha{adapter_config.get('lora_alpha')}, "
            f"the agent's r{cfg.lora_r} alpha{cfg.lora_alpha}"
        )
    targets = sorted(adapter_config.get("target_modules") or [])
    if targets != sorted(cfg.target_modules):
        return f"its LoRA targets {targets}, the agent's {sorted(cfg.target_modules)}"
    return None


def find_warm_start(version_dir: Path | None, base_path: str, cfg: Distillation) -> WarmStart | None:
    """The served version to continue from, or None (logged with the reason) when there is none or it does not
    fit."""
    if version_dir is None:
        return None
    try:
        spec = load_spec(version_dir)
    except (OSError, ValueError) as exc:
        log.warning(
            "not warm-started from %s: its %s cannot be read (%s); training from the base", version_dir, SPEC_FILE, exc
        )
        return None
    adapter_dir = adapter_dir_of(spec, Path(version_dir))
    if adapter_dir is None:
        log.warning(
            "not warm-started from %s: it is a merged model, not an adapter; training from the base", version_dir
        )
        return None
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        log.warning(
            "not warm-started from %s: %s cannot be read (%s); training from the base", version_dir, ADAPTER_CONFIG, exc
        )
        return None
    reason = mismatch(spec, adapter_config, base_path, cfg)
    if reason:
        log.warning("not warm-started from %s: %s; training from the base", version_dir, reason)
        return None
    head = head_path(spec["label_head"], adapter_dir, None) if spec.get("label_head") else None
    return WarmStart(Path(version_dir), adapter_dir, list(spec.get("labels") or []), head)


def head_rows(old_labels: Sequence[str], new_labels: Sequence[str]) -> list[int | None]:
    """For each new label, its row in the old head (None: a label the old version did not have)."""
    index = {label: i for i, label in enumerate(old_labels)}
    return [index.get(label) for label in new_labels]


def initial_head(warm: WarmStart | None, labels: Sequence[str], hidden_size: int) -> tuple[Any, ...]:
    """The label head's starting weight and bias: zero, with the rows of labels the served version's head knew
    copied from it; and its tail decision's weight and bias where the served head has them."""
    import torch

    weight, bias = torch.zeros(len(labels), hidden_size), torch.zeros(len(labels))
    if warm is None or warm.head is None:
        return weight, bias
    from safetensors.torch import load_file

    old = load_file(str(warm.head))
    if tuple(old["weight"].shape) != (len(warm.labels), hidden_size):
        log.warning("the label head of %s does not fit its labels: the head starts from zero", warm.version_dir)
        return weight, bias
    for row, old_row in enumerate(head_rows(warm.labels, labels)):
        if old_row is not None:
            weight[row] = old["weight"][old_row]
            bias[row] = old["bias"][old_row]
    if "tail_weight" in old and tuple(old["tail_weight"].shape) == (hidden_size,):
        return weight, bias, old["tail_weight"].clone(), old["tail_bias"].reshape(()).clone()
    return weight, bias
