"""The student client: one async gRPC inference against Triton's ``student_<agent>`` model.

A missing, unloaded or failing model raises ``StudentUnavailable`` (counted per agent in ``failures``), which
the router answers by falling back to the teacher.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.core.model_repository import student_model_name
from services.core.records import ChatMessage


class StudentUnavailable(RuntimeError):
    """The student could not answer; the message names the model and Triton's reason."""


@dataclass(frozen=True)
class StudentAnswer:
    text: str
    confidence: float
    model: str
    model_version: str
    latency_ms: float
    # What the student read and generated (Triton's INPUT_TOKENS / OUTPUT_TOKENS); None from a version that
    # does not report them.
    input_tokens: int | None = None
    output_tokens: int | None = None
    forward_passes: int | None = None


def prompt_json(messages: Sequence[ChatMessage], tools: str | None = None) -> str:
    """The PROMPT the student backend expects: chat messages (and tools) as JSON."""
    msgs = [m.model_dump(exclude_none=True) for m in messages]
    if tools:
        return json.dumps({"messages": msgs, "tools": json.loads(tools)}, ensure_ascii=False)
    return json.dumps(msgs, ensure_ascii=False)


# A request that ran out of time (or was cancelled) would only run out of time again: Triton still has it
# queued. Retrying it doubled the load on an overloaded student (the demo's live phase saw it).
NO_RETRY_STATUSES = ("DEADLINE_EXCEEDED", "CANCELLED")


def retry_with_latest(version: int | None, status: str | None) -> bool:
    """Whether a failed inference on ``version`` is asked again of the latest version: only a request for a
    given version (a hot swap may have unloaded it) that did not fail by time."""
    return bool(version) and not any(s in (status or "") for s in NO_RETRY_STATUSES)


def _count(result, name: str) -> int | None:
    values = result.as_numpy(name)
    return None if values is None else int(values.reshape(-1)[0])


class StudentClient:
    def __init__(self, grpc_url: str, timeout_s: float = 30.0) -> None:
        self.grpc_url = grpc_url
        self.timeout_s = timeout_s
        self.failures: Counter[str] = Counter()
        self._client = None

    async def _get(self):
        if self._client is None:
            import tritonclient.grpc.aio as grpcclient

            self._client = grpcclient.InferenceServerClient(self.grpc_url)
        return self._client

    async def answer(
        self, agent_id: str, messages: Sequence[ChatMessage], tools: str | None = None, version: int | None = None
    ) -> StudentAnswer:
        import tritonclient.grpc.aio as grpcclient
        from tritonclient.utils import InferenceServerException

        model = student_model_name(agent_id)
        client = await self._get()
        try:
            text = prompt_json(messages, tools)
        except ValueError as exc:  # tools that are not JSON: the student cannot read them (nor can the teacher)
            self.failures[agent_id] += 1
            raise StudentUnavailable(f"{model}: the request's tools are not JSON: {exc}") from exc
        prompt = grpcclient.InferInput("PROMPT", [1, 1], "BYTES")
        prompt.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
        # No outputs named: Triton returns every output the version has, so a version published before the
        # token counts existed still answers (its counts are then None).
        outputs = None
        t0 = time.perf_counter()
        try:
            try:
                result = await client.infer(
                    model,
                    [prompt],
                    model_version=str(version) if version else "",
                    outputs=outputs,
                    client_timeout=self.timeout_s,
                )
            except InferenceServerException as first:
                if not retry_with_latest(version, first.status()):
                    raise
                # A hot swap: Triton serves the new version (and unloads the old) a moment before the router
                # reads the promotion. The latest version answers instead; the response names which one did.
                result = await client.infer(
                    model, [prompt], model_version="", outputs=outputs, client_timeout=self.timeout_s
                )
        except InferenceServerException as exc:
            self.failures[agent_id] += 1
            raise StudentUnavailable(f"{model} at {self.grpc_url}: {exc.message()}") from exc
        except Exception as exc:  # connection refused, timeouts, cancelled channels
            self.failures[agent_id] += 1
            raise StudentUnavailable(f"{model} at {self.grpc_url}: {exc!r}") from exc
        latency_ms = (time.perf_counter() - t0) * 1000
        text = result.as_numpy("TEXT").reshape(-1)[0]
        confidence = float(result.as_numpy("CONFIDENCE").reshape(-1)[0])
        response = result.get_response()
        return StudentAnswer(
            text=text.decode() if isinstance(text, bytes) else str(text),
            confidence=confidence,
            model=model,
            model_version=str(response.model_version),
            latency_ms=latency_ms,
            input_tokens=_count(result, "INPUT_TOKENS"),
            output_tokens=_count(result, "OUTPUT_TOKENS"),
            forward_passes=_count(result, "FORWARD_PASSES"),
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
