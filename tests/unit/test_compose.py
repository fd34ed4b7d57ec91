"""docker-compose.yml, checked without Docker: every service runs a real module, every FLYWHEEL_* variable is a
setting, every volume exists, and the paths the trainer publishes to are the ones Triton serves from."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core.model_repository import (
    ModelRepository,
    StudentModelSpec,
    render_student_version,
    student_model_name,
)
from services.core.settings import REPO_ROOT, Settings

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DEPLOYMENT_FILES = {"./gateway-keys.yaml"}  # secrets the deployment writes beside the compose file, never committed
FLYWHEEL = ("router", "logger", "gateway", "curator", "trainer", "drift-monitor")


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume or a host path) of a service's volumes."""
    out = {}
    for item in service.get("volumes", []):
        source, target = item.split(":")[:2]
        out[target] = source
    return out


def _env(name: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[name].get("environment") or {}).items()}


def _resolve(value: str) -> str:
    """A compose value with ${VAR:-default} / ${VAR:?message} as a deployment without an .env would see it."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "secret", value))


def test_the_five_services_run_real_modules() -> None:
    for name in (*FLYWHEEL, "init"):
        service = SERVICES[name]
        module = service["command"][0]
        assert service["image"] == "slm-flywheel:latest", name
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{name}: no module {module}"
        runnable = spec.submodule_search_locations is None or importlib.util.find_spec(f"{module}.__main__")
        assert runnable, f"{name}: {module} has no __main__"


def test_every_flywheel_variable_is_a_setting_and_loads() -> None:
    for name in (*FLYWHEEL, "init"):
        env = _env(name)
        fields = {key[len("FLYWHEEL_") :].lower(): _resolve(value) for key, value in env.items()}
        unknown = sorted(set(fields) - set(Settings.model_fields))
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = Settings(**{k: v for k, v in fields.items() if v != ""})
        assert settings.kafka_replication_factor == 3 and settings.kafka_min_insync_replicas == 2
        assert settings.kafka_idempotent_producer


def test_volumes_exist_and_paths_match_the_settings() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for source in _mounts(service).values():
            assert source.startswith("./") or source in declared, f"{name}: volume {source} is not declared"
            if source.startswith("./") and source not in DEPLOYMENT_FILES:
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist in the checkout"
    env = _env("trainer")
    models, artifacts = env["FLYWHEEL_MODEL_REPOSITORY"], env["FLYWHEEL_ARTIFACTS_DIR"]
    trainer, triton, curator = (_mounts(SERVICES[n]) for n in ("trainer", "triton", "curator"))
    # The trainer writes the model repository and the base models; Triton reads both at the same paths.
    assert trainer[models] == triton[models] == "models"
    assert trainer[artifacts] == triton[artifacts] == curator[artifacts] == "artifacts"
    assert f"--model-repository={models}" in SERVICES["triton"]["command"]
    for name in FLYWHEEL:
        agents_file = _env(name)["FLYWHEEL_AGENTS_FILE"]
        assert _mounts(SERVICES[name]).get(agents_file) == "./agents.yaml", name


def test_nothing_is_installed_when_a_container_starts() -> None:
    for name, service in SERVICES.items():
        text = yaml.safe_dump({k: service.get(k) for k in ("command", "entrypoint")})
        assert "pip install" not in text, f"{name} installs packages at start"
    for dockerfile in ("infra/Dockerfile", "infra/triton.Dockerfile"):
        text = (REPO_ROOT / dockerfile).read_text()
        assert 'TORCH_SPEC="torch==2.13.0"' in text and "-c " in text and "constraints.txt" in text, dockerfile
    pins = (REPO_ROOT / "infra/constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in pins if "==" in line}
    assert {"transformers", "peft", "aiokafka", "clickhouse-connect", "fastavro"} <= pinned


def test_a_published_student_names_its_base_inside_the_mounted_artifacts(tmp_path: Path) -> None:
    """The layout Triton mounts is the trainer's: <models>/<student model>/<version>/spec.json, whose base
    model path lies under the artifacts directory that Triton mounts at the same path."""
    base = tmp_path / "artifacts" / "base_models" / "tiny"
    base.mkdir(parents=True)
    repo = ModelRepository(tmp_path / "models", "127.0.0.1:1")
    version_dir = repo.root / student_model_name("support-bot") / "1"
    render_student_version(version_dir, StudentModelSpec(base_model=str(base)), repo.templates_dir, copy_adapter=False)
    spec = json.loads((version_dir / "spec.json").read_text())
    assert Path(spec["base_model"]).is_relative_to(tmp_path / "artifacts")
    assert (version_dir / "model.py").exists()


@pytest.mark.parametrize("node", ["kafka-1", "kafka-2", "kafka-3"])
def test_three_kafka_nodes_form_one_cluster(node: str) -> None:
    env = SERVICES[node]["environment"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].count("@") == 3
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == 2 and env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 3
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{node}:9092"
