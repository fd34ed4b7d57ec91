"""The local stack as one unit: the parts in start order (infrastructure, the reference teacher, then the
services), and up / down / status over them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.core.settings import Settings
from services.stack.process import Component, ProcessManager

BROKER_NOTE = "memory storage: topics and offsets do not survive a broker restart (ClickHouse is the durable record)"


@dataclass
class PartStatus:
    name: str
    pid: int | None
    answering: bool
    endpoints: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def state(self) -> str:
        if self.pid is None:
            return "stopped"
        return "running" if self.answering else "not answering"


def isolated_settings(home: Path | str, **overrides: object) -> Settings:
    """Settings for a stack of its own: every port a free loopback port, all state under ``home`` (tests and
    benchmarks run beside a developer's stack without touching it)."""
    from services.stack.process import free_port

    ports: dict[str, object] = {
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "clickhouse_url": f"http://127.0.0.1:{free_port()}",
        "triton_http_url": f"127.0.0.1:{free_port()}",
        "triton_grpc_url": f"127.0.0.1:{free_port()}",
        "triton_metrics_port": free_port(),
        "teacher_url": f"http://127.0.0.1:{free_port()}/v1",
        "gateway_url": f"http://127.0.0.1:{free_port()}",
    }
    return Settings(home=Path(home), **{**ports, **overrides})  # type: ignore[arg-type]


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = ProcessManager(settings.run_dir, settings.log_dir)

    def components(self) -> list[Component]:
        from services.stack.broker import TansuBroker
        from services.stack.clickhouse_endpoint import ClickHouseEndpoint
        from services.stack.services import ServiceProcess
        from services.stack.teacher import ReferenceTeacherServer
        from services.stack.triton import TritonServer

        return [
            TansuBroker.from_settings(self.settings),
            ClickHouseEndpoint.from_settings(self.settings),
            TritonServer.from_settings(self.settings),
            ReferenceTeacherServer.from_settings(self.settings),
            ServiceProcess.for_service(self.settings, "logger"),
            ServiceProcess.for_service(self.settings, "router"),
            ServiceProcess.for_service(self.settings, "gateway"),
            ServiceProcess.for_service(self.settings, "curator"),
            ServiceProcess.for_service(self.settings, "trainer"),
            ServiceProcess.for_service(self.settings, "drift_monitor"),
        ]

    def up(self, progress: Callable[[str, str], None] = lambda name, msg: None) -> dict[str, dict[str, str]]:
        """Start every part not yet running, in order; on a failure the parts this call started are
        stopped again and the error propagates."""
        started: list[str] = []
        out: dict[str, dict[str, str]] = {}
        try:
            for comp in self.components():
                already = self.manager.running_pid(comp.name) is not None and comp.ready()
                progress(comp.name, "already running" if already else "starting")
                self.manager.start(comp, self.settings.stack_start_timeout_s)
                if not already:
                    started.append(comp.name)
                progress(comp.name, "ready")
                out[comp.name] = comp.endpoints()
        except BaseException:
            for name in reversed(started):
                self.manager.stop(name)
            raise
        return out

    def down(self) -> list[str]:
        stopped = []
        for comp in reversed(self.components()):
            if self.manager.stop(comp.name):
                stopped.append(comp.name)
        return stopped

    def status(self) -> list[PartStatus]:
        out = []
        for comp in self.components():
            pid = self.manager.running_pid(comp.name)
            out.append(
                PartStatus(
                    name=comp.name,
                    pid=pid,
                    answering=pid is not None and comp.ready(),
                    endpoints=comp.endpoints(),
                    note=BROKER_NOTE if comp.name == "broker" else "",
                )
            )
        return out
