"""The one settings object of every flywheel process.

Built once in ``main()`` (``Settings.load()``) and passed down; never read at import time. Values come from,
highest priority first: constructor arguments, ``FLYWHEEL_*`` environment variables, the YAML file named by
``FLYWHEEL_CONFIG``, then the defaults below. Secrets (passwords, API keys) come from the environment only: a
secret in the YAML file is refused, and ``as_dict()`` never shows one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET_FIELDS = frozenset({"kafka_sasl_password", "clickhouse_password", "teacher_api_key", "gateway_api_keys"})


class SettingsError(ValueError):
    """A bad setting: the message names the key (and where it came from) and the problem."""


class _YamlFileSource(PydanticBaseSettingsSource):
    """Reads the file named by FLYWHEEL_CONFIG; refuses secrets in it."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        if not self.path.is_file():
            raise SettingsError(f"FLYWHEEL_CONFIG: config file {self.path} does not exist")
        try:
            data = yaml.safe_load(self.path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"FLYWHEEL_CONFIG: {self.path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise SettingsError(f"FLYWHEEL_CONFIG: {self.path} must hold a mapping of settings")
        for key in data:
            if key in SECRET_FIELDS:
                env = "FLYWHEEL_" + key.upper()
                raise SettingsError(
                    f"{self.path}: '{key}' is a secret; set it in the environment ({env}), not in a file"
                )
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="forbid", validate_default=True)

    config: Path | None = Field(None, description="YAML file with settings (secrets excluded)")
    home: Path = Field(Path(".flywheel"), description="Local stack state: data, models, artifacts, logs")

    # Kafka. Production clusters add SASL/TLS; the local broker is PLAINTEXT on loopback.
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_client_id: str = "slm-flywheel"
    # How long the broker may hold a fetch waiting for data. The local broker (Tansu) holds every fetch for
    # the full wait even when data is there, which at Kafka's usual 500 ms made each hop ~250 ms slower;
    # 10 ms costs a real cluster only more idle fetch requests.
    kafka_fetch_max_wait_ms: int = Field(10, ge=0, le=60_000)
    # Durability. Topics are created with this many replicas, and a write is acknowledged (acks=all) only
    # once min_insync_replicas of them have it: 1 and 1 for the single local broker, 3 and 2 on a cluster
    # (docker-compose.yml). Idempotent producers stop a retried send from writing a record twice; the local
    # broker (Tansu) refuses InitProducerId, so it is off by default and on in the compose file.
    kafka_replication_factor: int = Field(1, ge=1, le=16)
    kafka_min_insync_replicas: int = Field(1, ge=1, le=16)
    kafka_idempotent_producer: bool = False

    # ClickHouse, always over HTTP (the local stack serves chDB behind the same interface).
    clickhouse_url: str = "http://127.0.0.1:8123"
    clickhouse_database: str = "flywheel"
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr | None = None
    # The local ClickHouse endpoint's caps (services/stack/clickhouse_endpoint/limits.py); a real server has its
    # own (max_concurrent_queries, settings constraints...).
    clickhouse_max_body_mb: int = Field(512, ge=1, description="Largest request body, MiB")
    clickhouse_max_decompress_ratio: float = Field(100.0, ge=1, description="Largest decompressed/compressed ratio")
    clickhouse_max_concurrent_queries: int = Field(32, ge=1)
    clickhouse_max_sessions: int = Field(64, ge=1)
    clickhouse_max_execution_time_s: int = Field(300, ge=1, description="No query may run (or ask to run) longer")
    clickhouse_max_threads: int = Field(4, ge=1, description="Most threads one query may use")

    # Triton inference server.
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_url: str = "127.0.0.1:8000"
    triton_metrics_port: int = Field(8002, ge=1, le=65535)

    # Teacher (OpenAI-compatible). The local stack serves the reference teacher here.
    teacher_url: str = "http://127.0.0.1:8100/v1"
    teacher_api_key: SecretStr | None = None

    # The OpenAI-compatible gateway (services/gateway): `model` names the agent. API keys per agent, from the
    # environment ("agent=key,agent=key"; "*=key" for every agent) and/or a YAML file {agent: [keys]}; without
    # any, only loopback is served.
    gateway_url: str = "http://127.0.0.1:8300"
    gateway_api_keys: SecretStr | None = None
    gateway_keys_file: Path | None = None
    gateway_timeout_s: float = Field(60.0, gt=0, description="How long a request waits for its answer")

    # Agents and data.
    agents_file: Path = Field(
        REPO_ROOT / "agents.yaml",
        description="The agents' configuration (agents.yaml); FLYWHEEL_HOME/agents.yaml instead when it exists",
    )
    data_dir: Path = Field(REPO_ROOT / "data", description="Labelled data sets behind the reference teacher")

    # The reference teacher (the local stack's offline stand-in for a frontier model).
    reference_teacher_latency_ms: float = Field(400.0, ge=0, description="Median answer latency")
    reference_teacher_flaw_rate: float = Field(0.03, ge=0, le=1, description="Share of flawed answers")

    # CPU threads of the Triton student and the trainer: "auto" uses the cores the rest of the machine leaves
    # free (re-checked every second; services/core/threads.py), a number fixes the count.
    student_threads: str = Field("auto", description="'auto' or a number of threads")
    trainer_threads: str = Field("auto", description="'auto' or a number of threads")

    # Services.
    curator_check_interval_s: float = Field(10.0, gt=0, description="How often the curator checks grace progress")
    dashboard_port: int = Field(8765, ge=1, le=65535, description="Port of flywheel dashboard (--port overrides)")
    drift_check_interval_s: float = Field(30.0, gt=0, description="How often the drift monitor checks the windows")

    # Local stack only: where the stand-ins find their binaries and keep their data (defaults under home).
    tansu_bin: Path | None = None
    tritonserver_dir: Path | None = None
    clickhouse_data_dir: Path | None = None
    model_repository: Path | None = None
    artifacts_dir: Path | None = None
    stack_start_timeout_s: float = Field(120.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("FLYWHEEL_CONFIG")
        return init_settings, env_settings, _YamlFileSource(settings_cls, Path(path) if path else None)

    @field_validator("clickhouse_url", "teacher_url", "gateway_url")
    @classmethod
    def _http_url(cls, value: str, info: Any) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http(s):// URL with a host, got {value!r}")
        return value.rstrip("/")

    @field_validator("triton_grpc_url", "triton_http_url", "kafka_bootstrap")
    @classmethod
    def _host_port(cls, value: str) -> str:
        for item in value.split(","):
            host, sep, port = item.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"must be host:port (comma-separated for several), got {value!r}")
        return value

    @field_validator("student_threads", "trainer_threads")
    @classmethod
    def _threads(cls, value: str, info: Any) -> str:
        from services.core.threads import parse_threads

        count = parse_threads(value, info.field_name)  # refused at start, with the setting's name
        return "auto" if count is None else str(count)

    def thread_count(self, key: str) -> int | None:
        """A thread setting as a count, or None for 'auto' (adaptive)."""
        from services.core.threads import parse_threads

        return parse_threads(getattr(self, key), key)

    @model_validator(mode="after")
    def _home_agents_file(self) -> Settings:
        # `flywheel demo --data` writes the configured agents plus the data set's to FLYWHEEL_HOME/agents.yaml:
        # every command with that home reads it, unless FLYWHEEL_AGENTS_FILE names another file.
        home_file = self.home / "agents.yaml"
        if "agents_file" not in self.model_fields_set and home_file.is_file():
            self.agents_file = home_file
        return self

    @model_validator(mode="after")
    def _replicas(self) -> Settings:
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(
                f"kafka_min_insync_replicas ({self.kafka_min_insync_replicas}) cannot exceed "
                f"kafka_replication_factor ({self.kafka_replication_factor}): no write could be acknowledged"
            )
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                keys = ", ".join("FLYWHEEL_" + m.upper() for m in missing)
                raise ValueError(f"kafka_security_protocol={self.kafka_security_protocol} needs {keys}")
        return self

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings, turning pydantic's report into one message that names each bad key."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = ".".join(str(p) for p in err["loc"]) or "settings"
                env = "FLYWHEEL_" + key.upper() if err["loc"] else ""
                where = f"{key} ({env})" if env else key
                problems.append(f"{where}: {err['msg']}")
            raise SettingsError("bad settings: " + "; ".join(problems)) from exc

    # Derived local paths -------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        explicit = {
            "clickhouse": self.clickhouse_data_dir,
            "models": self.model_repository,
            "artifacts": self.artifacts_dir,
        }.get(name)
        return (explicit or self.home / name).absolute()

    @property
    def log_dir(self) -> Path:
        return self.path("logs")

    @property
    def run_dir(self) -> Path:
        return self.path("run")

    def as_dict(self) -> dict[str, Any]:
        """Every setting, secrets masked, for logs and `flywheel status`."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if name in SECRET_FIELDS:
                out[name] = "***" if value is not None else None
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        return out


def url_port(url: str, default: int) -> int:
    """The port of an http URL or host:port string."""
    if "://" in url:
        return urlsplit(url).port or default
    return int(url.rsplit(":", 1)[1])
