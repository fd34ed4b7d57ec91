"""The local stack's Triton: the ``tritonserver`` binary shipped in the PyPI wheel ``nvidia-pytriton``, run on
CPU with the Python backend over the flywheel's model repository (``<home>/models``).

The wheel's binary does not run as shipped; each of these was seen failing without it:

* ``LD_LIBRARY_PATH`` must hold the wheel's ``nvidia_pytriton.libs`` (libtritonserver and friends) and the
  running interpreter's ``LIBDIR`` (the Python backend stub links ``libpython3.X``);
* the running interpreter's ``bin`` directory must come first on ``PATH``, so the stub's embedded Python
  finds this environment's site-packages (torch, transformers) and not another interpreter's;
* the backend directory must hold ``libtriton_python.so``, ``triton_python_backend_utils.py`` *and* the
  ``triton_python_backend_stub`` built for this Python version: the wheel keeps one stub per version under
  ``python_backend_stubs/<X.Y>/``, so we assemble ``<home>/triton/backends/python`` from symlinks.

Models are loaded only through the explicit model-control API (``services.core.model_repository`` is the one
place that does it, over gRPC); at start every model already in the repository is loaded, so a restarted
stack serves what was last published.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from services.core.settings import Settings
from services.stack.process import Component, Port, StackError

log = logging.getLogger(__name__)

# glibc returning freed memory to the OS on every allocation cycle made torch about 12x slower here; these
# keep the heap mapped (see DESIGN.md, "The student on this machine").
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
}

PACKAGE_HINT = "install the PyPI package nvidia-pytriton (pip install nvidia-pytriton) or set FLYWHEEL_TRITONSERVER_DIR"


def wheel_tritonserver_dir() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton wheel, if any."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "tritonserver"


def python_version_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.split(",")[0].strip().rpartition(":")
    return host, int(port)


@dataclass
class TritonServer(Component):
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8001
    metrics_port: int = 8002
    repository: Path = field(default_factory=lambda: Path(".flywheel/models").absolute())
    work_dir: Path = field(default_factory=lambda: Path(".flywheel/triton").absolute())
    server_dir: Path | None = None  # a Triton install: bin/tritonserver, backends/python, python_backend_stubs
    ready_timeout_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> TritonServer:
        http_host, http_port = split_host_port(settings.triton_http_url)
        grpc_host, grpc_port = split_host_port(settings.triton_grpc_url)
        return cls(
            name="triton",
            ports=[
                Port(http_host, http_port, "FLYWHEEL_TRITON_HTTP_URL"),
                Port(grpc_host, grpc_port, "FLYWHEEL_TRITON_GRPC_URL"),
                Port(http_host, settings.triton_metrics_port, "FLYWHEEL_TRITON_METRICS_PORT"),
            ],
            http_host=http_host,
            http_port=http_port,
            grpc_host=grpc_host,
            grpc_port=grpc_port,
            metrics_port=settings.triton_metrics_port,
            repository=settings.path("models"),
            work_dir=settings.path("triton"),
            server_dir=settings.tritonserver_dir or wheel_tritonserver_dir(),
        )

    # Locations ----------------------------------------------------------------------------------------------
    def _root(self) -> Path:
        if self.server_dir is None:
            raise StackError(f"triton: the tritonserver binary was not found: {PACKAGE_HINT}")
        return Path(self.server_dir)

    @property
    def binary(self) -> Path:
        root = self._root()
        # Accept either an install root (bin/tritonserver) or the bin directory itself.
        return root / "tritonserver" if (root / "tritonserver").is_file() else root / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        return self.work_dir / "backends"

    def _install_root(self) -> Path:
        root = self._root()
        return root.parent if root.name == "bin" else root

    def _stub_source(self) -> Path:
        root = self._install_root()
        per_version = root / "python_backend_stubs" / python_version_tag() / "triton_python_backend_stub"
        if per_version.is_file():
            return per_version
        # A plain Triton install (e.g. /opt/tritonserver) carries one stub, built for its own Python.
        return root / "backends" / "python" / "triton_python_backend_stub"

    def _libs_dirs(self) -> list[Path]:
        dirs: list[Path] = []
        root = self._install_root()
        # The wheel's vendored shared libraries sit beside the package: site-packages/nvidia_pytriton.libs
        wheel_libs = root.parent.parent / "nvidia_pytriton.libs"
        if wheel_libs.is_dir():
            dirs.append(wheel_libs)
        if (root / "lib").is_dir():
            dirs.append(root / "lib")
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            dirs.append(Path(libdir))
        return dirs

    # Component ----------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        binary = self.binary
        if not binary.is_file():
            raise StackError(f"triton: tritonserver binary {binary} does not exist: {PACKAGE_HINT}")
        source_backend = self._install_root() / "backends" / "python"
        needed = [source_backend / "libtriton_python.so", source_backend / "triton_python_backend_utils.py"]
        stub = self._stub_source()
        for path in [*needed, stub]:
            if not path.is_file():
                raise StackError(
                    f"triton: {path} does not exist (the Python backend for Python {python_version_tag()} is "
                    f"missing): {PACKAGE_HINT}"
                )
        self.repository.mkdir(parents=True, exist_ok=True)
        target = self.backend_dir / "python"
        target.mkdir(parents=True, exist_ok=True)
        # Re-link every start: the environment (and so the right stub) may have changed since the last one.
        for src, name in [
            (needed[0], "libtriton_python.so"),
            (needed[1], "triton_python_backend_utils.py"),
            (stub, "triton_python_backend_stub"),
        ]:
            dst = target / name
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            try:
                dst.symlink_to(src)
            except OSError:
                shutil.copy2(src, dst)

    def command(self) -> list[str]:
        # One shared-memory prefix per server: two Triton servers on one machine (a developer's stack and a
        # test session) would otherwise collide on the Python backend's /dev/shm regions.
        shm_prefix = f"flywheel_{zlib.crc32(str(self.repository).encode()):08x}_{self.grpc_port}_"
        return [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backend_dir}",
            # Only the flywheel decides what is loaded; the start loads whatever was published before.
            "--model-control-mode=explicit",
            "--load-model=*",
            # Configs are written in full by model_repository; auto-complete roughly doubles load/swap time.
            "--disable-auto-complete-config",
            # A broken model must not take the server (and every other student) down with it.
            "--exit-on-error=false",
            "--strict-readiness=false",
            f"--http-address={self.http_host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.grpc_host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.http_host}",
            f"--metrics-port={self.metrics_port}",
            # CPU only: skip the CUDA pinned-memory pool (it only logs a warning and wastes start time).
            "--pinned-memory-pool-byte-size=0",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            "--backend-config=python,shm-default-byte-size=4194304",
            "--backend-config=python,shm-growth-byte-size=1048576",
            "--log-verbose=0",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [str(p) for p in self._libs_dirs()]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        # The stub embeds Python and takes its prefix from the first python on PATH: make that ours.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(MALLOC_ENV)
        return env

    def cwd(self) -> Path | None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def ready(self) -> bool:
        url = f"http://{self.http_host}:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=self.ready_timeout_s) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def after_ready(self) -> None:
        # The start loaded every model in the repository; say which did not come up (the server runs on).
        import tritonclient.grpc as grpcclient

        try:
            client = grpcclient.InferenceServerClient(f"{self.grpc_host}:{self.grpc_port}")
            index = client.get_model_repository_index(as_json=True)
        except Exception as exc:  # informative only: readiness already passed
            log.warning("triton: could not read the model repository index: %s", exc)
            return
        for model in index.get("models", []):
            if model.get("state") not in (None, "READY"):
                log.warning(
                    "triton: model %s version %s is %s: %s",
                    model.get("name"),
                    model.get("version", "?"),
                    model.get("state"),
                    model.get("reason", ""),
                )

    def endpoints(self) -> dict[str, str]:
        return {
            "triton_http": f"{self.http_host}:{self.http_port}",
            "triton_grpc": f"{self.grpc_host}:{self.grpc_port}",
        }
