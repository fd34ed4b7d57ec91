"""Triton Python-backend echo model: TEXT = PROMPT, CONFIDENCE = 1.0, batched.

Used by the serving-plumbing tests and the latency benchmark (benchmarks/bench_triton.py): it costs nothing,
so what is measured is Triton, the Python backend's IPC and the client.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.model_name = args.get("model_name", "echo")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
            confidence = np.ones(prompt.shape, dtype=np.float32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("TEXT", prompt.astype(np.object_)),
                        pb_utils.Tensor("CONFIDENCE", confidence),
                    ]
                )
            )
        return responses

    def finalize(self) -> None:
        pass
