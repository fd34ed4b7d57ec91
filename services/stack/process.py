"""Starting, probing and stopping the local stack's processes.

Each part of the local stack (broker, ClickHouse endpoint, Triton, later the services) is a ``Component``: a
command line, an environment, the ports it binds and a readiness probe. ``ProcessManager`` starts components
detached (their own session, output to ``<home>/logs/<name>.log``), records their pid in
``<home>/run/<name>.json`` so ``flywheel down``/``status`` in another shell find them, waits for readiness and
stops them with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path


class StackError(RuntimeError):
    """A local-stack part could not start or answer; the message names the part and the cause."""


@dataclass(frozen=True)
class Port:
    host: str
    port: int
    setting: str  # the setting that chose it, so a clash names what to change


@dataclass
class Component(ABC):
    name: str
    ports: list[Port] = field(default_factory=list)

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cwd(self) -> Path | None:
        return None

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Check binaries and create directories; raise StackError naming what is missing."""

    @abstractmethod
    def ready(self) -> bool:
        """One cheap probe: True when the part answers its protocol."""

    def endpoints(self) -> dict[str, str]:
        return {}

    def after_ready(self) -> None:  # noqa: B027 - optional hook
        """One-off set-up once the part answers (create topics, apply migrations...)."""


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists" for kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ProcessManager:
    def __init__(self, run_dir: Path, log_dir: Path) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir

    def _state_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def recorded(self, name: str) -> dict | None:
        path = self._state_file(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def running_pid(self, name: str) -> int | None:
        state = self.recorded(name)
        if state and pid_alive(int(state["pid"])):
            return int(state["pid"])
        return None

    def start(self, comp: Component, timeout_s: float) -> int:
        """Start a component (or adopt a running one) and wait until it answers."""
        pid = self.running_pid(comp.name)
        if pid is not None and comp.ready():
            return pid
        if pid is not None:  # recorded but not answering: a leftover to clear first
            self.stop(comp.name)
        for port in comp.ports:
            if not port_free(port.host, port.port):
                raise StackError(
                    f"{comp.name}: port {port.host}:{port.port} is already in use "
                    f"(set {port.setting} to another port, or stop what holds it)"
                )
        comp.prepare()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_file(comp.name)
        cmd = comp.command()
        with open(log_path, "ab") as log:
            log.write(f"\n--- starting {comp.name}: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=comp.env(),
                    cwd=comp.cwd(),
                    start_new_session=True,  # survives the CLI that started it; killed as a group
                )
            except OSError as exc:
                raise StackError(f"{comp.name}: cannot run {cmd[0]}: {exc}") from exc
        self._state_file(comp.name).write_text(
            json.dumps({"pid": proc.pid, "cmd": cmd, "endpoints": comp.endpoints(), "started": time.time()})
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._state_file(comp.name).unlink(missing_ok=True)
                raise StackError(
                    f"{comp.name} exited with code {proc.returncode} while starting; "
                    f"last lines of {log_path}:\n{tail(log_path)}"
                )
            if comp.ready():
                comp.after_ready()
                return proc.pid
            time.sleep(0.2)
        self.stop(comp.name)
        raise StackError(
            f"{comp.name} did not answer within {timeout_s:.0f}s; last lines of {log_path}:\n{tail(log_path)}"
        )

    def stop(self, name: str, grace_s: float = 15.0) -> bool:
        """SIGTERM the component's process group, SIGKILL after grace_s. True if something was running."""
        state = self.recorded(name)
        if not state:
            return False
        pid = int(state["pid"])
        was_running = pid_alive(pid)
        if was_running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while pid_alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.1)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._state_file(name).unlink(missing_ok=True)
        return was_running
