"""The one interface the router codes against for its teacher, whatever answers behind it.

Two implementations live beside each other: ``OpenAICompatibleTeacher`` (any OpenAI-compatible chat-completions
endpoint: OpenAI, vLLM, Ollama, the local stack's reference teacher server) and ``ReferenceTeacher`` (the
offline stand-in for a frontier model, in process; the same logic the reference teacher server serves over
HTTP). Services always get their teacher from ``teacher_from_settings``, i.e. over HTTP, so the local stack and
production take the same path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import SecretStr

from services.core.records import ChatMessage, ToolCall

if TYPE_CHECKING:
    from services.core.agents import AgentConfig, TeacherConfig
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


@dataclass(frozen=True)
class TeacherOptions:
    """How one agent's requests are shaped for its teacher (from its ``teacher`` settings: ``teacher_options``)."""

    reasoning: bool = False  # max_completion_tokens and reasoning_effort, no temperature
    reasoning_effort: str | None = None
    response_format: dict[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)


def teacher_options(agent: AgentConfig) -> TeacherOptions:
    """An agent's request options; ``response_format`` json_schema carries the agent's output schema."""
    cfg = agent.teacher
    response_format: dict[str, Any] | None = None
    if cfg.response_format == "json_object":
        response_format = {"type": "json_object"}
    elif cfg.response_format == "json_schema":
        response_format = {  # agent ids are already valid schema names ([a-z0-9_-], at most 63)
            "type": "json_schema",
            "json_schema": {"name": agent.agent_id, "schema": agent.output.json_schema, "strict": False},
        }
    return TeacherOptions(
        reasoning=cfg.reasoning,
        reasoning_effort=cfg.reasoning_effort,
        response_format=response_format,
        headers=dict(cfg.headers),
        query=dict(cfg.query),
    )


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
        options: TeacherOptions | None = None,
    ) -> Completion:
        """Answer a conversation. ``tools`` is the request's JSON text of tool definitions (OpenAI format);
        ``options`` shape the request for the agent's teacher (``teacher_options``)."""
        ...

    async def aclose(self) -> None: ...


def approx_tokens(text: str | None) -> int:
    """An approximate token count (about 4 characters per token for English BPE vocabularies), used where
    a server reports no usage and by the reference teacher; never a billing-grade figure."""
    if not text:
        return 0
    return (len(text) + 3) // 4


def messages_tokens(messages: Iterable[ChatMessage]) -> int:
    """The messages' text in approximate tokens (where no model reported what it read)."""
    return approx_tokens(" ".join(m.content or "" for m in messages))


def teacher_from_settings(settings: Settings, *, model_timeout_s: float = 60.0) -> Teacher:
    """The OpenAI-compatible client for ``settings.teacher_url`` (the reference teacher on the local stack)."""
    from services.teacher.openai_client import OpenAICompatibleTeacher

    return OpenAICompatibleTeacher(settings.teacher_url, settings.teacher_api_key, timeout_s=model_timeout_s)


def _same_url(url: str) -> str:
    return url.strip().rstrip("/")


def _secret(key: SecretStr | None) -> str | None:
    return None if key is None else key.get_secret_value()


def teacher_credentials(
    settings: Settings, agents: Iterable[tuple[str, TeacherConfig]], environ: Mapping[str, str]
) -> dict[str, SecretStr | None]:
    """The API key each teacher URL gets, keyed by URL ("" is the global one): ``FLYWHEEL_TEACHER_API_KEY`` goes
    to ``FLYWHEEL_TEACHER_URL`` only; an agent's own ``teacher.url`` gets the variable its ``teacher.api_key_env``
    names, or no key. A named variable that is not set, or two keys for one URL, is an error naming the agent."""
    keys: dict[str, SecretStr | None] = {"": settings.teacher_api_key}
    owner: dict[str, str] = {}
    for agent_id, teacher in agents:
        url = teacher_address(settings, teacher)
        if not url:
            continue  # the global teacher, with the global key
        key = None
        if teacher.api_key_env:
            value = environ.get(teacher.api_key_env)
            if not value:
                raise ValueError(
                    f"agents.{agent_id}.teacher.api_key_env: the environment variable "
                    f"{teacher.api_key_env} is not set (it holds the key of {teacher.url})"
                )
            key = SecretStr(value)
        if url in owner and _secret(keys[url]) != _secret(key):
            raise ValueError(
                f"agents.{agent_id}.teacher: {teacher.url} is also the teacher of agent {owner[url]} "
                "with another key (teacher.api_key_env): one URL, one key"
            )
        keys[url], owner[url] = key, agent_id
    return keys


def teachers_for(
    settings: Settings,
    agents: Iterable[tuple[str, TeacherConfig]],
    environ: Mapping[str, str] | None = None,
    *,
    model_timeout_s: float = 60.0,
) -> dict[str, Teacher]:
    """One client per teacher URL, each with its own key (``teacher_credentials``); "" is the global teacher.
    Look an agent's teacher up with ``teacher_address``."""
    from services.teacher.openai_client import OpenAICompatibleTeacher

    agents = list(agents)
    keys = teacher_credentials(settings, agents, os.environ if environ is None else environ)
    key_headers: dict[str, tuple[str, str | None]] = {}  # url -> (agent that set it, header)
    for agent_id, teacher in agents:
        url = teacher_address(settings, teacher)
        if url in key_headers and key_headers[url][1] != teacher.api_key_header:
            raise ValueError(
                f"agents.{agent_id}.teacher.api_key_header: {url or settings.teacher_url} is also the teacher of "
                f"agent {key_headers[url][0]} with another key header: one URL, one way to send its key"
            )
        key_headers[url] = (agent_id, teacher.api_key_header)
    return {
        url: OpenAICompatibleTeacher(
            url or settings.teacher_url,
            key,
            timeout_s=model_timeout_s,
            api_key_header=key_headers.get(url, ("", None))[1],
        )
        for url, key in keys.items()
    }


def teacher_address(settings: Settings, teacher: TeacherConfig) -> str:
    """The key of ``teachers_for``'s mapping that serves an agent with this teacher config."""
    if not teacher.url or (_same_url(teacher.url) == _same_url(settings.teacher_url) and not teacher.api_key_env):
        return ""
    return _same_url(teacher.url)
