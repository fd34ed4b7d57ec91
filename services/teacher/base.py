"""The one interface the router codes against for its teacher, whatever answers behind it.

Two implementations live beside each other: ``OpenAICompatibleTeacher`` (any OpenAI-compatible chat-completions
endpoint: OpenAI, vLLM, Ollama, the local stack's reference teacher server) and ``ReferenceTeacher`` (the
offline stand-in for a frontier model, in process; the same logic the reference teacher server serves over
HTTP). Services always get their teacher from ``teacher_from_settings``, i.e. over HTTP, so the local stack and
production take the same path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from services.core.records import ChatMessage, ToolCall

if TYPE_CHECKING:
    from services.core.settings import Settings


@dataclass(frozen=True)
class Completion:
    """One teacher answer. ``latency_ms`` is what the caller waited, retries included."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    finish_reason: str | None = None


class TeacherError(RuntimeError):
    """The teacher could not answer. The message names the URL and the cause (never a credential).

    ``status`` is the HTTP status when the server answered, ``retryable`` tells whether the same request may
    succeed later (rate limit, server error, network), as opposed to a request the server will always refuse.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@runtime_checkable
class Teacher(Protocol):
    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> Completion:
        """Answer a conversation. ``tools`` is the request's JSON text of tool definitions (OpenAI format)."""
        ...

    async def aclose(self) -> None: ...


def approx_tokens(text: str | None) -> int:
    """An approximate token count (about 4 characters per token for English BPE vocabularies), used where
    a server reports no usage and by the reference teacher; never a billing-grade figure."""
    if not text:
        return 0
    return (len(text) + 3) // 4


def teacher_from_settings(settings: Settings, *, model_timeout_s: float = 60.0) -> Teacher:
    """The OpenAI-compatible client for ``settings.teacher_url`` (the reference teacher on the local stack)."""
    from services.teacher.openai_client import OpenAICompatibleTeacher

    return OpenAICompatibleTeacher(settings.teacher_url, settings.teacher_api_key, timeout_s=model_timeout_s)
