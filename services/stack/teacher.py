"""The local stack's teacher: the reference teacher (an offline stand-in for a frontier model, answering from
the labelled data sets in ``data/``) served over the OpenAI chat-completions API at FLYWHEEL_TEACHER_URL. In
production FLYWHEEL_TEACHER_URL points at a real OpenAI-compatible endpoint and this part is not started."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from services.core.settings import REPO_ROOT, Settings
from services.stack.process import Component, Port, StackError
from services.teacher.datasets import registry_dir
from services.teacher.workloads import missing_files


@dataclass
class ReferenceTeacherServer(Component):
    host: str = "127.0.0.1"
    port: int = 8100
    prefix: str = "/v1"
    data_dir: Path = field(default_factory=lambda: REPO_ROOT / "data")
    latency_ms: float = 400.0
    flaw_rate: float = 0.03
    seed: int = 0
    ready_timeout_s: float = 1.0
    registry: Path | None = None  # data sets of your own (datasets.register), served as reference/<name>

    @classmethod
    def from_settings(cls, settings: Settings, *, seed: int = 0) -> ReferenceTeacherServer:
        url = urlsplit(settings.teacher_url)
        host = url.hostname or "127.0.0.1"
        port = url.port or (443 if url.scheme == "https" else 80)
        return cls(
            name="teacher",
            ports=[Port(host, port, "FLYWHEEL_TEACHER_URL")],
            host=host,
            port=port,
            prefix=url.path or "",
            data_dir=settings.data_dir,
            latency_ms=settings.reference_teacher_latency_ms,
            flaw_rate=settings.reference_teacher_flaw_rate,
            seed=seed,
            registry=registry_dir(settings.home.absolute()),
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.prefix}"

    def prepare(self) -> None:
        missing = missing_files(self.data_dir)
        if missing:
            raise StackError(
                f"teacher: the reference teacher's data sets are incomplete in {self.data_dir}: missing "
                f"{', '.join(str(p) for p in missing)} (set FLYWHEEL_DATA_DIR to the repository's data/ folder)"
            )

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "services.teacher",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--prefix",
            self.prefix or "/",
            "--data-dir",
            str(self.data_dir),
            "--latency-ms",
            str(self.latency_ms),
            "--flaw-rate",
            str(self.flaw_rate),
            "--seed",
            str(self.seed),
            *(["--registry", str(self.registry)] if self.registry is not None else []),
        ]

    def cwd(self) -> Path | None:
        # `python -m services.teacher` must import this checkout's package even when it is not installed.
        return REPO_ROOT

    def ready(self) -> bool:
        try:
            url = f"http://{self.host}:{self.port}/health"
            with urllib.request.urlopen(url, timeout=self.ready_timeout_s) as resp:
                return int(resp.status) == 200 and json.loads(resp.read()).get("teacher") == "reference"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def endpoints(self) -> dict[str, str]:
        return {"teacher": self.url}
