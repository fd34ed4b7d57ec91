"""Exporting a student: the served version as a folder that runs anywhere ``transformers`` does
(``flywheel export AGENT [VERSION] --out DIR``).

The folder holds:

* ``model/``: the base weights with the LoRA adapter merged in, and the tokenizer (Hugging Face format);
* ``spec.json``: the version's spec (the answer template, the label constraint, the prompt rules, the weight
  format), pointing at ``model/``;
* ``flywheel_student/``: the student runtime the served version runs (the same decoder, copied), so answers are
  exactly Triton's;
* ``answer.py``: reads chat messages (JSON, one request per line) and prints each answer and its confidence;
* ``README.md``: what is in it and how to run it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from services.core.model_repository import SPEC_FILE, ModelRepository, student_model_name
from services.core.settings import REPO_ROOT
from services.student_runtime.generator import ADAPTER_CONFIG, adapter_dir_of
from services.student_runtime.label_head import head_path

if TYPE_CHECKING:
    from services.core.settings import Settings

RUNTIME = REPO_ROOT / "services" / "student_runtime"
THREADS = REPO_ROOT / "services" / "core" / "threads.py"
PACKAGE = "flywheel_student"

ANSWER_SCRIPT = '''"""Answer as the flywheel's served student does: one JSON list of chat messages per line on
stdin, one JSON answer per line on stdout.

    echo '[{"role": "user", "content": "My card has not arrived"}]' | python answer.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from flywheel_student import StudentGenerator, load_spec  # noqa: E402


def load() -> StudentGenerator:
    spec = load_spec(HERE)
    spec["base_model"] = str(HERE / "model")
    return StudentGenerator(spec, HERE)


def main() -> None:
    student = load()
    for line in sys.stdin:
        if line.strip():
            (answer,) = student.answer([line.strip()])
            print(json.dumps({"answer": answer.text, "confidence": answer.confidence, "error": answer.error}))


if __name__ == "__main__":
    main()
'''


class ExportError(RuntimeError):
    """A student that cannot be exported; the message names the agent, version and cause."""


def export_student(settings: Settings, agent_id: str, version: int | None, out: Path) -> tuple[int, Path]:
    """Write the version (default: the newest in the model repository) to `out`; returns (version, out)."""
    repo = ModelRepository.from_settings(settings)
    model = student_model_name(agent_id)
    versions = repo.versions(model)
    if not versions:
        raise ExportError(f"{agent_id}: no student version in {repo.root} (has it been trained and promoted?)")
    chosen = version if version is not None else versions[-1]
    if chosen not in versions:
        raise ExportError(f"{agent_id}: no version {chosen} of {model} (there are {versions})")
    source = repo.model_dir(model) / str(chosen)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    spec = json.loads((source / SPEC_FILE).read_text())
    _merge_weights(spec, source, out / "model")
    head = Path(spec["label_head"]).name if spec.get("label_head") else None  # copied into model/
    spec = {**spec, "base_model": "model", "adapter_path": None, "gguf_file": None, "label_head": head}
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    _copy_runtime(out / PACKAGE)
    (out / "answer.py").write_text(ANSWER_SCRIPT)
    (out / "README.md").write_text(_readme(agent_id, chosen, spec))
    return chosen, out


def _merge_weights(spec: dict, source: Path, dest: Path) -> None:
    """The base with the adapter merged in, at full precision (the weight format is applied at load, as served)."""
    from services.trainer.base_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(spec["base_model"]), spec.get("gguf_file"))
    adapter_dir = adapter_dir_of(spec, source)
    if adapter_dir is not None:
        from peft import PeftModel

        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ExportError(f"the version's adapter {adapter_dir} has no {ADAPTER_CONFIG}")
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    head = spec.get("label_head")
    if head:  # beside the weights it reads, where the runtime looks for it
        found = head_path(head, adapter_dir, Path(str(spec["base_model"])))
        if not found.is_file():
            raise ExportError(f"the version's label head {found} does not exist")
        shutil.copy2(found, dest / found.name)


def _copy_runtime(dest: Path) -> None:
    """The student runtime as a package of its own: its imports of the flywheel rewritten to the copy."""
    dest.mkdir(parents=True)
    for path in sorted(RUNTIME.glob("*.py")):
        (dest / path.name).write_text(_rewrite(path.read_text()))
    (dest / "threads.py").write_text(THREADS.read_text())


def _rewrite(text: str) -> str:
    text = re.sub(r"\bservices\.student_runtime\b", PACKAGE, text)
    return re.sub(r"\bservices\.core\.threads\b", f"{PACKAGE}.threads", text)


def _readme(agent_id: str, version: int, spec: dict) -> str:
    labels = spec.get("labels") or []
    return f"""# Student of `{agent_id}`, version {version} (exported from slm-flywheel)

* `model/`: the base model with the LoRA adapter merged in, and its tokenizer (Hugging Face format);
* `spec.json`: how it answers: the answer template, {len(labels)} labels it may choose from (constrained
  decoding), the prompt rules and the weight format (`{spec.get("weight_format") or "fp32"}`);
* `flywheel_student/`: the decoder the served version runs, so the answers are exactly those of the flywheel;
* `answer.py`: one JSON list of chat messages per line in, one answer (JSON) per line out.

```bash
pip install torch transformers
echo '[{{"role": "user", "content": "My card has not arrived"}}]' | python answer.py
```

Or from Python:

```python
import sys; sys.path.insert(0, "{{this folder}}")
from answer import load
student = load()
print(student.answer(['[{{"role": "user", "content": "My card has not arrived"}}]'])[0].text)
```

The model alone (`AutoModelForCausalLM.from_pretrained("model")`) also loads anywhere, but answers without the
label constraint and the answer template: use `answer.py` for the flywheel's answers.
"""
