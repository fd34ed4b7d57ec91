"""Turning a job's result into events and, when the gate passed, a new Triton version.

* ``candidate``: emitted once the candidate is trained and evaluated (metrics, no verdict yet);
* ``promoted``: the gate passed, ``ModelRepository.publish_student`` placed, loaded and probed the version;
  the event carries the metrics (plus ``latency_p95_ms`` measured through Triton), the verdict, the
  calibrated confidence threshold and the lineage (snapshot, base model, config hash, code version);
* ``rejected``: the gate failed (reasons name each failing metric) or publishing failed; nothing is published;
* ``failed``: the job could not finish (``failed_event``: an unreadable snapshot, a base that does not load, an
  error in training); ``error`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from services.core.model_repository import (
    DEFAULT_PROBE,
    ModelRepository,
    PublishError,
    StudentModelSpec,
    student_model_name,
)
from services.core.provenance import code_version
from services.core.records import DatasetSnapshot, GateVerdict, ModelEvent
from services.trainer.evaluate import percentile, triton_latency
from services.trainer.pipeline import JobResult

log = logging.getLogger("flywheel.trainer")


def lineage(result: JobResult) -> dict[str, str]:
    return {
        "snapshot_id": result.snapshot_id,
        "base_model": result.base.name,
        "base_path": result.base.path,
        "config_hash": result.config_hash,
        "code_version": code_version(),
        "run_dir": str(result.run_dir),
        "merged": str(result.merged).lower(),
    }


def failed_event(snapshot: DatasetSnapshot, base_model: str, error: str) -> ModelEvent:
    """A job that could not finish for ``snapshot``: the agent leaves ``training``, and ``error`` says why."""
    return ModelEvent(
        agent_id=snapshot.agent_id,
        kind="failed",
        model_name=student_model_name(snapshot.agent_id),
        base_model=base_model,
        snapshot_id=snapshot.snapshot_id,
        lineage={"snapshot_id": snapshot.snapshot_id, "code_version": code_version()},
        code_version=code_version(),
        error=error,
    )


def _event(result: JobResult, kind: str, **kw: object) -> ModelEvent:
    return ModelEvent(
        agent_id=result.agent_id,
        kind=kind,  # type: ignore[arg-type]
        model_name=student_model_name(result.agent_id),
        base_model=result.base.name,
        adapter_uri=str(result.publish_dir),
        snapshot_id=result.snapshot_id,
        lineage=lineage(result),
        code_version=code_version(),
        **kw,  # type: ignore[arg-type]
    )


def candidate_event(result: JobResult) -> ModelEvent:
    return _event(result, "candidate", metrics=result.metrics(), confidence_threshold=result.routing.threshold)


def student_spec_for(result: JobResult, max_batch_size: int = 16) -> StudentModelSpec:
    metadata = {**lineage(result), "metrics": result.metrics(), "confidence_threshold": result.routing.threshold}
    return StudentModelSpec(
        base_model=str(result.publish_dir) if result.merged else result.base.path,
        adapter_path=None if result.merged else str(result.adapter_dir),
        max_new_tokens=result.max_new_tokens,
        labels=tuple(result.labels),
        label_prefix='{"intent": "' if result.labels else "",
        label_suffix='"' if result.labels else "",
        system_prompt=result.system_prompt,
        answer_template=result.answer_template,
        label_tails=result.decode_hints.get("label_tails") or {},
        default_tail=str(result.decode_hints.get("default_tail") or ""),
        tail_corpus=tuple(result.decode_hints.get("tail_corpus") or ()),
        max_prompt_tokens=result.decode_hints.get("max_prompt_tokens"),
        weight_format=str(result.decode_hints.get("weight_format") or "fp32"),
        label_head=result.decode_hints.get("label_head"),
        max_batch_size=max_batch_size,
        metadata=metadata,
    )


def finish(
    result: JobResult,
    repo: ModelRepository | None,
    emit: Callable[[ModelEvent], None],
    latency_probes: int = 20,
) -> ModelEvent:
    """Emit candidate, then publish and emit promoted, or emit rejected. Returns the final event."""
    emit(candidate_event(result))
    metrics = result.metrics()
    if not result.verdict.passed:
        event = _event(
            result, "rejected", metrics=metrics, gate=result.verdict, confidence_threshold=result.routing.threshold
        )
        emit(event)
        return event
    if repo is None:
        raise ValueError("the gate passed but no model repository was given to publish to")
    try:
        probe = result.holdout_prompts[0] if result.holdout_prompts else DEFAULT_PROBE
        published = repo.publish_student(result.agent_id, student_spec_for(result), probe_prompt=probe)
    except PublishError as exc:
        log.error("publishing failed: %s", exc)
        failed = GateVerdict(
            passed=False, mode=result.verdict.mode, reasons=[*result.verdict.reasons, f"publish failed: {exc}"]
        )
        event = _event(result, "rejected", metrics=metrics, gate=failed, confidence_threshold=result.routing.threshold)
        emit(event)
        return event
    probes = result.holdout_prompts[:latency_probes]
    if probes:
        lat = triton_latency(lambda p: repo.probe(published.model, published.version, p), probes)
        metrics = {**metrics, "latency_p95_ms": percentile(lat, 95), "latency_p50_ms": percentile(lat, 50)}
    event = _event(
        result,
        "promoted",
        model_version=published.version,
        metrics=metrics,
        gate=result.verdict,
        confidence_threshold=result.routing.threshold,
    )
    emit(event)
    log.info(
        "promoted %s version %d (agreement %.4f, threshold %s)",
        published.model,
        published.version,
        metrics["agreement"],
        result.routing.threshold,
    )
    return event
