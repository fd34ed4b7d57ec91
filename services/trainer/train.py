"""Stage 2: LoRA fine-tuning of the base on the teacher's answers (transformers + peft, a plain torch loop).

A plain loop rather than ``Trainer``: on two CPU cores the per-step overhead of ``Trainer`` (accelerate,
callbacks, logging) is noticeable, and the loop is short. Fixed seeds (python, torch, data order) make a run
repeatable; progress (step, loss, examples/s, ETA) goes to the log every few seconds.

Run the trainer with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
MALLOC_TOP_PAD_=536870912`` in its environment (``services.trainer.__main__`` re-executes itself with them):
glibc otherwise returns memory to the OS after every step, which made training about 12x slower here.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.agents import Distillation
from services.core.threads import AdaptiveThreads
from services.student_runtime.label_head import HEAD_FILE, save_label_head
from services.trainer.data import IGNORE, Encoded, batches, collate

log = logging.getLogger("flywheel.trainer")

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    steps: int
    examples_seen: int
    seconds: float
    final_loss: float
    mean_loss_last_epoch: float
    tokens: int

    @property
    def examples_per_s(self) -> float:
        return self.examples_seen / self.seconds if self.seconds else 0.0


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` then linear decay to 0 (the schedule the seed's config implies)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(1, total - warmup)
    return peak * max(0.0, (total - step) / remaining)


def total_steps(n_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for ``epochs`` (fractional epochs allowed: 1.5 = one pass and half of another)."""
    per_epoch = math.ceil(n_examples / batch_size)
    return max(1, math.ceil(per_epoch * epochs))


def add_lora(model: Any, cfg: Distillation) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.target_modules),
        lora_dropout=cfg.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def shared_prefix_length(tensors: dict[str, Any]) -> int:
    """Leading positions every row of the batch has in common (the system prompt and the chat template's start)
    and on which nothing is learned: no answer token is predicted from them and no label head reads them."""
    import torch

    ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)
    differ = torch.nonzero(~same)
    length = int(differ[0]) if len(differ) else ids.shape[1]
    predicting = torch.nonzero((labels[:, 1:] != IGNORE).any(dim=0))  # position t predicts token t + 1
    if len(predicting):
        length = min(length, int(predicting[0]))
    if "head_pos" in tensors:
        length = min(length, int(tensors["head_pos"].clamp(min=0).min()))
    return min(length, ids.shape[1] - 1)


def batch_loss(
    model: Any,
    tensors: dict[str, Any],
    head: Any | None = None,
    head_weight: float = 1.0,
    share_prefix: bool = True,
    tail: Any | None = None,
) -> Any:
    """The mean cross-entropy of the answer tokens of a collated batch (as ``model(**tensors).loss``), plus
    ``head_weight`` × the label head's cross-entropy at ``head_pos`` when ``head`` is given, plus ``head_weight``
    × the tail decision's binary cross-entropy (``head_usual``) at the same position when ``tail`` is given.

    Two savings, same sums: the output layer (49k rows for SmolLM2) is applied only at the positions that
    predict an answer token, not at every prompt position whose loss is ignored anyway; and with
    ``share_prefix`` the batch's common leading tokens (the system prompt: about a third of a demo row) go
    through the transformer once, their keys/values shared by every row (gradients flow through both)."""
    import torch
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, base.base_model_prefix)  # the transformer without its output layer
    ids, mask, labels = tensors["input_ids"], tensors["attention_mask"], tensors["labels"]
    rows, width = ids.shape
    start = shared_prefix_length(tensors) if share_prefix else 0
    if start:
        cache = DynamicCache()
        body(input_ids=ids[:1, :start], position_ids=torch.arange(start)[None], past_key_values=cache, use_cache=True)
        for layer in cache.layers:  # one row's keys/values seen by every row: views, no copies
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        hidden = body(
            input_ids=ids[:, start:],
            attention_mask=mask,
            position_ids=torch.arange(start, width)[None].expand(rows, -1),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    else:
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    # hidden[:, i] is position start + i; position t predicts labels[:, t + 1].
    targets = labels[:, start + 1 :]
    keep = targets != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    loss = torch.nn.functional.cross_entropy(logits, targets[keep])
    if head is not None and "head_pos" in tensors:
        picked = hidden[torch.arange(rows), (tensors["head_pos"] - start).clamp(min=0)]
        loss = loss + head_weight * torch.nn.functional.cross_entropy(
            head(picked), tensors["head_label"], ignore_index=-1
        )
        known = tensors["head_usual"] >= 0 if tail is not None else None
        if known is not None and bool(known.any()):
            loss = loss + head_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                tail(picked[known])[:, 0], tensors["head_usual"][known].float()
            )
    return loss


def train_lora(
    model: Any,
    encoded: Sequence[Encoded],
    cfg: Distillation,
    pad_id: int,
    out_dir: Path,
    progress: Callable[[dict[str, float]], None] | None = None,
    log_every_s: float = 10.0,
    max_steps: int | None = None,
    threads_setting: int | None = None,
    n_labels: int = 0,
    init_adapter: Path | None = None,
    init_head: tuple[Any, ...] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` (a plain causal LM; LoRA is added here) on ``encoded`` and save the adapter to
    ``out_dir``. Returns timings and losses; the PEFT model is left in eval mode on ``result``'s caller side
    via the saved adapter (the serving code loads base + adapter, so the trainer never hands over the object).

    With ``cfg.label_head`` and ``n_labels`` a label head is trained beside the LoRA on the examples' ``head_pos``
    / ``head_label`` and saved beside the adapter (``student_runtime.label_head``).

    With ``cfg.tail_decision`` too, the head's tail decision (``head_usual``) is trained and saved with it.

    ``init_adapter`` (a saved LoRA adapter) and ``init_head`` (weight, bias, optionally tail weight and bias)
    continue a previous training instead of starting from a fresh LoRA and a zero head (``warm_start``)."""
    import torch

    seed_everything(cfg.seed)
    threads = AdaptiveThreads(fixed=threads_setting)
    if init_adapter is not None:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    else:
        peft_model = add_lora(model, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    head = tail = None
    if cfg.label_head and n_labels:
        # Zero rows: every label starts equally likely; it reads the transformer's last hidden state (the final
        # norm's output, what serving scores).
        head = torch.nn.Linear(peft_model.get_output_embeddings().in_features, n_labels)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        if init_head is not None:
            with torch.no_grad():
                head.weight.copy_(init_head[0])
                head.bias.copy_(init_head[1])
        params += list(head.parameters())
        if cfg.tail_decision:
            tail = torch.nn.Linear(head.in_features, 1)
            torch.nn.init.zeros_(tail.weight)
            torch.nn.init.zeros_(tail.bias)
            if init_head is not None and len(init_head) == 4:
                with torch.no_grad():
                    tail.weight.copy_(init_head[2].reshape(1, -1))
                    tail.bias.copy_(init_head[3].reshape(1))
            params += list(tail.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    steps = total_steps(len(encoded), cfg.batch_size, cfg.epochs)
    if max_steps is not None:
        steps = min(steps, max_steps)
    warmup = int(steps * cfg.warmup_ratio)
    per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    log.info(
        "training: %d examples, batch %d, %.2f epochs = %d steps (warm-up %d), lr %g, LoRA r%d alpha%d on %s",
        len(encoded),
        cfg.batch_size,
        cfg.epochs,
        steps,
        warmup,
        cfg.learning_rate,
        cfg.lora_r,
        cfg.lora_alpha,
        ",".join(cfg.target_modules),
    )
    started = last_log = time.monotonic()
    step = seen = tokens = 0
    loss_value = float("nan")
    epoch_losses: list[float] = []
    epoch = 0
    while step < steps:
        epoch_losses = []
        for batch in batches(encoded, cfg.batch_size, seed=cfg.seed + epoch):
            if step >= steps:
                break
            threads.update()  # the cores the rest of the machine leaves free now
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, warmup, cfg.learning_rate)
            tensors = collate(batch, pad_id)
            loss = batch_loss(peft_model, tensors, head, cfg.label_head_weight, tail=tail)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(loss.detach())
            epoch_losses.append(loss_value)
            step += 1
            seen += len(batch)
            tokens += int(tensors["attention_mask"].sum())
            now = time.monotonic()
            if now - last_log >= log_every_s or step == steps:
                elapsed = now - started
                eta = elapsed / step * (steps - step)
                info = {
                    "step": step,
                    "steps": steps,
                    "epoch": step / per_epoch,
                    "loss": loss_value,
                    "examples_per_s": seen / elapsed if elapsed else 0.0,
                    "eta_s": eta,
                    "elapsed_s": elapsed,
                }
                log.info(
                    "step %d/%d epoch %.2f loss %.4f %.1f ex/s elapsed %.0fs ETA %.0fs",
                    step,
                    steps,
                    info["epoch"],
                    loss_value,
                    info["examples_per_s"],
                    elapsed,
                    eta,
                )
                if progress:
                    progress(info)
                last_log = now
        epoch += 1
    seconds = time.monotonic() - started
    peft_model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    if head is not None:
        save_label_head(
            out_dir / HEAD_FILE,
            head.weight,
            head.bias,
            tail.weight if tail is not None else None,
            tail.bias if tail is not None else None,
        )
    return TrainResult(
        adapter_dir=out_dir,
        steps=step,
        examples_seen=seen,
        seconds=seconds,
        final_loss=loss_value,
        mean_loss_last_epoch=sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan"),
        tokens=tokens,
    )


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path) -> Path:
    """Base + adapter merged into one full model directory (``distillation.merge_adapter``)."""
    from peft import PeftModel

    from services.trainer.base_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base_path)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if (adapter_dir / HEAD_FILE).is_file():  # the label head goes with the weights it reads
        shutil.copy2(adapter_dir / HEAD_FILE, out_dir / HEAD_FILE)
    return out_dir
