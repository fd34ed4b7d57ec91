"""Shared fixtures. The real local stack is started once per test session, one part at a time, on free
loopback ports under a temporary home, so tests never touch a developer's running stack."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.core.settings import Settings
from services.stack.process import ProcessManager


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from services.stack.local import isolated_settings

    return isolated_settings(
        tmp_path_factory.mktemp("flywheel-home"),
        reference_teacher_latency_ms=20.0,  # realistic shape, test-sized wait
    )


@pytest.fixture(scope="session")
def stack_manager(settings: Settings) -> Iterator[ProcessManager]:
    manager = ProcessManager(settings.run_dir, settings.log_dir)
    started: list[str] = []
    manager.started = started  # type: ignore[attr-defined]
    yield manager
    for name in reversed(started):
        manager.stop(name)


def _start(manager: ProcessManager, component, settings: Settings):
    manager.start(component, settings.stack_start_timeout_s)
    manager.started.append(component.name)  # type: ignore[attr-defined]
    return component


@pytest.fixture(scope="session")
def broker(settings: Settings, stack_manager: ProcessManager):
    from services.stack.broker import TansuBroker

    return _start(stack_manager, TansuBroker.from_settings(settings), settings)


@pytest.fixture(scope="session")
def clickhouse(settings: Settings, stack_manager: ProcessManager):
    from services.stack.clickhouse_endpoint import ClickHouseEndpoint

    return _start(stack_manager, ClickHouseEndpoint.from_settings(settings), settings)


@pytest.fixture(scope="session")
def triton(settings: Settings, stack_manager: ProcessManager):
    from services.stack.triton import TritonServer

    return _start(stack_manager, TritonServer.from_settings(settings), settings)


@pytest.fixture(scope="session")
def teacher(settings: Settings, stack_manager: ProcessManager):
    from services.stack.teacher import ReferenceTeacherServer

    return _start(stack_manager, ReferenceTeacherServer.from_settings(settings), settings)


def start_services(manager: ProcessManager, settings: Settings, names: tuple[str, ...] = ("logger", "router")) -> None:
    """(Re)start the flywheel's services with these settings (tests use their own agents files, so a service
    left running by another test module is restarted rather than adopted)."""
    from services.stack.services import ServiceProcess

    for name in names:
        manager.stop(name)
        _start(manager, ServiceProcess.for_service(settings, name), settings)
