"""agents.yaml validation: defaults, and every bad value refused with the key path named."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.agents import AgentConfigError, UnknownAgentError, load_agents, parse_agents


def test_minimal_agent_gets_the_seed_defaults() -> None:
    agents = parse_agents({"agents": {"support-bot": {}}})
    a = agents.agent("support-bot")
    assert (a.tier, a.mode) == ("cost-optimized", "auto")
    assert (a.grace_period.min_conversations, a.grace_period.min_unique_intents) == (300, 50)
    assert a.grace_period.max_duration_days == 14
    d = a.distillation
    assert (d.lora_r, d.lora_alpha, d.lora_dropout, d.epochs, d.learning_rate, d.batch_size, d.warmup_ratio) == (
        16,
        32,
        0.05,
        3,
        2e-4,
        8,
        0.1,
    )
    assert d.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (a.validation.holdout_fraction, a.validation.quality_threshold) == (0.15, 0.92)
    assert (a.routing.confidence_threshold, a.routing.shadow_rate) == (0.85, 0.05)
    tier = agents.tier(a)
    assert (tier.student.input_per_1m, tier.student.output_per_1m) == (0.30, 2.50)
    assert (tier.teacher.input_per_1m, tier.teacher.output_per_1m) == (0.60, 3.00)
    acc = agents.tiers["accuracy-optimized"]
    assert (
        acc.student.input_per_1m,
        acc.student.output_per_1m,
        acc.teacher.input_per_1m,
        acc.teacher.output_per_1m,
    ) == (
        0.90,
        5.00,
        1.50,
        15.00,
    )


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"tier": "cheap"}, "agents.support-bot.tier"),
        ({"mode": "robot"}, "agents.support-bot.mode"),
        ({"routing": {"shadow_rate": 1.5}}, "agents.support-bot.routing.shadow_rate"),
        ({"routing": {"confidence_threshold": -0.1}}, "agents.support-bot.routing.confidence_threshold"),
        ({"routing": {"canary_steps": [0.5, 0.2]}}, "agents.support-bot.routing.canary_steps"),
        ({"routing": {"shadow_rat": 0.1}}, "agents.support-bot.routing.shadow_rat"),
        ({"grace_period": {"min_conversations": 0}}, "agents.support-bot.grace_period.min_conversations"),
        ({"distillation": {"learning_rate": "fast"}}, "agents.support-bot.distillation.learning_rate"),
        ({"validation": {"quality_threshold": 1.2}}, "agents.support-bot.validation.quality_threshold"),
        ({"colour": "blue"}, "agents.support-bot.colour"),
    ],
)
def test_bad_values_are_named(entry: dict, named: str) -> None:
    with pytest.raises(AgentConfigError) as info:
        parse_agents({"agents": {"support-bot": entry}})
    assert named in str(info.value)


def test_a_distillation_profile_fills_only_the_keys_not_written() -> None:
    agents = parse_agents(
        {
            "agents": {
                "small": {"distillation": {"profile": "small-cpu", "epochs": 2}},
                "big": {"distillation": {"profile": "seed"}},
            }
        }
    )
    small, big = agents.agent("small").distillation, agents.agent("big").distillation
    assert (small.learning_rate, small.epochs) == (1e-3, 2)  # the profile's rate, the agent's own epochs
    assert small.target_modules[-3:] == ["gate_proj", "up_proj", "down_proj"] and small.label_head
    assert not big.label_head
    assert (big.learning_rate, big.epochs, big.target_modules) == (2e-4, 3, ["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(AgentConfigError, match=r"agents\.x\.distillation\.profile"):
        parse_agents({"agents": {"x": {"distillation": {"profile": "huge"}}}})


def test_bad_agent_id() -> None:
    with pytest.raises(AgentConfigError, match="agent_id"):
        parse_agents({"agents": {"Support Bot!": {}}})


def test_no_agents() -> None:
    with pytest.raises(AgentConfigError, match="agents"):
        parse_agents({"agents": {}})


def test_custom_tier_prices() -> None:
    agents = parse_agents(
        {
            "tiers": {
                "cost-optimized": {
                    "teacher": {"input_per_1m": 1, "output_per_1m": 2},
                    "student": {"input_per_1m": 0.1, "output_per_1m": 0.2},
                }
            },
            "agents": {"a": {}},
        }
    )
    assert agents.tier(agents.agent("a")).teacher.output_per_1m == 2
    assert agents.tiers["accuracy-optimized"].teacher.output_per_1m == 15.0


def test_unknown_agent_names_the_known_ones() -> None:
    agents = parse_agents({"agents": {"a": {}, "b": {}}})
    with pytest.raises(UnknownAgentError) as info:
        agents.agent("zzz")
    assert "zzz" in str(info.value) and "a, b" in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentConfigError, match="does not exist"):
        load_agents(tmp_path / "missing.yaml")
    bad = tmp_path / "agents.yaml"
    bad.write_text("agents: [unclosed")
    with pytest.raises(AgentConfigError, match="not valid YAML"):
        load_agents(bad)


def test_the_shipped_agents_file_is_valid() -> None:
    from services.core.settings import Settings

    agents = load_agents(Settings().agents_file)
    assert "support-bot" in agents.agents
