"""Triton Python-backend model for a student: adapts Triton's tensors to the student runtime.

Everything that answers (prompt rendering, constrained decoding, the fast decoder, answer templates) lives in
``services.student_runtime``, the code the trainer evaluates candidates with; this file only moves tensors.
Each version folder holds this file and ``spec.json`` (written by ``services/core/model_repository.py``).

Inputs / outputs (all with a leading batch dimension; Triton's dynamic batcher groups requests, and the rows of
every request in a batch are decoded together):

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
        self.generator = StudentGenerator(spec, version_dir)
        if spec.get("warmup", True):
            # A version that cannot answer must fail its load (the previous version then keeps serving), and
            # the first real request should not pay for lazy initialisation.
            answer = self.generator.answer([json.dumps(WARMUP_MESSAGES)], max_new_tokens=4)[0]
            if answer.error or not 0.0 <= answer.confidence <= 1.0:
                raise ValueError(f"{self.name}: warm-up failed: {answer.error or answer.confidence}")
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {spec['base_model']}"
            + (f" with adapter {self.generator.adapter_dir}" if self.generator.adapter_dir else "")
        )

    def execute(self, requests: list) -> list:
        shapes: list[tuple[int, ...]] = []
        errors: dict[int, str] = {}
        flat: list[tuple[int, str]] = []
        for index, request in enumerate(requests):
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
            shapes.append(prompt.shape)
            rows, error = request_rows(prompt)
            if error:
                errors[index] = error
            flat.extend((index, raw) for raw in rows if not error)
        answers: list[Answer] = []
        for begin in range(0, len(flat), self.max_batch):
            chunk = flat[begin : begin + self.max_batch]
            try:
                answers.extend(self.generator.answer([raw for _, raw in chunk]))
            except Exception as exc:  # the model must stay up: these requests get the error
                answers.extend(Answer(error=f"{type(exc).__name__}: {exc}") for _ in chunk)
        per_request: dict[int, list[Answer]] = {}
        for (index, _), answer in zip(flat, answers, strict=True):
            per_request.setdefault(index, []).append(answer)
        responses = []
        for index, shape in enumerate(shapes):
            got = per_request.get(index, [])
            bad = next((f"row {i}: {a.error}" if len(got) > 1 else a.error for i, a in enumerate(got) if a.error),
                       None)
            if index in errors or bad:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors.get(index) or bad)))
                continue
            tensors = {
                "TEXT": np.array([a.text.encode("utf-8") for a in got], dtype=np.object_),
                "CONFIDENCE": np.array([a.confidence for a in got], dtype=np.float32),
                "INPUT_TOKENS": np.array([a.input_tokens for a in got], dtype=np.int32),
                "OUTPUT_TOKENS": np.array([a.output_tokens for a in got], dtype=np.int32),
                "FORWARD_PASSES": np.array([a.forward_passes for a in got], dtype=np.int32),
            }
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, tensors[name].reshape(shape)) for name in OUTPUTS]))
        return responses

    def finalize(self) -> None:
        self.generator = None
