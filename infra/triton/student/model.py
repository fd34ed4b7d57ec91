"""Triton Python-backend model for a student: adapts Triton's tensors to the student runtime.

Everything that answers (prompt rendering, constrained decoding, the fast decoder, answer templates) lives in
``services.student_runtime``, the code the trainer evaluates candidates with; this file only moves tensors.
Each version folder holds this file and ``spec.json`` (written by ``services/core/model_repository.py``).

``execute`` hands the requests to a ``Scheduler`` thread and returns at once (each request is answered through
its response sender, the one response a non-decoupled model sends): a request joins the forward passes already
running instead of waiting for the batch before it to end (continuous batching, see ``scheduler.py``).

Inputs / outputs (all with a leading batch dimension; every row of a request is decoded in the shared passes):

* ``PROMPT`` (BYTES, [1]): UTF-8 chat messages as JSON (``[{"role", "content"}, ...]`` or
  ``{"messages": [...], "tools": [...]}``) or an already-formatted prompt.
* ``TEXT`` (BYTES, [1]): the answer (with the answer template's fixed fields put back).
* ``CONFIDENCE`` (FP32, [1], in [0, 1]): the minimum probability of the answer's decisions.
* ``INPUT_TOKENS`` / ``OUTPUT_TOKENS`` (INT32, [1]): the prompt tokens the student read (after truncation) and
  the tokens it generated (template-filled fields are not generated): what the student is billed on.
* ``FORWARD_PASSES`` (INT32, [1]): forward passes the answer took.

A request whose PROMPT is bad (not UTF-8, empty, over-long, an unknown chat role) gets an error naming the
problem; the other requests of the batch are answered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

try:  # present inside the Triton Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests)
    pb_utils = None

from services.student_runtime import Answer, StudentGenerator, load_spec
from services.student_runtime.scheduler import Scheduler

WARMUP_MESSAGES = [{"role": "user", "content": "Hello, I need help with my card."}]
OUTPUTS = ("TEXT", "CONFIDENCE", "INPUT_TOKENS", "OUTPUT_TOKENS", "FORWARD_PASSES")


def request_rows(prompt: np.ndarray) -> tuple[list[str], str | None]:
    """The PROMPT strings of one request, or the error that refuses it (naming the row)."""
    rows = []
    for index, item in enumerate(prompt.reshape(-1)):
        if isinstance(item, bytes):
            try:
                rows.append(item.decode("utf-8"))
            except UnicodeDecodeError as exc:
                return [], f"PROMPT row {index} is not UTF-8: {exc}"
        else:
            rows.append(str(item))
    return rows, None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.max_batch = max(1, int(config.get("max_batch_size") or 1))
        self.name = f"{args['model_name']} version {args['model_version']}"
        spec = load_spec(version_dir)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # progress bars would garble the Triton log

        def load() -> StudentGenerator:
            generator = StudentGenerator(spec, version_dir)
            if spec.get("warmup", True):
                # A version that cannot answer must fail its load (the previous version then keeps serving),
                # and the first real request should not pay for lazy initialisation.
                answer = generator.answer([json.dumps(WARMUP_MESSAGES)], max_new_tokens=4)[0]
                if answer.error or not 0.0 <= answer.confidence <= 1.0:
                    raise ValueError(f"{self.name}: warm-up failed: {answer.error or answer.confidence}")
            return generator

        # The scheduler's thread loads, warms up and serves: every torch call on one thread (scheduler.py).
        self.scheduler = Scheduler(load, self.max_batch, self.name, report=pb_utils.Logger.log_error)
        self.generator = self.scheduler.g
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {spec['base_model']}"
            + (f" with adapter {self.generator.adapter_dir}" if self.generator.adapter_dir else "")
        )

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
            rows, error = request_rows(prompt)
            if error:
                self._send(sender, error=error)
                continue
            try:
                self.scheduler.submit(
                    rows, lambda answers, s=sender, shape=prompt.shape: self._respond(s, shape, answers)
                )
            except Exception as exc:  # unloading: the request gets the reason, not silence
                self._send(sender, error=f"{self.name}: {exc}")
        return None

    def _respond(self, sender, shape: tuple[int, ...], got: list[Answer]) -> None:
        bad = next((f"row {i}: {a.error}" if len(got) > 1 else a.error for i, a in enumerate(got) if a.error), None)
        if bad:
            self._send(sender, error=bad)
            return
        tensors = {
            "TEXT": np.array([a.text.encode("utf-8") for a in got], dtype=np.object_),
            "CONFIDENCE": np.array([a.confidence for a in got], dtype=np.float32),
            "INPUT_TOKENS": np.array([a.input_tokens for a in got], dtype=np.int32),
            "OUTPUT_TOKENS": np.array([a.output_tokens for a in got], dtype=np.int32),
            "FORWARD_PASSES": np.array([a.forward_passes for a in got], dtype=np.int32),
        }
        self._send(
            sender,
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, tensors[name].reshape(shape)) for name in OUTPUTS]
            ),
        )

    @staticmethod
    def _send(sender, response=None, error: str | None = None) -> None:
        if error is not None:
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        # Triton unloads a version once its requests are answered; what is still queued gets its answer first.
        if not self.scheduler.close(timeout_s=60.0):
            pb_utils.Logger.log_warn(f"{self.name}: requests still being answered at unload")
        self.generator = None
