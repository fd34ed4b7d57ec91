"""The one place that publishes models to Triton.

A Triton model repository holds ``<repo>/<model>/config.pbtxt`` and one folder per integer version,
``<repo>/<model>/<version>/`` (``model.py`` from the template in ``infra/triton/<kind>/`` plus its files; for
a student a ``spec.json`` naming the base model and an ``adapter/`` copy of the LoRA adapter).

Publishing a version:

1. the version number is the next integer after every version this repository ever had (the live folders,
   the quarantined ones and a ledger), so a number is never reused or overwritten;
2. the folder is rendered in a staging directory *beside* the repository (same filesystem, not scanned by
   Triton) and moved into place with one atomic ``os.rename``, so Triton never sees a half-written version;
3. Triton loads it through the explicit model-control API over gRPC (an HTTP load stalls concurrent HTTP
   inference for seconds). With ``version_policy: latest {num_versions: 1}`` Triton keeps the previous version
   serving until the new one is ready, then swaps: no request fails during a publish;
4. a probe inference addressed to the new version checks that it answers;
5. if the load or the probe fails, the version folder is moved to a quarantine beside the repository (a
   restart then never loads it), the model is reloaded so the previous version keeps serving, and
   ``PublishError`` names the model, the version and Triton's error.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from services.core.settings import Settings

log = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "infra" / "triton"
SPEC_FILE = "spec.json"
ADAPTER_DIR = "adapter"
DEFAULT_PROBE = json.dumps([{"role": "user", "content": "Hello, I need help with my card."}])
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class PublishError(RuntimeError):
    """A version could not be published; the message names the model, the version and the cause."""

    def __init__(self, model: str, version: int, message: str) -> None:
        super().__init__(f"{model} version {version}: {message}")
        self.model = model
        self.version = version


def student_model_name(agent_id: str) -> str:
    """``student_<agent_id>`` made Triton- and filesystem-safe ([A-Za-z0-9_-]).

    When sanitising changed the id, a short hash of the original is appended so two agents whose ids differ
    only in unsafe characters ("a.b" and "a/b") never share a model.
    """
    if not agent_id or not agent_id.strip():
        raise ValueError("agent_id must not be empty")
    safe = _SAFE.sub("_", agent_id.strip())[:80]
    if safe != agent_id:
        safe += "_" + hashlib.sha256(agent_id.encode()).hexdigest()[:8]
    return f"student_{safe}"


@dataclass(frozen=True)
class StudentModelSpec:
    """What a student version serves; written to ``<version>/spec.json`` and read by the Triton model."""

    base_model: str  # Hugging Face id or local directory
    adapter_path: str | None = None  # PEFT LoRA adapter directory; copied into the version folder
    gguf_file: str | None = None  # a GGUF file inside base_model (transformers dequantises it)
    max_new_tokens: int = 64
    labels: tuple[str, ...] = ()  # valid labels decoding is constrained to (empty: free decoding)
    label_prefix: str = ""  # text after which a label is expected ("" = the answer starts with it)
    label_suffix: str = ""  # text that closes a label ("" = the label ends the answer)
    system_prompt: str | None = None  # prepended to chat messages that carry no system message
    # Answer fields fixed per label, put back after generation (``expand_answer`` in the student runtime).
    answer_template: Mapping[str, Any] = field(default_factory=dict)
    # The usual text after each label (and overall), verified as a draft instead of generated token by token.
    label_tails: Mapping[str, str] = field(default_factory=dict)
    default_tail: str = ""
    # The most common texts after the label in training: drafts for answers that leave their label's usual tail.
    tail_corpus: tuple[str, ...] = ()
    max_prompt_tokens: int | None = None  # training's prompt limit: longer prompts are cut as in training
    dtype: str = "float32"  # the weights as loaded; ``weight_format`` converts the linear layers after
    weight_format: str = "fp32"  # fp32 / bf16 / int8 (services/student_runtime/weights.py), chosen by the trainer
    # A label head file beside the adapter (or in the merged model's folder): one decision picks the label.
    label_head: str | None = None
    # Whether the head's tail decision (where the file has one) ends answers without arguments after one pass.
    tail_decision: bool = True
    num_threads: int | None = None  # torch threads in the Triton stub; default: every core
    warmup: bool = True  # answer once while loading, so a version that cannot answer fails its load
    # Triton scheduling (config.pbtxt, shared by every version of the model).
    max_batch_size: int = 16  # requests per execute, and rows decoded together (student_runtime/scheduler.py)
    # The model's scheduler adds a request to the running passes at once: waiting for company only delays it.
    max_queue_delay_us: int = 0
    instance_count: int = 1
    metadata: Mapping[str, Any] = field(default_factory=dict)  # lineage: dataset, run, metrics...

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("StudentModelSpec.base_model must name a model")
        if self.max_new_tokens < 1 or self.max_batch_size < 1 or self.instance_count < 1:
            raise ValueError("max_new_tokens, max_batch_size and instance_count must be >= 1")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "tail_corpus", tuple(self.tail_corpus))

    def config_values(self) -> dict[str, int]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "instance_count": self.instance_count,
        }

    def spec_json(self, adapter_path: str | None) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["metadata"] = dict(self.metadata)
        data["answer_template"] = dict(self.answer_template)
        data["label_tails"] = dict(self.label_tails)
        data["tail_corpus"] = list(self.tail_corpus)
        base = Path(self.base_model).expanduser()
        # A local base model is recorded absolute: the Triton stub runs in another working directory.
        data["base_model"] = str(base.absolute()) if base.exists() else self.base_model
        data["adapter_path"] = adapter_path
        for key in ("max_batch_size", "max_queue_delay_us", "instance_count"):
            data.pop(key)
        return data


@dataclass(frozen=True)
class PublishedVersion:
    model: str
    version: int
    path: Path
    probe_text: str
    probe_confidence: float
    seconds: float  # render + load + probe


def render_config(kind: str, values: Mapping[str, Any], templates_dir: Path = TEMPLATES_DIR) -> str:
    template = templates_dir / kind / "config.pbtxt"
    return string.Template(template.read_text()).substitute({k: str(v) for k, v in values.items()})


def render_student_version(
    dest: Path, spec: StudentModelSpec, templates_dir: Path = TEMPLATES_DIR, copy_adapter: bool = True
) -> None:
    """Write a student version folder: ``model.py``, ``spec.json`` and (by default) ``adapter/``.

    The adapter is copied (a LoRA adapter is a few MB) so a version stays servable whatever happens to the
    artifact it came from; the base model is only pointed at (hundreds of MB, shared by every version).
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(templates_dir / "student" / "model.py", dest / "model.py")
    adapter: str | None = None
    if spec.adapter_path:
        source = Path(spec.adapter_path).expanduser().absolute()
        if copy_adapter and source.is_dir():
            shutil.copytree(source, dest / ADAPTER_DIR)
            adapter = ADAPTER_DIR
        else:  # a missing adapter is left for the load to report, with Triton's error
            adapter = str(source)
    data = spec.spec_json(adapter)
    data["published_at"] = datetime.now(timezone.utc).isoformat()
    (dest / SPEC_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def render_echo_version(dest: Path, templates_dir: Path = TEMPLATES_DIR) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(templates_dir / "echo" / "model.py", dest / "model.py")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ModelRepository:
    """Publishes versions into a Triton model repository and loads them over gRPC."""

    def __init__(
        self,
        root: Path,
        grpc_url: str,
        templates_dir: Path = TEMPLATES_DIR,
        load_timeout_s: float = 600.0,
        probe_timeout_s: float = 120.0,
    ) -> None:
        self.root = Path(root).absolute()
        self.grpc_url = grpc_url.split(",")[0].strip()
        self.templates_dir = templates_dir
        self.load_timeout_s = load_timeout_s
        self.probe_timeout_s = probe_timeout_s
        # Beside the repository: same filesystem (os.rename stays atomic) and never scanned by Triton.
        self.work_root = self.root.parent / f"{self.root.name}.publish"
        self._client: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ModelRepository:
        return cls(settings.path("models"), settings.triton_grpc_url, **kwargs)

    # Layout -------------------------------------------------------------------------------------------------
    @property
    def staging_root(self) -> Path:
        return self.work_root / "staging"

    @property
    def quarantine_root(self) -> Path:
        return self.work_root / "quarantine"

    def model_dir(self, model: str) -> Path:
        if not model or _SAFE.search(model):
            raise ValueError(f"model name {model!r} is not Triton-safe ([A-Za-z0-9_-])")
        return self.root / model

    @staticmethod
    def _numbered(directory: Path) -> list[int]:
        if not directory.is_dir():
            return []
        return sorted(int(p.name.split(".")[0]) for p in directory.iterdir() if p.name.split(".")[0].isdigit())

    def versions(self, model: str) -> list[int]:
        """Version folders currently in the repository, ascending."""
        directory = self.model_dir(model)
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())

    def newest_version_dir(self, model: str) -> Path | None:
        """The newest version folder (what Triton serves: ``version_policy: latest``), None when there is none."""
        versions = self.versions(model)
        return self.model_dir(model) / str(versions[-1]) if versions else None

    def quarantined(self, model: str) -> list[Path]:
        directory = self.quarantine_root / model
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def _ledger(self, model: str) -> Path:
        return self.work_root / "ledger" / f"{model}.last_version"

    def next_version(self, model: str) -> int:
        """One more than any version this model ever had: live, quarantined or recorded in the ledger."""
        highest = max([0, *self.versions(model), *self._numbered(self.quarantine_root / model)])
        ledger = self._ledger(model)
        if ledger.is_file():
            with contextlib.suppress(ValueError):
                highest = max(highest, int(ledger.read_text().strip() or 0))
        return highest + 1

    @contextlib.contextmanager
    def _lock(self, model: str) -> Iterator[None]:
        # One publisher per model at a time, across processes (two trainers, or a trainer and the CLI).
        path = self.work_root / "locks" / f"{model}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # Triton -------------------------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            import tritonclient.grpc as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._client

    def load(self, model: str) -> None:
        """(Re)load a model from the repository: Triton picks up new versions and drops removed ones."""
        self.client.load_model(model, client_timeout=self.load_timeout_s)

    def unload(self, model: str) -> None:
        self.client.unload_model(model)

    def served_versions(self, model: str) -> list[int]:
        """Versions of ``model`` Triton reports READY."""
        index = self.client.get_model_repository_index(as_json=True)
        return sorted(
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == model and m.get("state") == "READY" and str(m.get("version", "")).isdigit()
        )

    def probe(self, model: str, version: int | None, prompt: str = DEFAULT_PROBE) -> tuple[str, float]:
        """One inference (to ``version`` when given): (TEXT, CONFIDENCE), or ValueError if malformed."""
        import tritonclient.grpc as grpcclient

        tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[prompt.encode("utf-8")]], dtype=np.object_))
        result = self.client.infer(
            model,
            [tensor],
            model_version="" if version is None else str(version),
            outputs=[grpcclient.InferRequestedOutput("TEXT"), grpcclient.InferRequestedOutput("CONFIDENCE")],
            client_timeout=self.probe_timeout_s,
        )
        text_out, conf_out = result.as_numpy("TEXT"), result.as_numpy("CONFIDENCE")
        if text_out is None or conf_out is None or text_out.size != 1 or conf_out.size != 1:
            raise ValueError("the answer lacks a TEXT and a CONFIDENCE of one element each")
        raw = text_out.reshape(-1)[0]
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        confidence = float(conf_out.reshape(-1)[0])
        if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
            raise ValueError(f"CONFIDENCE {confidence} is not in [0, 1]")
        return text, confidence

    # Publishing ---------------------------------------------------------------------------------------------
    def publish_student(
        self,
        agent_id: str,
        spec: StudentModelSpec,
        probe_prompt: str = DEFAULT_PROBE,
        copy_adapter: bool = True,
    ) -> PublishedVersion:
        """Publish ``spec`` as the next version of ``student_<agent_id>``; raises PublishError on failure."""
        return self.publish(
            student_model_name(agent_id),
            "student",
            lambda dest: render_student_version(dest, spec, self.templates_dir, copy_adapter),
            spec.config_values(),
            probe_prompt,
        )

    def publish_echo(self, model: str = "echo", max_batch_size: int = 8) -> PublishedVersion:
        """Publish the echo model (serving-plumbing tests and latency benchmarks)."""
        values = {"max_batch_size": max_batch_size, "max_queue_delay_us": 0, "instance_count": 1}
        return self.publish(
            model, "echo", lambda dest: render_echo_version(dest, self.templates_dir), values, "ping", "ping"
        )

    def publish(
        self,
        model: str,
        kind: str,
        render: Callable[[Path], None],
        config_values: Mapping[str, Any],
        probe_prompt: str = DEFAULT_PROBE,
        expect_text: str | None = None,
    ) -> PublishedVersion:
        """Render, atomically place, load and probe the next version of ``model`` (template ``kind``).

        ``render(dest)`` fills the version folder; ``config_values`` fill the placeholders of
        ``infra/triton/<kind>/config.pbtxt``; the probe must answer ``expect_text`` when given.
        """
        started = time.monotonic()
        model_dir = self.model_dir(model)
        # Fail before spending a version number when Triton is not there at all: an unverified version must
        # not sit in the repository for the next start to load.
        try:
            reachable = bool(self.client.is_server_ready(client_timeout=10))
            problem = "is not ready"
        except Exception as exc:
            reachable, problem = False, f"is not reachable: {_triton_msg(exc)}"
        if not reachable:
            raise PublishError(model, self.next_version(model), f"Triton at {self.grpc_url} {problem}")
        with self._lock(model):
            version = self.next_version(model)
            ledger = self._ledger(model)
            ledger.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(ledger, f"{version}\n")  # the number is spent even if everything below fails

            # Under the lock no other publisher of this model runs: any staging folder of it is a crash's leftover.
            if self.staging_root.is_dir():
                for leftover in self.staging_root.iterdir():
                    if re.fullmatch(rf"{re.escape(model)}-\d+-\d+", leftover.name):
                        shutil.rmtree(leftover, ignore_errors=True)
            stage = self.staging_root / f"{model}-{version}-{os.getpid()}"
            stage.mkdir(parents=True)
            try:
                render(stage)
            except Exception as exc:
                shutil.rmtree(stage, ignore_errors=True)
                raise PublishError(model, version, f"rendering the version folder failed: {exc}") from exc

            config_path = model_dir / "config.pbtxt"
            previous_config = config_path.read_text() if config_path.is_file() else None
            model_dir.mkdir(parents=True, exist_ok=True)
            config = render_config(kind, config_values, self.templates_dir)
            if config != previous_config:
                _atomic_write(config_path, config)
            target = model_dir / str(version)
            try:
                os.rename(stage, target)  # atomic; fails rather than overwrite an existing version
            except OSError as exc:
                shutil.rmtree(stage, ignore_errors=True)
                self._restore_config(config_path, previous_config)
                raise PublishError(model, version, f"cannot move {stage} to {target}: {exc}") from exc
            log.info("publishing %s version %s from %s", model, version, target)

            try:
                self.load(model)
            except Exception as exc:
                self._rollback(model, version, previous_config, f"Triton failed to load it: {_triton_msg(exc)}")
            try:
                ready = self.served_versions(model)
                if version not in ready:
                    raise ValueError(f"Triton reports ready versions {ready}, not {version}")
                text, confidence = self.probe(model, version, probe_prompt)
                if expect_text is not None and text != expect_text:
                    raise ValueError(f"answered {text!r} to {probe_prompt!r}, expected {expect_text!r}")
            except Exception as exc:
                self._rollback(model, version, previous_config, f"the probe inference failed: {_triton_msg(exc)}")
            seconds = time.monotonic() - started
            log.info("%s version %s serving (%.1fs), probe confidence %.3f", model, version, seconds, confidence)
            return PublishedVersion(model, version, target, text, confidence, seconds)

    def _restore_config(self, config_path: Path, previous: str | None) -> None:
        if previous is None:
            config_path.unlink(missing_ok=True)
        elif not config_path.is_file() or config_path.read_text() != previous:
            _atomic_write(config_path, previous)

    def _rollback(self, model: str, version: int, previous_config: str | None, reason: str) -> NoReturn:
        """Quarantine a failed version, put the previous one back in service, raise PublishError."""
        model_dir = self.model_dir(model)
        source = model_dir / str(version)
        quarantine = self.quarantine_root / model / f"{version}.{int(time.time())}"
        quarantine.parent.mkdir(parents=True, exist_ok=True)
        os.rename(source, quarantine)
        (quarantine / "QUARANTINED.txt").write_text(reason + "\n")
        self._restore_config(model_dir / "config.pbtxt", previous_config)
        remaining = self.versions(model)
        if remaining:
            try:
                served = self.served_versions(model)
            except Exception:
                served = []
            if served == [remaining[-1]]:
                # A failed load leaves the previous version serving untouched: reloading it would only start
                # another copy of it (seconds of CPU taken from serving) for the same result.
                after = f"version {remaining[-1]} keeps serving"
            else:
                # Triton already swapped to the broken version (it loaded but failed the probe): loading the
                # model again makes it serve the newest version left in the repository, the previous one.
                try:
                    self.load(model)
                    after = f"version {remaining[-1]} keeps serving"
                except Exception as exc:
                    after = f"reloading version {remaining[-1]} also failed: {_triton_msg(exc)}"
        else:
            with contextlib.suppress(Exception):
                self.unload(model)
            # A model folder without versions would fail every restart's load: remove what is left of it.
            shutil.rmtree(model_dir, ignore_errors=True)
            after = "no earlier version exists, so the model is not served"
        log.error("%s version %s rejected: %s; quarantined at %s; %s", model, version, reason, quarantine, after)
        raise PublishError(model, version, f"{reason}; quarantined at {quarantine}; {after}")


def _triton_msg(exc: BaseException) -> str:
    """Triton's own message (tritonclient's exceptions carry it in .message())."""
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


# Conveniences for the stack's smoke test and the CLI ------------------------------------------------------------
def ensure_echo_model(settings: Settings, name: str = "echo") -> str:
    """Make sure the echo model serves (publishing its first version only when none exists); return its name."""
    repo = ModelRepository.from_settings(settings)
    if repo.served_versions(name):
        return name
    if repo.versions(name):  # published before but not loaded (e.g. it failed at the last start): retry
        with contextlib.suppress(Exception):
            repo.load(name)
        if repo.served_versions(name):
            return name
    repo.publish_echo(name)
    return name


def infer_text(settings: Settings, model: str, prompt: str, version: int | None = None) -> tuple[str, float]:
    """One PROMPT -> (TEXT, CONFIDENCE) inference over gRPC (the newest ready version unless ``version``)."""
    return ModelRepository.from_settings(settings).probe(model, version, prompt)
