"""Latency and throughput of the local stack's Triton serving plumbing.

Starts its own ``tritonserver`` (free loopback ports, a temporary home), publishes the echo model (TEXT =
PROMPT, no compute: what is measured is Triton, the Python backend's IPC and the client), then prints:

* p50 / p95 / mean latency of N sequential single requests over gRPC and over HTTP;
* requests/s with C concurrent clients (threads, one client object each) over gRPC and HTTP.

Optionally (``--student-base DIR`` or ``--tiny-student``) it publishes a student over a local Hugging Face
model and measures its answers the same way (fewer requests: a student answer costs real compute).

    python benchmarks/bench_triton.py --requests 2000 --clients 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.core.model_repository import ModelRepository, StudentModelSpec  # noqa: E402
from services.core.settings import Settings  # noqa: E402
from services.stack.process import ProcessManager, free_port  # noqa: E402
from services.stack.triton import TritonServer  # noqa: E402

STUDENT_PROMPT = json.dumps([{"role": "user", "content": "My card has not arrived yet, what should I do?"}])


def grpc_caller(url: str, model: str, prompt: str) -> Callable[[], None]:
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))

    def call() -> None:
        client.infer(model, [tensor], client_timeout=120)

    return call


def http_caller(url: str, model: str, prompt: str) -> Callable[[], None]:
    client = httpclient.InferenceServerClient(url, connection_timeout=120, network_timeout=120)
    tensor = httpclient.InferInput("PROMPT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))

    def call() -> None:
        client.infer(model, [tensor])

    return call


def sequential(call: Callable[[], None], n: int) -> dict[str, float]:
    for _ in range(min(50, n)):  # warm connections and the model's first-request paths
        call()
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    latencies.sort()
    return {
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p95_ms": 1000 * latencies[int(len(latencies) * 0.95) - 1],
        "mean_ms": 1000 * statistics.fmean(latencies),
        "n": n,
    }


def concurrent(make_call: Callable[[], Callable[[], None]], clients: int, per_client: int) -> dict[str, float]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def run() -> None:
        # Each client is made in its own thread: the HTTP client (geventhttpclient) is bound to the thread
        # that created it.
        call = make_call()
        call()
        barrier.wait()
        try:
            for _ in range(per_client):
                call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return {"req_per_s": clients * per_client / elapsed, "clients": clients, "n": clients * per_client}


def measure(name: str, grpc_url: str, http_url: str, model: str, prompt: str, n: int, clients: int) -> dict[str, float]:
    rows = [
        ("gRPC sequential", sequential(grpc_caller(grpc_url, model, prompt), n)),
        ("HTTP sequential", sequential(http_caller(http_url, model, prompt), n)),
        ("gRPC concurrent", concurrent(lambda: grpc_caller(grpc_url, model, prompt), clients, n // clients)),
        ("HTTP concurrent", concurrent(lambda: http_caller(http_url, model, prompt), clients, n // clients)),
    ]
    print(f"\n{name} ({model})")
    for label, row in rows:
        if "p50_ms" in row:
            print(
                f"  {label:16s} n={row['n']:<5d} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  "
                f"mean {row['mean_ms']:7.2f} ms"
            )
        else:
            print(f"  {label:16s} n={row['n']:<5d} {row['req_per_s']:8.1f} req/s with {row['clients']} clients")
    # Flat figures for --json: echo_grpc_sequential_p95_ms, echo_http_concurrent_req_per_s...
    return {
        f"{name}_{label.lower().replace(' ', '_')}_{key}": value
        for label, row in rows
        for key, value in row.items()
        if key not in ("n", "clients")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="echo requests per measurement")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--student-base", type=Path, help="also benchmark a student over this local HF model")
    parser.add_argument("--tiny-student", action="store_true", help="also benchmark the tests' tiny student")
    parser.add_argument("--student-requests", type=int, default=64)
    parser.add_argument("--student-clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here as a flat JSON object")
    args = parser.parse_args()
    figures: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        settings = Settings(
            home=Path(tmp) / "home",
            triton_http_url=f"127.0.0.1:{free_port()}",
            triton_grpc_url=f"127.0.0.1:{free_port()}",
            triton_metrics_port=free_port(),
        )
        manager = ProcessManager(settings.run_dir, settings.log_dir)
        server = TritonServer.from_settings(settings)
        started = time.perf_counter()
        manager.start(server, settings.stack_start_timeout_s)
        print(f"tritonserver ready in {time.perf_counter() - started:.2f}s")
        try:
            repo = ModelRepository.from_settings(settings)
            published = repo.publish_echo()
            print(f"echo published (version {published.version}) in {published.seconds:.2f}s")
            grpc_url, http_url = server.endpoints()["triton_grpc"], server.endpoints()["triton_http"]
            figures |= measure("echo", grpc_url, http_url, "echo", "ping " * 20, args.requests, args.clients)

            base = args.student_base
            if args.tiny_student and base is None:
                from tests.helpers.tiny_model import build_tiny_model

                base = build_tiny_model(Path(tmp) / "tiny-model")
            if base is not None:
                spec = StudentModelSpec(base_model=str(base), max_new_tokens=args.max_new_tokens)
                student = repo.publish_student("bench", spec)
                print(f"\nstudent published (version {student.version}) in {student.seconds:.2f}s")
                figures |= measure(
                    "student",
                    grpc_url,
                    http_url,
                    student.model,
                    STUDENT_PROMPT,
                    args.student_requests,
                    args.student_clients,
                )
        finally:
            manager.stop(server.name)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
