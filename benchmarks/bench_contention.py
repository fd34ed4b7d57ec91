"""A busy neighbour on a small machine: the student's serving and the trainer's training speed alone and beside a
process that keeps one core busy, with the thread settings ``2`` (fixed: every core) and ``auto`` (adaptive,
``services/core/threads.py``).

Each measurement runs in a fresh subprocess (torch reads its thread settings at start); the neighbour is a
Python busy loop. Serving: the fast decoder of a trained version (``--version-dir`` with ``--snapshot``, as
``bench_student_latency.py`` keeps them) in its served weight format, batches of 8 holdout prompts. Training:
LoRA steps (batch 8, 60 tokens) on the default base.

    python benchmarks/bench_contention.py --version-dir /tmp/bench-student/version \\
        --snapshot /tmp/bench-student/snapshot --json out.json

The goal (issue 12): a busy neighbour costs at most its share of the CPU, i.e. beside one busy core of two, at
least half the speed alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "536870912",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
what, threads, seconds = sys.argv[2], sys.argv[3], float(sys.argv[4])
from services.core.threads import AdaptiveThreads, parse_threads
if what == "train":
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[5]), LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 40000, (8, 60))
    control = AdaptiveThreads(fixed=parse_threads(threads, "threads"))
    def unit():
        control.update()
        model(input_ids=ids, labels=ids).loss.backward(); optimizer.step(); optimizer.zero_grad()
        return 8
else:
    from services.student_runtime import StudentGenerator
    from services.trainer import data as D
    spec = json.loads(open(sys.argv[5]).read()); spec["num_threads"] = None if threads == "auto" else int(threads)
    generator = StudentGenerator(spec)
    prompts = [D.prompt_json(e.messages) for e in D.read_snapshot(sys.argv[6]).holdout[:64]]
    state = {"i": 0}
    def unit():
        i = state["i"] = (state["i"] + 8) % 64
        generator.answer(prompts[i:i + 8])
        return 8
unit(); unit()
done, started = 0, time.perf_counter()
while time.perf_counter() - started < seconds:
    done += unit()
print(json.dumps({"per_s": done / (time.perf_counter() - started)}))
"""


def measure(what: str, threads: str, busy: bool, seconds: float, extra: list[str]) -> float:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(ROOT), what, threads, str(seconds), *extra],
            capture_output=True,
            text=True,
            env={**os.environ, **MALLOC},
            timeout=900,
            check=True,
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1])["per_s"])
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, help="a trained version (spec.json + adapter)")
    parser.add_argument("--snapshot", type=Path, help="its snapshot (holdout prompts)")
    parser.add_argument("--base-cache", type=Path, default=Path(tempfile.gettempdir()) / "flywheel-base-cache")
    parser.add_argument("--seconds", type=float, default=25.0, help="per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from services.trainer.base_model import SMOLLM2_ALIAS, prepare_base

    base = prepare_base(SMOLLM2_ALIAS, None, args.base_cache).path
    work: list[tuple[str, list[str]]] = [("train", [base])]
    if args.version_dir and args.snapshot:
        spec = json.loads((args.version_dir / "spec.json").read_text())
        if spec.get("adapter_path") and not Path(spec["adapter_path"]).is_absolute():
            spec["adapter_path"] = str((args.version_dir / spec["adapter_path"]).absolute())
        spec_file = Path(tempfile.mkdtemp()) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        work.insert(0, ("serve", [str(spec_file), str(args.snapshot)]))
    figures: dict[str, object] = {
        "command": shlex.join(["python", "benchmarks/bench_contention.py", *sys.argv[1:]]),
        "load_before": os.getloadavg()[0],
    }
    unit = {"serve": "answers/s", "train": "examples/s"}
    print("| work | threads | alone | beside a busy core | kept |\n|---|---|---|---|---|")
    for what, extra in work:
        for threads in ("2", "auto"):
            alone = measure(what, threads, False, args.seconds, extra)
            time.sleep(1)
            busy = measure(what, threads, True, args.seconds, extra)
            figures[f"{what}_{threads}_alone"] = alone
            figures[f"{what}_{threads}_busy"] = busy
            figures[f"{what}_{threads}_kept"] = busy / alone
            print(
                f"| {what} ({unit[what]}) | {threads} | {alone:.2f} | {busy:.2f} | {100 * busy / alone:.0f} % |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
