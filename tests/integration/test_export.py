"""`flywheel export`: a served student (with its LoRA adapter and label constraint) exported to a folder answers
20 prompts exactly as Triton does, run with nothing but the folder's own script."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from services.core.model_repository import ModelRepository, StudentModelSpec, infer_text, student_model_name
from services.core.settings import Settings
from services.export import ExportError, export_student
from services.student_runtime.label_head import HEAD_FILE, save_label_head
from services.trainer import data as D
from tests.helpers.tiny_model import (
    TINY_LABELS,
    TINY_SYSTEM,
    TINY_TRAINING,
    build_tiny_lora_adapter,
    build_trained_tiny_student,
    tiny_target,
)

pytestmark = pytest.mark.integration

AGENT = f"exported-{uuid.uuid4().hex[:6]}"
UNSEEN = ["card arrive refund", "balance of 7 euros", "what?", "stolen top up", "refund 30 pounds now please"]


def test_an_exported_student_answers_as_triton_does(triton, settings: Settings, tmp_path: Path) -> None:
    base = build_trained_tiny_student(tmp_path / "base")
    adapter = build_tiny_lora_adapter(base, tmp_path / "adapter")
    # A label head beside the adapter (random rows: the export must carry it and answer with it).
    torch.manual_seed(5)
    save_label_head(adapter / HEAD_FILE, torch.randn(len(TINY_LABELS), 64), torch.randn(len(TINY_LABELS)))
    tails, default = D.label_tails([tiny_target(label, args) for _, label, args in TINY_TRAINING])
    spec = StudentModelSpec(
        base_model=str(base),
        adapter_path=str(adapter),
        max_new_tokens=40,
        labels=tuple(TINY_LABELS),
        label_prefix='{"intent": "',
        label_suffix='"',
        system_prompt=TINY_SYSTEM,
        label_tails=tails,
        default_tail=default,
        max_prompt_tokens=60,
        label_head=HEAD_FILE,
    )
    repo = ModelRepository.from_settings(settings)
    published = repo.publish_student(AGENT, spec)

    version, out = export_student(settings, AGENT, None, tmp_path / "export")
    assert version == published.version
    assert {"answer.py", "README.md", "spec.json", "model", "flywheel_student"} <= {p.name for p in out.iterdir()}
    assert (out / "model" / HEAD_FILE).is_file()
    texts = ([t for t, _, _ in TINY_TRAINING] + UNSEEN) * 2
    prompts = [json.dumps([{"role": "user", "content": t}]) for t in texts][:20]
    # The export runs on its own: a fresh interpreter in another directory, importing only the folder's code.
    ran = subprocess.run(
        [sys.executable, str(out / "answer.py")],
        input="\n".join(prompts) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    exported = [json.loads(line) for line in ran.stdout.splitlines()]
    assert len(exported) == 20
    for prompt, got in zip(prompts, exported, strict=True):
        text, confidence = infer_text(settings, student_model_name(AGENT), prompt)
        assert got["answer"] == text, prompt
        assert abs(got["confidence"] - confidence) < 1e-4, prompt

    with pytest.raises(ExportError, match="not empty"):
        export_student(settings, AGENT, None, out)
    with pytest.raises(ExportError, match="no version 99"):
        export_student(settings, AGENT, 99, tmp_path / "other")
