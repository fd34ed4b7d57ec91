"""Triton on the local stack: the component, the student model, and publishing versions.

Uses the session's real ``tritonserver`` (the ``triton`` fixture) with a tiny offline Llama (tests/helpers).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from services.core.model_repository import (
    ModelRepository,
    PublishError,
    StudentModelSpec,
    ensure_echo_model,
    infer_text,
    render_config,
    student_model_name,
)
from services.core.settings import Settings
from services.stack.process import ProcessManager, StackError, free_port
from services.stack.triton import MALLOC_ENV, TritonServer
from services.student_runtime import StudentGenerator
from tests.helpers.tiny_model import build_tiny_lora_adapter, build_tiny_model

pytestmark = pytest.mark.integration

MESSAGES = json.dumps([{"role": "user", "content": "When will my new card arrive?"}])
LABELS = ("card_arrival", "lost_or_stolen_card", "balance")


# Fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lora_adapter(tiny_model, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture(scope="module")
def repo(triton: TritonServer, settings: Settings) -> ModelRepository:
    return ModelRepository.from_settings(settings, load_timeout_s=180.0)


@pytest.fixture(scope="module")
def grpc(triton: TritonServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(triton.endpoints()["triton_grpc"])


def grpc_infer(
    client: grpcclient.InferenceServerClient, model: str, prompts: list[str], version: str = ""
) -> tuple[list[str], list[float], str]:
    tensor = grpcclient.InferInput("PROMPT", [len(prompts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=np.object_))
    result = client.infer(model, [tensor], model_version=version, client_timeout=60)
    texts = [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]
    confidences = [float(c) for c in result.as_numpy("CONFIDENCE").reshape(-1)]
    return texts, confidences, result.get_response().model_version


def http_infer(url: str, model: str, prompts: list[str]) -> tuple[list[str], list[float]]:
    client = httpclient.InferenceServerClient(url, connection_timeout=60, network_timeout=60)
    tensor = httpclient.InferInput("PROMPT", [len(prompts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=np.object_))
    result = client.infer(model, [tensor])
    client.close()
    texts = [t.decode() for t in result.as_numpy("TEXT").reshape(-1)]
    return texts, [float(c) for c in result.as_numpy("CONFIDENCE").reshape(-1)]


class Hammer:
    """Sends gRPC requests in a loop from a thread; records served versions and every failure."""

    def __init__(self, url: str, model: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.model = model
        self.versions: list[str] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _, confidences, version = grpc_infer(self.client, self.model, [MESSAGES])
                assert 0.0 <= confidences[0] <= 1.0
                self.versions.append(version)
            except Exception as exc:  # every kind of failure counts
                self.failures.append(repr(exc))

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# The component without a server -----------------------------------------------------------------------------
def test_component_command_and_env(settings: Settings) -> None:
    comp = TritonServer.from_settings(settings)
    cmd = comp.command()
    assert "--model-control-mode=explicit" in cmd and "--disable-auto-complete-config" in cmd
    assert "--load-model=*" in cmd and f"--model-repository={settings.path('models')}" in cmd
    assert {p.setting for p in comp.ports} == {
        "FLYWHEEL_TRITON_HTTP_URL",
        "FLYWHEEL_TRITON_GRPC_URL",
        "FLYWHEEL_TRITON_METRICS_PORT",
    }
    env = comp.env()
    assert "nvidia_pytriton.libs" in env["LD_LIBRARY_PATH"]
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert all(env[k] == v for k, v in MALLOC_ENV.items())
    assert comp.endpoints() == {
        "triton_http": settings.triton_http_url,
        "triton_grpc": settings.triton_grpc_url,
    }


def test_prepare_names_the_missing_stub(tmp_path: Path) -> None:
    fake = tmp_path / "tritonserver"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "tritonserver").write_text("")
    (fake / "backends" / "python").mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (fake / "backends" / "python" / name).write_text("")
    comp = TritonServer(name="triton", server_dir=fake, repository=tmp_path / "models", work_dir=tmp_path / "t")
    with pytest.raises(StackError, match=r"triton_python_backend_stub does not exist.*nvidia-pytriton"):
        comp.prepare()
    missing = TritonServer(name="triton", server_dir=tmp_path / "nowhere")
    with pytest.raises(StackError, match=r"tritonserver binary .* does not exist.*nvidia-pytriton"):
        missing.prepare()


def test_student_model_names_are_triton_safe_and_distinct() -> None:
    assert student_model_name("support_desk") == "student_support_desk"
    a, b = student_model_name("support.desk"), student_model_name("support/desk")
    assert a != b and a.startswith("student_support_desk_")
    assert all(ch.isalnum() or ch in "_-" for ch in a + b)
    with pytest.raises(ValueError):
        student_model_name(" ")


def test_configs_render_with_latest_version_policy() -> None:
    config = render_config("student", StudentModelSpec(base_model="x").config_values())
    assert "max_batch_size: 16" in config and "latest: { num_versions: 1 }" in config
    assert "$" not in config


def test_publishing_without_triton_fails_before_writing_anything(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "models", f"127.0.0.1:{free_port()}")
    with pytest.raises(PublishError, match=r"echo version 1: Triton at .* is not reachable"):
        repo.publish_echo()
    assert not (tmp_path / "models" / "echo").exists() and repo.next_version("echo") == 1


# Serving ----------------------------------------------------------------------------------------------------
def test_echo_over_grpc_and_http(repo: ModelRepository, grpc, triton: TritonServer, settings: Settings) -> None:
    published = repo.publish_echo()
    assert published.probe_text == "ping" and published.probe_confidence == 1.0
    texts, confidences, _ = grpc_infer(grpc, "echo", ["a", "b c", "ü"])
    assert texts == ["a", "b c", "ü"] and confidences == [1.0, 1.0, 1.0]
    texts, confidences = http_infer(triton.endpoints()["triton_http"], "echo", ["hello"])
    assert texts == ["hello"] and confidences == [1.0]
    # The smoke test's helpers: an echo model that already serves is not published again (another test may
    # have published earlier versions on this session's server).
    before = repo.versions("echo")
    assert before[-1] == published.version
    assert ensure_echo_model(settings) == "echo" and repo.versions("echo") == before
    assert infer_text(settings, "echo", "smoke") == ("smoke", 1.0)


def test_student_answers_over_grpc_and_http(
    repo: ModelRepository, grpc, triton: TritonServer, tiny_model: Path
) -> None:
    spec = StudentModelSpec(base_model=str(tiny_model), max_new_tokens=12)
    published = repo.publish_student("support-desk", spec)
    assert published.model == "student_support-desk"
    assert published.version == 1 and (published.path / "spec.json").is_file()
    assert 0.0 <= published.probe_confidence <= 1.0

    raw_prompt = "card balance"  # not JSON: taken as an already-formatted prompt
    texts, confidences, version = grpc_infer(grpc, published.model, [MESSAGES, raw_prompt])
    assert version == "1" and len(texts) == 2 and all(0.0 <= c <= 1.0 for c in confidences)
    # Greedy decoding is deterministic: HTTP serves the same answers, and so does the serving code run locally.
    http_texts, http_confidences = http_infer(
        triton.endpoints()["triton_http"], published.model, [MESSAGES, raw_prompt]
    )
    assert http_texts == texts and http_confidences == pytest.approx(confidences, abs=1e-5)
    local = StudentGenerator(json.loads((published.path / "spec.json").read_text()))
    local_answers = local.generate([MESSAGES, raw_prompt])
    assert [a[0] for a in local_answers] == texts
    assert [a[1] for a in local_answers] == pytest.approx(confidences, abs=1e-5)

    # Concurrent single requests are batched by Triton's dynamic batcher and all answered.
    with_threads: list[tuple[list[str], list[float], str]] = []
    threads = [
        threading.Thread(target=lambda: with_threads.append(grpc_infer(grpc, published.model, [MESSAGES])))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(with_threads) == 6


def test_constrained_labels_answer_a_valid_label(repo: ModelRepository, grpc, tiny_model: Path) -> None:
    spec = StudentModelSpec(base_model=str(tiny_model), max_new_tokens=12, labels=LABELS)
    published = repo.publish_student("classifier", spec)
    texts, confidences, _ = grpc_infer(grpc, published.model, [MESSAGES, "anything at all"])
    assert all(text in LABELS for text in texts), texts
    assert all(0.0 < c <= 1.0 for c in confidences)


def test_publishing_a_version_under_load_fails_no_request(
    repo: ModelRepository, grpc, triton: TritonServer, tiny_model: Path, tiny_adapter: Path
) -> None:
    model = student_model_name("support-desk")
    before = repo.versions(model)[-1]
    base_answer = grpc_infer(grpc, model, [MESSAGES])[:2]
    spec = StudentModelSpec(base_model=str(tiny_model), adapter_path=str(tiny_adapter), max_new_tokens=12)
    with Hammer(triton.endpoints()["triton_grpc"], model) as hammer:
        wait_for(lambda: len(hammer.versions) >= 5)
        published = repo.publish_student("support-desk", spec)
        wait_for(lambda: hammer.versions[-1] == str(published.version))
        settled = len(hammer.versions)
        wait_for(lambda: len(hammer.versions) >= settled + 5)
    assert hammer.failures == []
    assert published.version == before + 1
    assert {str(before), str(published.version)} <= set(hammer.versions)
    assert repo.served_versions(model) == [published.version]
    # The adapter was copied into the version and is what answers now.
    assert (published.path / "adapter" / "adapter_config.json").is_file()
    adapter_answer = grpc_infer(grpc, model, [MESSAGES])[:2]
    assert adapter_answer != base_answer


def test_a_broken_version_leaves_the_previous_one_serving(
    repo: ModelRepository, grpc, triton: TritonServer, tiny_model: Path
) -> None:
    model = student_model_name("support-desk")
    serving = repo.served_versions(model)[-1]
    expected = grpc_infer(grpc, model, [MESSAGES])[:2]
    broken = StudentModelSpec(base_model=str(tiny_model.parent / "no-such-model"), max_new_tokens=12)
    with Hammer(triton.endpoints()["triton_grpc"], model) as hammer:
        wait_for(lambda: len(hammer.versions) >= 3)
        with pytest.raises(PublishError) as caught:
            repo.publish_student("support-desk", broken)
        settled = len(hammer.versions)
        wait_for(lambda: len(hammer.versions) >= settled + 3)
    message = str(caught.value)
    assert caught.value.model == model and caught.value.version == serving + 1
    assert f"{model} version {serving + 1}" in message and "no-such-model" in message
    assert f"version {serving} keeps serving" in message and "does not exist" in message
    assert hammer.failures == [] and set(hammer.versions) == {str(serving)}
    assert repo.served_versions(model) == [serving]
    assert grpc_infer(grpc, model, [MESSAGES])[:2] == expected
    # The broken folder left the repository (a restart never loads it) and its number is never reused.
    assert repo.versions(model)[-1] == serving
    assert any(p.name.startswith(f"{serving + 1}.") for p in repo.quarantined(model))
    assert repo.next_version(model) == serving + 2


def test_a_version_whose_weight_format_cannot_load_is_not_served(repo: ModelRepository, grpc, tiny_model: Path) -> None:
    model = student_model_name("support-desk")
    serving = repo.served_versions(model)[-1]
    expected = grpc_infer(grpc, model, [MESSAGES])[:2]
    with pytest.raises(PublishError, match="unknown weight format 'int4'"):
        repo.publish_student("support-desk", StudentModelSpec(base_model=str(tiny_model), weight_format="int4"))
    assert repo.served_versions(model) == [serving]
    assert grpc_infer(grpc, model, [MESSAGES])[:2] == expected


def test_token_counts_and_bad_requests_in_a_batch(repo: ModelRepository, triton: TritonServer, tiny_model: Path
                                                  ) -> None:  # fmt: skip
    url = triton.endpoints()["triton_grpc"]
    published = repo.publish_student(
        "counter", StudentModelSpec(base_model=str(tiny_model), max_new_tokens=6, weight_format="bf16")
    )
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("TEXT", "INPUT_TOKENS", "OUTPUT_TOKENS", "FORWARD_PASSES")]
    bad_role = json.dumps([{"role": "robot", "content": "hi"}])
    results: dict[str, object] = {}

    def ask(name: str, prompt: bytes) -> None:
        tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[prompt]], dtype=np.object_))
        try:
            client = grpcclient.InferenceServerClient(url)
            results[name] = client.infer(published.model, [tensor], outputs=outputs, client_timeout=60)
        except Exception as exc:  # the error is the result
            results[name] = exc

    cases = {
        "good": MESSAGES.encode(),
        "empty": b"",
        "role": bad_role.encode(),
        "binary": b"\xff\xfe",
        "good2": MESSAGES.encode(),
    }
    # Sent together, so Triton's dynamic batcher puts them in one batch: the bad ones fail, the good answered.
    threads = [threading.Thread(target=ask, args=item) for item in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for name in ("good", "good2"):
        result = results[name]
        assert not isinstance(result, Exception), result
        assert int(result.as_numpy("INPUT_TOKENS")[0][0]) > 5  # type: ignore[union-attr]
        assert 1 <= int(result.as_numpy("OUTPUT_TOKENS")[0][0]) <= 6  # type: ignore[union-attr]
        assert int(result.as_numpy("FORWARD_PASSES")[0][0]) >= 1  # type: ignore[union-attr]
    assert "PROMPT is empty" in str(results["empty"])
    assert "unknown chat role 'robot'" in str(results["role"])
    assert "not UTF-8" in str(results["binary"])


def test_a_version_that_loads_but_cannot_answer_is_rolled_back(repo: ModelRepository, grpc, tmp_path: Path) -> None:
    # A model that loads fine but fails every request: only the probe can catch it, after Triton already
    # swapped to it; the publish must swap back.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text(
        render_config(
            "echo",
            {
                "max_batch_size": 8,
                "max_queue_delay_us": 0,
                "instance_count": 1,
            },
        )
    )
    (tmp_path / "broken" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def execute(self, requests):\n"
        "        raise RuntimeError('this version cannot answer')\n"
    )
    before = repo.versions("echo")[-1]
    custom = ModelRepository(repo.root, repo.grpc_url, templates_dir=tmp_path)

    def render(dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "model.py").write_text((tmp_path / "broken" / "model.py").read_text())

    with pytest.raises(PublishError, match=r"echo version \d+: the probe inference failed.*cannot answer"):
        custom.publish("echo", "broken", render, {}, "ping", "ping")
    assert repo.served_versions("echo") == [before]
    assert grpc_infer(grpc, "echo", ["still here"])[0] == ["still here"]


def test_a_broken_first_version_serves_nothing_and_leaves_no_folder(repo: ModelRepository) -> None:
    spec = StudentModelSpec(base_model="/nonexistent/base-model", max_new_tokens=4)
    with pytest.raises(PublishError, match=r"student_never-works version 1: Triton failed to load it"):
        repo.publish_student("never-works", spec)
    assert not repo.model_dir("student_never-works").exists()
    assert repo.next_version("student_never-works") == 2


def test_a_restarted_server_serves_what_was_published(
    repo: ModelRepository, settings: Settings, tmp_path: Path
) -> None:
    # A second server over the same repository stands in for a restart of the stack (the session's server
    # keeps serving the other tests).
    other = Settings(
        home=tmp_path / "home",
        model_repository=settings.path("models"),
        triton_http_url=f"127.0.0.1:{free_port()}",
        triton_grpc_url=f"127.0.0.1:{free_port()}",
        triton_metrics_port=free_port(),
    )
    manager = ProcessManager(other.run_dir, other.log_dir)
    server = TritonServer.from_settings(other)
    manager.start(server, 180)
    try:
        restarted = ModelRepository.from_settings(other)
        for model in ("echo", student_model_name("support-desk"), student_model_name("classifier")):
            assert restarted.served_versions(model) == [repo.versions(model)[-1]], model
        assert restarted.probe("echo", None, "again") == ("again", 1.0)
    finally:
        manager.stop(server.name)
