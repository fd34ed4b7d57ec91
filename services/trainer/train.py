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
from services.trainer.data import Encoded, batches, collate

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
) -> TrainResult:
    """Fine-tune ``model`` (a plain causal LM; LoRA is added here) on ``encoded`` and save the adapter to
    ``out_dir``. Returns timings and losses; the PEFT model is left in eval mode on ``result``'s caller side
    via the saved adapter (the serving code loads base + adapter, so the trainer never hands over the object).

    With ``cfg.label_head`` and ``n_labels`` a label head is trained beside the LoRA on the examples' ``head_pos``
    / ``head_label`` and saved beside the adapter (``student_runtime.label_head``)."""
    import torch

    seed_everything(cfg.seed)
    threads = AdaptiveThreads(fixed=threads_setting)
    peft_model = add_lora(model, cfg)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    head, captured = None, {}
    if cfg.label_head and n_labels:
        # Zero rows: every label starts equally likely; the hidden state comes from the output layer's input
        # (the final norm's output, what serving scores).
        head = torch.nn.Linear(peft_model.get_output_embeddings().in_features, n_labels)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        params += list(head.parameters())
        hook = peft_model.get_output_embeddings().register_forward_pre_hook(
            lambda _module, args: captured.__setitem__("hidden", args[0])
        )
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
            head_pos, head_label = tensors.pop("head_pos", None), tensors.pop("head_label", None)
            out = peft_model(**tensors)
            loss = out.loss
            if head is not None and head_pos is not None:
                rows = torch.arange(len(batch))
                hidden = captured["hidden"][rows, head_pos.clamp(min=0)]
                head_loss = torch.nn.functional.cross_entropy(head(hidden), head_label, ignore_index=-1)
                loss = loss + cfg.label_head_weight * head_loss
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
        hook.remove()
        save_label_head(out_dir / HEAD_FILE, head.weight, head.bias)
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
