"""One training job, start to finish: snapshot → base → LoRA → holdout evaluation → calibration → gate.

Kept free of Kafka so tests, the benchmark and the service run the same code; ``publish.py`` turns the
result into a Triton version and ``ModelEvent`` records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.core.agents import AgentConfig
from services.core.records import GateVerdict
from services.student_runtime import StudentGenerator, render_prompt
from services.student_runtime.generator import answer_end_id
from services.student_runtime.label_head import HEAD_FILE
from services.student_runtime.prompt import shared_prefix_ids
from services.trainer import data as D
from services.trainer.base_model import ResolvedBase, load_model_and_tokenizer, prepare_base
from services.trainer.calibrate import Calibration, calibrate_threshold, routing_calibration
from services.trainer.evaluate import HoldoutReport, answer_intent, evaluate_holdout, percentile
from services.trainer.gate import FormatTrial, GateInputs, choose_format, decide, worth_trying
from services.trainer.train import TrainResult, merge_adapter, train_lora
from services.trainer.warm_start import find_warm_start, initial_head

log = logging.getLogger("flywheel.trainer")


@dataclass(frozen=True)
class JobOptions:
    system_prompt: str | None = None  # stage-2 prompt, also published in the spec (None: from the targets)
    eval_batch_size: int = 8
    max_holdout: int | None = None  # cap on holdout answers generated (time budget)
    max_steps: int | None = None  # cap on optimizer steps (tests)
    min_calibration_support: int = 5  # answers a calibrated threshold must keep at least
    threads: int | None = None  # training threads; None: adaptive (the trainer_threads setting)
    # The agent's served version folder (spec.json, adapter/): a warm-started retrain continues from it.
    served_version: Path | None = None


@dataclass
class JobResult:
    agent_id: str
    snapshot_id: str
    base: ResolvedBase
    run_dir: Path
    adapter_dir: Path
    publish_dir: Path  # the adapter, or the merged model when distillation.merge_adapter
    merged: bool
    labels: list[str]
    max_new_tokens: int
    system_prompt: str
    answer_template: dict[str, Any]
    train: TrainResult
    report: HoldoutReport
    calibration: Calibration  # at quality_threshold: what the selective gate judges
    verdict: GateVerdict
    config_hash: str
    holdout_prompts: list[str] = field(default_factory=list)
    # How the version decodes (spec.json): label tails to verify as drafts, the prompt limit of training.
    decode_hints: dict[str, Any] = field(default_factory=dict)
    # The routing threshold the promotion carries (calibrate.routing_calibration); None: the gate's.
    routing_calibration: Calibration | None = None
    warm_start: str | None = None  # the served version this training continued from (None: from the base)

    @property
    def routing(self) -> Calibration:
        return self.routing_calibration or self.calibration

    def metrics(self) -> dict[str, float]:
        """What the ModelEvent carries (floats only, by the schema)."""
        out = {
            "agreement": self.report.agreement,
            "format_compliance": self.report.format_compliance,
            # What routing serves (the threshold the promotion carries): the share of the holdout at or above it
            # and its agreement; the selective gate's own calibration (at quality_threshold) beside them.
            "selective_agreement": self.routing.selective_agreement,
            "coverage": self.routing.coverage,
            "served_agreement_target": self.routing.target,
            "gate_selective_agreement": self.calibration.selective_agreement,
            "gate_coverage": self.calibration.coverage,
            "holdout_size": float(self.report.size),
            "train_examples": float(self.train.examples_seen),
            "train_steps": float(self.train.steps),
            "train_seconds": self.train.seconds,
            "train_loss": self.train.mean_loss_last_epoch,
            "eval_latency_p95_ms": percentile(self.report.latencies_ms, 95),
        }
        if self.report.task_accuracy is not None:
            out["task_accuracy"] = self.report.task_accuracy
        for fmt, agreement in self.report.format_agreements.items():  # what each weight format tried agreed on
            out[f"agreement_{fmt}"] = agreement
        for fmt, speed in self.report.format_speeds.items():  # each format's probe on the trainer's machine
            out[f"probe_answers_per_s_{fmt}"] = speed
        return {k: float(v) for k, v in out.items() if v == v}  # drop NaN

    def report_json(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "snapshot_id": self.snapshot_id,
            "base_model": self.base.name,
            "base_path": self.base.path,
            "config_hash": self.config_hash,
            "metrics": self.metrics(),
            "confidence_threshold": self.routing.threshold,
            "weight_format": self.decode_hints.get("weight_format", "fp32"),
            "warm_start": self.warm_start,
            "gate": self.verdict.model_dump(),
            "labels": self.labels,
            "answers": [
                {
                    "request_id": j.request_id,
                    "answer": j.answer,
                    "confidence": j.confidence,
                    "agreed": j.agreed,
                    "compliant": j.compliant,
                    "correct": j.correct,
                }
                for j in self.report.judged
            ],
        }


def config_hash(agent: AgentConfig, options: JobOptions) -> str:
    blob = json.dumps(
        {
            "distillation": agent.distillation.model_dump(),
            "validation": agent.validation.model_dump(),
            "system_prompt": options.system_prompt or "",
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def labels_of(examples: Sequence[D.Example]) -> list[str]:
    """The intent labels decoding is constrained to: those the training targets use (the student can only
    have learnt these; an unseen intent is the drift monitor's business, not a label to guess)."""
    return sorted({i for i in (answer_intent(e.target) for e in examples) if i})


def student_spec(
    base_path: str,
    adapter: str | None,
    labels: Sequence[str],
    system_prompt: str | None,
    max_new_tokens: int,
    answer_template: dict[str, Any] | None = None,
    decode_hints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec dict ``StudentGenerator`` (and Triton, via spec.json) serves."""
    return {
        **(decode_hints or {}),
        "answer_template": answer_template or {},
        "base_model": base_path,
        "adapter_path": adapter,
        "labels": list(labels),
        "label_prefix": D.LABEL_PREFIX if labels else "",
        "label_suffix": D.LABEL_SUFFIX if labels else "",
        "system_prompt": system_prompt,
        "max_new_tokens": max_new_tokens,
        "dtype": "float32",
    }


def probe_speed(generate: Callable[[list[str]], Any], prompts: Sequence[str], size: int) -> float:
    """Answers per second over the first ``size`` prompts in one batch, after one warm-up answer."""
    sample = list(prompts[:size])
    if not sample:
        return 0.0
    generate(sample[:1])
    started = time.perf_counter()
    generate(sample)
    return len(sample) / max(1e-9, time.perf_counter() - started)


def evaluate_formats(
    agent: AgentConfig, spec: dict[str, Any], holdout: Sequence[D.Example], prompts: list[str], options: JobOptions
) -> tuple[HoldoutReport, dict[str, Any]]:
    """Evaluate the candidate in fp32, then in each lighter weight format the agent allows that is faster on this
    machine (a probe of one batch: ``gate.worth_trying``), fastest first, and keep the first that keeps the
    answers (``gate.choose_format``): (the served format's holdout report, the spec serving it). The gate then
    judges exactly what is served."""
    cfg = agent.distillation
    reports: dict[str, HoldoutReport] = {}
    speeds: dict[str, float] = {}
    for fmt in ["fp32", *cfg.weight_formats]:
        t0 = time.monotonic()
        generator = StudentGenerator({**spec, "weight_format": fmt})
        speeds[fmt] = probe_speed(generator.generate, prompts, options.eval_batch_size)
        if fmt == "fp32" or fmt in worth_trying(speeds, [fmt], cfg.weight_format_min_speedup):
            reports[fmt] = evaluate_holdout(generator.generate, holdout, prompts, agent.output, options.eval_batch_size)
            log.info(
                "holdout (%s): %d answers in %.1fs (probe %.1f answers/s), agreement %.4f, format %.4f",
                fmt,
                reports[fmt].size,
                time.monotonic() - t0,
                speeds[fmt],
                reports[fmt].agreement,
                reports[fmt].format_compliance,
            )
        else:
            log.info(
                "%s not evaluated: %.1f answers/s against fp32's %.1f on this machine (needs %.2fx)",
                fmt,
                speeds[fmt],
                speeds["fp32"],
                cfg.weight_format_min_speedup,
            )
        del generator
    trials = {fmt: FormatTrial(fmt, r.agreement, r.format_compliance) for fmt, r in reports.items()}
    order = worth_trying(speeds, list(reports), cfg.weight_format_min_speedup)
    chosen = choose_format(trials["fp32"], [trials[f] for f in order], cfg.weight_format_tolerance)
    log.info(
        "weight format %s is served (%s)",
        chosen.weight_format,
        ", ".join(f"{t.weight_format} {t.agreement:.4f} at {speeds[t.weight_format]:.1f}/s" for t in trials.values()),
    )
    report = reports[chosen.weight_format]
    report.format_agreements = {fmt: r.agreement for fmt, r in reports.items()}
    report.format_speeds = dict(speeds)
    return report, {**spec, "weight_format": chosen.weight_format}


def run_job(
    agent: AgentConfig,
    snapshot: D.Snapshot,
    artifacts: Path,
    options: JobOptions | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> JobResult:
    options = options or JobOptions()
    cfg = agent.distillation
    chash = config_hash(agent, options)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run_dir = Path(artifacts) / "runs" / agent.agent_id / f"{snapshot.snapshot_id}-{chash}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=False)  # never overwritten

    base = prepare_base(cfg.base_model, cfg.gguf_file, Path(artifacts) / "base_models")
    t0 = time.monotonic()
    model, tokenizer = load_model_and_tokenizer(base.path, base.gguf_file)
    log.info("base %s loaded from %s in %.1fs", base.name, base.path, time.monotonic() - t0)
    eos_id = answer_end_id(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    train_examples = snapshot.train[: cfg.max_train_examples] if cfg.max_train_examples else snapshot.train
    template = D.build_answer_template(ex.target for ex in train_examples) if cfg.compact_targets else {}
    system_prompt = options.system_prompt or D.template_prompt(template)
    targets = [D.compact_target(ex.target, template) if template else ex.target for ex in train_examples]
    # One prompt limit for training and serving: the longest answer decides what is left for the prompt, and
    # the system prompt's shared tokens are always kept (serving reuses their keys/values).
    limit = D.prompt_limit(cfg.max_seq_len, [len(D.answer_token_ids(tokenizer, t, eos_id)) for t in targets])
    shared = shared_prefix_ids(tokenizer, system_prompt)
    tails, default_tail = D.label_tails(targets)
    hints: dict[str, Any] = {
        "label_tails": tails,
        "default_tail": default_tail,
        "tail_corpus": D.tail_corpus(targets),
        "max_prompt_tokens": limit,
    }
    labels = labels_of(train_examples)
    label_index = {label: i for i, label in enumerate(labels)} if cfg.label_head and labels else None
    encoded = []
    skipped = 0
    for ex, target in zip(train_examples, targets, strict=True):
        text = render_prompt(tokenizer, ex.messages, system_prompt)
        item = D.encode_example(
            tokenizer, text, target, eos_id, cfg.max_seq_len, prompt_limit=limit, prefix_ids=shared,
            label_index=label_index, label_tails=tails if cfg.tail_decision else None,
        )  # fmt: skip
        if item is None:
            skipped += 1
        else:
            encoded.append(item)
    if not encoded:
        raise ValueError(f"no training example fits max_seq_len {cfg.max_seq_len}")
    if skipped:
        log.warning("%d training examples longer than max_seq_len %d were skipped", skipped, cfg.max_seq_len)
    answer_lengths = sorted(e.answer_tokens for e in encoded)
    # Room for the longest trained answer plus a margin: a tight limit bounds a runaway answer's latency.
    max_new_tokens = min(256, answer_lengths[-1] + 16)

    warm = find_warm_start(options.served_version, base.path, cfg) if cfg.warm_start else None
    init_head = None
    if warm is not None:
        log.info("warm start from %s: %g epochs instead of %g", warm.version_dir, cfg.warm_start_epochs, cfg.epochs)
        if label_index:
            init_head = initial_head(warm, labels, model.get_output_embeddings().in_features)
    train = train_lora(
        model,
        encoded,
        cfg.model_copy(update={"epochs": cfg.warm_start_epochs}) if warm else cfg,
        pad_id,
        run_dir / "adapter",
        progress=progress,
        max_steps=options.max_steps,
        threads_setting=options.threads,
        n_labels=len(label_index or ()),
        init_adapter=warm.adapter_dir if warm else None,
        init_head=init_head,
    )
    del model
    if (train.adapter_dir / HEAD_FILE).is_file():
        hints["label_head"] = HEAD_FILE
    publish_dir, merged = train.adapter_dir, False
    if cfg.merge_adapter:
        publish_dir, merged = merge_adapter(base.path, train.adapter_dir, run_dir / "merged"), True

    holdout = snapshot.holdout[: options.max_holdout] if options.max_holdout else snapshot.holdout
    prompts = [D.prompt_json(ex.messages) for ex in holdout]
    spec = student_spec(
        str(publish_dir) if merged else base.path,
        None if merged else str(train.adapter_dir),
        labels,
        system_prompt,
        max_new_tokens,
        template,
        hints,
    )
    report, spec = evaluate_formats(agent, spec, holdout, prompts, options)
    hints["weight_format"] = spec["weight_format"]
    support = min(options.min_calibration_support, report.size or 1)
    calibration = calibrate_threshold(report.scored, agent.validation.quality_threshold, support)
    routing = routing_calibration(report.scored, agent.validation.served_agreement, calibration, support)
    verdict = decide(
        GateInputs(
            agreement=report.agreement,
            format_compliance=report.format_compliance,
            selective_agreement=calibration.selective_agreement,
            coverage=calibration.coverage,
            holdout_size=report.size,
            confidence_threshold=calibration.threshold,
        ),
        agent.validation,
    )
    result = JobResult(
        agent_id=agent.agent_id,
        snapshot_id=snapshot.snapshot_id,
        base=base,
        run_dir=run_dir,
        adapter_dir=train.adapter_dir,
        publish_dir=publish_dir,
        merged=merged,
        labels=labels,
        max_new_tokens=max_new_tokens,
        system_prompt=system_prompt,
        answer_template=template,
        train=train,
        report=report,
        calibration=calibration,
        verdict=verdict,
        config_hash=chash,
        holdout_prompts=prompts,
        decode_hints=hints,
        routing_calibration=routing,
        warm_start=str(warm.version_dir) if warm else None,
    )
    if routing.target != agent.validation.served_agreement:
        log.warning(
            "no confidence threshold reaches agreement %.3f on the served answers (served_agreement): "
            "routing uses the gate's threshold %s",
            agent.validation.served_agreement,
            calibration.threshold,
        )
    (run_dir / "report.json").write_text(json.dumps(result.report_json(), indent=2, default=str) + "\n")
    log.info("gate (%s): %s %s", verdict.mode, "PASSED" if verdict.passed else "FAILED", "; ".join(verdict.reasons))
    return result
