"""Which served version a retrain can continue from, and how its label head's rows are carried over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.agents import LINEAR_TARGETS, Distillation
from services.trainer.warm_start import find_warm_start, head_rows, initial_head, mismatch

CFG = Distillation(base_model="/models/base", lora_r=16, lora_alpha=32, target_modules=LINEAR_TARGETS)
ADAPTER = {"r": 16, "lora_alpha": 32, "target_modules": list(reversed(LINEAR_TARGETS))}


@pytest.mark.parametrize(
    ("spec", "adapter", "reason"),
    [
        ({"base_model": "/models/base"}, ADAPTER, None),
        ({"base_model": "/models/other"}, ADAPTER, "trained on base '/models/other'"),
        ({"base_model": "/models/base"}, {**ADAPTER, "r": 8}, "its LoRA is r8 alpha32, the agent's r16 alpha32"),
        ({"base_model": "/models/base"}, {**ADAPTER, "target_modules": ["q_proj"]}, "its LoRA targets ['q_proj']"),
    ],
)
def test_only_a_version_of_the_same_base_and_lora_shape_is_continued(spec, adapter, reason) -> None:
    got = mismatch(spec, adapter, "/models/base", CFG)
    assert got == reason if reason is None else reason in got


def version(tmp_path: Path, spec: dict, adapter: dict | None = ADAPTER) -> Path:
    (tmp_path / "adapter").mkdir()
    if adapter is not None:
        (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    return tmp_path


def test_a_fitting_version_is_found_with_its_labels_and_head(tmp_path: Path) -> None:
    spec = {"base_model": "/models/base", "adapter_path": "adapter", "labels": ["a", "b"], "label_head": "h.st"}
    warm = find_warm_start(version(tmp_path, spec), "/models/base", CFG)
    assert warm is not None
    assert (warm.adapter_dir, warm.labels, warm.head) == (
        tmp_path / "adapter",
        ["a", "b"],
        tmp_path / "adapter" / "h.st",
    )


@pytest.mark.parametrize(
    ("spec", "adapter", "logged"),
    [
        ({"base_model": "/models/base", "adapter_path": None}, ADAPTER, "merged model"),
        ({"base_model": "/models/base", "adapter_path": "adapter"}, None, "adapter_config.json cannot be read"),
        ({"base_model": "/models/x", "adapter_path": "adapter"}, ADAPTER, "trained on base"),
    ],
)
def test_a_version_that_cannot_be_continued_trains_from_the_base_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, spec, adapter, logged
) -> None:
    with caplog.at_level("WARNING", logger="flywheel.trainer"):
        assert find_warm_start(version(tmp_path, spec, adapter), "/models/base", CFG) is None
    assert logged in caplog.text and "training from the base" in caplog.text
    assert find_warm_start(None, "/models/base", CFG) is None
    assert find_warm_start(tmp_path / "missing", "/models/base", CFG) is None


def test_the_head_keeps_the_rows_of_known_labels_and_new_ones_start_at_zero(tmp_path: Path) -> None:
    import torch

    from services.student_runtime.label_head import save_label_head
    from services.trainer.warm_start import WarmStart

    assert head_rows(["a", "b", "c"], ["c", "new", "a"]) == [2, None, 0]
    old_w, old_b = torch.arange(6.0).reshape(3, 2), torch.tensor([1.0, 2.0, 3.0])
    save_label_head(tmp_path / "h.st", old_w, old_b)
    warm = WarmStart(tmp_path, tmp_path, ["a", "b", "c"], tmp_path / "h.st")
    weight, bias = initial_head(warm, ["c", "new", "a"], 2)
    assert weight.tolist() == [[4.0, 5.0], [0.0, 0.0], [0.0, 1.0]] and bias.tolist() == [3.0, 0.0, 1.0]
    weight, bias = initial_head(warm, ["a"], 3)  # a head that does not fit: zero
    assert weight.abs().sum() == 0 and bias.abs().sum() == 0
    assert initial_head(None, ["a"], 2)[0].shape == (1, 2)
    # The tail decision (one row over the hidden state, not per label) is carried over whole.
    save_label_head(tmp_path / "t.st", old_w, old_b, torch.tensor([0.5, -0.5]), torch.tensor(0.25))
    warm = WarmStart(tmp_path, tmp_path, ["a", "b", "c"], tmp_path / "t.st")
    _, _, tail_weight, tail_bias = initial_head(warm, ["c", "new", "a"], 2)
    assert tail_weight.tolist() == [0.5, -0.5] and float(tail_bias) == 0.25
