"""The flywheel's own services as local-stack parts: ``python -m services.<name>`` with the stack's settings
passed through the environment, ready once the service wrote its ready file (consumers joined)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from services.core.health import clear_ready, is_ready
from services.core.settings import SECRET_FIELDS, Settings
from services.stack.process import Component
from services.stack.triton import MALLOC_ENV


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings as this one. Secrets are not copied
    here: they stay in (and are inherited from) the parent's environment, never in a file or a command."""
    env = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if name in SECRET_FIELDS or name == "config":
            continue
        env["FLYWHEEL_" + name.upper()] = str(Path(value).absolute()) if isinstance(value, Path) else str(value)
    return env


@dataclass
class ServiceProcess(Component):
    module: str = ""
    settings: Settings | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_service(cls, settings: Settings, name: str, module: str | None = None) -> ServiceProcess:
        # glibc returning memory to the OS on every step made torch training ~12x slower here (DESIGN.md).
        extra = MALLOC_ENV if name == "trainer" else {}
        return cls(
            name=name, module=module or f"services.{name.replace('-', '_')}", settings=settings, extra_env=dict(extra)
        )

    def prepare(self) -> None:
        assert self.settings is not None
        clear_ready(self.settings, self.name)  # a stale file from a killed run must not pass for ready

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def env(self) -> dict[str, str]:
        assert self.settings is not None
        env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_CONFIG"}
        env.update(settings_env(self.settings))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    def ready(self) -> bool:
        assert self.settings is not None
        return is_ready(self.settings, self.name)

    def endpoints(self) -> dict[str, str]:
        if self.name == "gateway" and self.settings is not None:
            return {"openai": f"{self.settings.gateway_url}/v1"}
        return {}
