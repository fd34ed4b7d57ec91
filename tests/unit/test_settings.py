"""Settings: sources and their priority, secrets kept out of files and output, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.settings import Settings, SettingsError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)


def test_defaults_are_loopback() -> None:
    s = Settings.load()
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.clickhouse_url == "http://127.0.0.1:8123"
    assert s.path("clickhouse") == (Path(".flywheel") / "clickhouse").absolute()


def test_env_beats_file_beats_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "flywheel.yaml"
    cfg.write_text("clickhouse_database: from_file\nkafka_bootstrap: file:1\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(cfg))
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", "env:2")
    s = Settings.load()
    assert s.clickhouse_database == "from_file"
    assert s.kafka_bootstrap == "env:2"


def test_secret_in_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "flywheel.yaml"
    cfg.write_text("clickhouse_password: hunter2\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match="FLYWHEEL_CLICKHOUSE_PASSWORD"):
        Settings.load()


def test_unknown_key_in_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "flywheel.yaml"
    cfg.write_text("kafka_bootstrapp: x:1\n")
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match="kafka_bootstrapp"):
        Settings.load()


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_CONFIG", "/nonexistent/flywheel.yaml")
    with pytest.raises(SettingsError, match=r"/nonexistent/flywheel\.yaml"):
        Settings.load()


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("FLYWHEEL_CLICKHOUSE_URL", "localhost:8123", "FLYWHEEL_CLICKHOUSE_URL"),
        ("FLYWHEEL_KAFKA_BOOTSTRAP", "nohostport", "FLYWHEEL_KAFKA_BOOTSTRAP"),
        ("FLYWHEEL_TRITON_METRICS_PORT", "70000", "FLYWHEEL_TRITON_METRICS_PORT"),
        ("FLYWHEEL_KAFKA_SECURITY_PROTOCOL", "TLS", "FLYWHEEL_KAFKA_SECURITY_PROTOCOL"),
    ],
)
def test_bad_values_name_the_key(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named):
        Settings.load()


def test_sasl_needs_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(SettingsError, match="FLYWHEEL_KAFKA_SASL_PASSWORD"):
        Settings.load()


def test_secrets_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_CLICKHOUSE_PASSWORD", "hunter2")
    monkeypatch.setenv("FLYWHEEL_TEACHER_API_KEY", "sk-secret")
    s = Settings.load()
    shown = str(s.as_dict()) + repr(s) + str(s)
    assert "hunter2" not in shown and "sk-secret" not in shown
    assert s.clickhouse_password is not None and s.clickhouse_password.get_secret_value() == "hunter2"


def test_kafka_client_configs_carry_security(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.core.kafka import aiokafka_config, confluent_config

    monkeypatch.setenv("FLYWHEEL_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("FLYWHEEL_KAFKA_SASL_PASSWORD", "pw")
    s = Settings.load()
    conf = confluent_config(s)
    assert conf["security.protocol"] == "sasl_plaintext" and conf["sasl.password"] == "pw"
    aio = aiokafka_config(s)
    assert aio["sasl_mechanism"] == "SCRAM-SHA-512" and aio["sasl_plain_password"] == "pw"


def test_the_homes_agents_file_is_read_unless_another_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.core.settings import REPO_ROOT

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    assert Settings.load().agents_file == REPO_ROOT / "agents.yaml"
    (tmp_path / "agents.yaml").write_text("agents: {}\n")  # what `flywheel demo --data` writes there
    assert Settings.load().agents_file == tmp_path / "agents.yaml"
    monkeypatch.setenv("FLYWHEEL_AGENTS_FILE", str(REPO_ROOT / "agents.yaml"))
    assert Settings.load().agents_file == REPO_ROOT / "agents.yaml"
