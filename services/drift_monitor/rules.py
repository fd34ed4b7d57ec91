"""The drift monitor's decisions, as pure functions of counts, the agent's lifecycle and an injected ``now``.

Three rules look at the traffic one agent's live student served since its promotion, over a sliding window:

* ``agreement_drift``: on shadow samples (both models answered), the student agrees with the teacher at a
  rate at least ``agreement_drop`` below the promoted model's validation agreement;
* ``intent_shift``: at least ``unseen_intent_share`` of the window's (labelled) traffic has an intent the
  promoted model's training snapshot does not contain;
* ``fallback_rate``: the low-confidence fallback rate rose at least ``fallback_rate_rise`` above a reference
  (``1 - coverage`` the student was calibrated at, or the rate in the first window after the promotion).

A rule fires only with at least ``min_samples`` requests and when its figure is beyond its limit with
significance: the one-sided test of "the true rate is still within the limit" gives p <= ``alpha`` (an exact
binomial test against a fixed limit; a two-proportion test when the reference is itself a sample). So a
handful of unlucky requests cannot fire, and every check (every 30 s over overlapping windows) keeps a small
false-alarm rate. Then the cool-down and the lifecycle stage decide whether a fired rule may trigger.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.core.agents import Drift
from services.core.lifecycle import AgentLifecycle, LifecycleEvent
from services.core.records import ModelEvent, RetrainTriggered
from services.curator.labelling import CLUSTER_PREFIX

AGREEMENT = "agreement_drift"
INTENT = "intent_shift"
FALLBACK = "fallback_rate"
# When several rules fire at once, one retrain is triggered, named after the first here: disagreement is the
# direct measure of a wrong student; unseen intents explain it; fallbacks only cost money.
PRIORITY: tuple[str, ...] = (AGREEMENT, INTENT, FALLBACK)


# Statistics -------------------------------------------------------------------------------------------------
def _log_pmf(i: int, n: int, log_p: float, log_q: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q


def _tail(indices: range, n: int, p: float) -> float:
    # Sum of binomial probabilities in log space: exact enough for p-values down to 1e-300.
    log_p, log_q = math.log(p), math.log1p(-p)
    logs = [_log_pmf(i, n, log_p, log_q) for i in indices]
    if not logs:
        return 0.0
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return _tail(range(0, k + 1), n, p)


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return _tail(range(k, n + 1), n, p)


def z_score(hits: int, n: int, p0: float) -> float | None:
    """(observed - p0) in standard errors under p0: a readable companion of the exact p-value."""
    if n == 0 or not 0.0 < p0 < 1.0:
        return None
    return (hits / n - p0) / math.sqrt(p0 * (1 - p0) / n)


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (0, 1) for no samples."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two unnormalised distributions over labels."""
    sp, sq = sum(p.values()), sum(q.values())
    if sp <= 0 or sq <= 0:
        return 0.0
    total = 0.0
    for label in set(p) | set(q):
        a, b = p.get(label, 0) / sp, q.get(label, 0) / sq
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return max(0.0, min(1.0, total))


# Rule results -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleResult:
    rule: str  # also the RetrainTriggered reason
    fired: bool
    why: str  # one line: what was seen against what, or why the rule could not judge
    samples: int = 0  # requests the figure is over (shadow samples, labelled requests, student-eligible)
    hits: int = 0  # of which: agreed / on an unseen intent / fell back
    observed: float | None = None
    reference: float | None = None
    limit: float | None = None  # the rate beyond which the rule fires
    p_value: float | None = None
    statistic: float | None = None  # z-score of the observed rate against the limit
    test: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fired": self.fired, "why": self.why, "samples": self.samples, "hits": self.hits}
        for name in ("observed", "reference", "limit", "statistic"):
            value = getattr(self, name)
            out[name] = None if value is None else round(value, 6)
        # Significant digits, not decimals: a p-value of 1e-9 is the point, not 0.0.
        out["p_value"] = None if self.p_value is None else float(f"{self.p_value:.6g}")
        if self.samples:
            lo, hi = wilson_interval(self.hits, self.samples)
            out["wilson_95"] = [round(lo, 4), round(hi, 4)]
        out["test"] = self.test
        out.update(self.details)
        return out


def _skip(rule: str, why: str, samples: int = 0, hits: int = 0, **details: Any) -> RuleResult:
    return RuleResult(rule, False, why, samples, hits, details=details)


def agreement_drift(agreed: int, samples: int, reference: float | None, drift: Drift) -> RuleResult:
    """Shadow-sample agreement against the promoted model's validation agreement."""
    if reference is None:
        return _skip(AGREEMENT, "the promotion carries no validation agreement", samples, agreed)
    if samples < drift.min_samples:
        why = f"{samples} shadow samples, fewer than min_samples {drift.min_samples}"
        return _skip(AGREEMENT, why, samples, agreed)
    observed = agreed / samples
    limit = max(0.0, reference - drift.agreement_drop)
    p_value = binom_cdf(agreed, samples, limit)
    fired = observed <= limit and p_value <= drift.alpha
    return RuleResult(
        AGREEMENT,
        fired,
        f"agreement {observed:.3f} on {samples} shadow samples vs validation {reference:.3f} "
        f"(limit {limit:.3f}), p={p_value:.3g} (alpha {drift.alpha})",
        samples,
        agreed,
        observed,
        reference,
        limit,
        p_value,
        z_score(agreed, samples, limit),
        f"exact binomial, one-sided: H0 agreement >= {limit:.4f}",
        {"drop": round(reference - observed, 6)},
    )


def intent_shift(window: Mapping[str | None, int], trained: Mapping[str, int] | None, drift: Drift) -> RuleResult:
    """The share of the window's labelled traffic on intents the training snapshot does not contain.
    ``window`` maps each effective intent (None: not labelled yet) to its requests."""
    unlabelled = sum(n for intent, n in window.items() if not intent)
    labelled = {intent: n for intent, n in window.items() if intent}
    samples = sum(labelled.values())
    if not trained:
        return _skip(INTENT, "the promoted model's snapshot has no intent counts", samples, unlabelled=unlabelled)
    known = {intent for intent, n in trained.items() if intent and n > 0}
    unseen = {intent: n for intent, n in labelled.items() if intent not in known}
    hits = sum(unseen.values())
    details: dict[str, Any] = {
        "unlabelled": unlabelled,
        # Requests the curator could only cluster (far from every known intent) beside those the teacher or
        # the client named: both are traffic the student was not trained on, but they read differently.
        "unseen_named": sum(n for intent, n in unseen.items() if not intent.startswith(CLUSTER_PREFIX)),
        "unseen_clustered": sum(n for intent, n in unseen.items() if intent.startswith(CLUSTER_PREFIX)),
        "unseen_intents": dict(sorted(unseen.items(), key=lambda kv: (-kv[1], kv[0]))[:10]),
        "js_divergence": round(js_divergence(labelled, {k: float(v) for k, v in trained.items() if k}), 6),
    }
    if samples < drift.min_samples:
        return _skip(
            INTENT, f"{samples} labelled requests, fewer than min_samples {drift.min_samples}", samples, hits, **details
        )
    observed = hits / samples
    limit = drift.unseen_intent_share
    p_value = binom_sf(hits, samples, limit)
    fired = observed >= limit and p_value <= drift.alpha
    return RuleResult(
        INTENT,
        fired,
        f"{observed:.3f} of {samples} labelled requests on {len(unseen)} unseen intents "
        f"(limit {limit:.3f}), p={p_value:.3g} (alpha {drift.alpha})",
        samples,
        hits,
        observed,
        0.0,
        limit,
        p_value,
        z_score(hits, samples, limit),
        f"exact binomial, one-sided: H0 unseen share <= {limit:.4f}",
        details,
    )


@dataclass(frozen=True)
class FallbackReference:
    rate: float
    source: str  # calibration | first_window
    samples: int | None = None  # first_window: the requests it is measured on (a sample, not a constant)
    hits: int | None = None


def fallback_reference(
    model: ModelEvent | None, drift: Drift, baseline: tuple[int, int] | None
) -> FallbackReference | None:
    """What the fallback rate is compared with. ``baseline`` = (fallbacks, student-eligible) in the first
    window after the promotion, when that window is over; None while it is not."""
    if drift.fallback_reference == "auto" and model is not None and model.confidence_threshold is not None:
        coverage = model.metrics.get("coverage")
        if coverage is not None and 0.0 < coverage <= 1.0:
            # The router serves the student at the calibrated threshold: on traffic like the holdout, the
            # share below it (falling back) is 1 - coverage.
            return FallbackReference(1.0 - coverage, "calibration")
    if baseline is not None and baseline[1] >= drift.min_samples:
        return FallbackReference(baseline[0] / baseline[1], "first_window", baseline[1], baseline[0])
    return None


def fallback_rate(fallbacks: int, eligible: int, reference: FallbackReference | None, drift: Drift) -> RuleResult:
    """The low-confidence fallback rate of student-eligible traffic against its reference."""
    if reference is None:
        return _skip(
            FALLBACK, "no reference rate yet (the first window after the promotion is not over)", eligible, fallbacks
        )
    if eligible < drift.min_samples:
        return _skip(
            FALLBACK,
            f"{eligible} student-eligible requests, fewer than min_samples {drift.min_samples}",
            eligible,
            fallbacks,
            reference_source=reference.source,
        )
    observed = fallbacks / eligible
    limit = reference.rate + drift.fallback_rate_rise
    details: dict[str, Any] = {"rise": round(observed - reference.rate, 6), "reference_source": reference.source}
    if reference.samples is None or reference.hits is None:
        p_value = binom_sf(fallbacks, eligible, limit) if limit < 1.0 else 1.0
        statistic = z_score(fallbacks, eligible, limit)
        test = f"exact binomial, one-sided: H0 fallback rate <= {limit:.4f}"
    else:
        # Both rates are samples: Agresti-Caffo (one pseudo-success and -failure per group) keeps the standard
        # error sane at rates of 0 or 1; H0: the rise is at most fallback_rate_rise.
        n1, n0 = eligible + 2, reference.samples + 2
        p1, p0 = (fallbacks + 1) / n1, (reference.hits + 1) / n0
        se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        statistic = (p1 - p0 - drift.fallback_rate_rise) / se
        p_value = normal_sf(statistic)
        test = f"two-proportion z (Agresti-Caffo), one-sided: H0 rise <= {drift.fallback_rate_rise:.4f}"
        details["reference_samples"] = reference.samples
    fired = observed >= limit and p_value <= drift.alpha
    return RuleResult(
        FALLBACK,
        fired,
        f"fallback rate {observed:.3f} of {eligible} student-eligible requests vs {reference.source} "
        f"{reference.rate:.3f} (limit {limit:.3f}), p={p_value:.3g} (alpha {drift.alpha})",
        eligible,
        fallbacks,
        observed,
        reference.rate,
        limit,
        p_value,
        statistic,
        test,
        details,
    )


def choose(results: Iterable[RuleResult]) -> RuleResult | None:
    """The rule a retrain is triggered for: the first fired one in PRIORITY order."""
    fired = {r.rule: r for r in results if r.fired}
    return next((fired[rule] for rule in PRIORITY if rule in fired), None)


# Windows, the current model, the cool-down ------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @property
    def empty(self) -> bool:
        return self.end <= self.start

    def evidence(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


def window(now: datetime, drift: Drift, promoted_at: datetime) -> Window:
    """The sliding window ending now, never reaching back before the current promotion: traffic the previous
    student served is not this student's drift."""
    return Window(max(now - timedelta(minutes=drift.window_minutes), promoted_at), now)


def baseline_window(drift: Drift, promoted_at: datetime) -> Window:
    """The first window after the promotion (the fallback rule's reference when no calibration is known)."""
    return Window(promoted_at, promoted_at + timedelta(minutes=drift.window_minutes))


def current_model(agent_id: str, events: Iterable[LifecycleEvent]) -> ModelEvent | None:
    """The promotion (or rollback) whose student serves now: the latest one."""
    serving = [
        e
        for e in events
        if isinstance(e, ModelEvent) and e.agent_id == agent_id and e.kind in ("promoted", "rolled_back")
    ]
    return max(serving, key=lambda e: e.created_at) if serving else None


def snapshot_of(model: ModelEvent) -> str | None:
    return model.snapshot_id or model.lineage.get("snapshot_id") or None


def cooldown_until(agent_id: str, events: Iterable[LifecycleEvent], drift: Drift) -> datetime | None:
    """When the cool-down after the agent's latest retrain trigger ends; None: never triggered. The grace
    period's trigger does not count: it comes before any student, and the first student's training must not
    hold back the drift monitor once it is live. Derived from the events (ClickHouse ``retrain_events`` and the
    topic), so it survives a restart."""
    times = [
        e.created_at
        for e in events
        if isinstance(e, RetrainTriggered) and e.agent_id == agent_id and e.reason != "grace_complete"
    ]
    return max(times) + timedelta(minutes=drift.cooldown_minutes) if times else None


def blocked(state: AgentLifecycle, cooldown_end: datetime | None, now: datetime) -> str | None:
    """Why no drift trigger may be sent for the agent now, or None when one may."""
    if state.stage != "live":
        return f"stage {state.stage}, not live"
    if not state.has_student or state.promoted_at is None:
        return "no promoted student"
    if cooldown_end is not None and now < cooldown_end:
        return f"cool-down until {cooldown_end.isoformat()}"
    return None


def evidence(
    state: AgentLifecycle,
    model: ModelEvent | None,
    span: Window,
    chosen: RuleResult,
    results: Iterable[RuleResult],
    queries: Mapping[str, tuple[str, Mapping[str, Any]]],
    drift: Drift,
) -> dict[str, Any]:
    """The RetrainTriggered evidence: the window, the firing rule's figures and test, the query (text and
    parameters) that produced them, and the other rules' figures beside it."""
    sql, params = queries.get(chosen.rule, ("", {}))
    return {
        "rule": chosen.rule,
        "summary": chosen.why,
        "window": {**span.evidence(), "minutes": drift.window_minutes},
        "model": {
            "name": state.model_name,
            "version": state.model_version,
            "promoted_at": state.promoted_at.isoformat() if state.promoted_at else None,
            "snapshot_id": snapshot_of(model) if model is not None else None,
            "validation_agreement": state.validation_agreement,
        },
        "figures": chosen.evidence(),
        "alpha": drift.alpha,
        "min_samples": drift.min_samples,
        "cooldown_minutes": drift.cooldown_minutes,
        "query": {"sql": sql.strip(), "parameters": dict(params)},
        "rules": {r.rule: r.evidence() for r in results},
    }
