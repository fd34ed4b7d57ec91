"""An async client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, LiteLLM, the
local stack's reference teacher...).

Only the fields every such server understands are sent and read, so no vendor-specific option is needed:
request ``model``, ``messages``, ``tools``, ``temperature``, ``max_tokens``; response ``choices[0].message``
(``content``, ``tool_calls``), ``finish_reason``, ``usage``. Rate limits (429), request timeouts (408), conflicts
(409), server errors (5xx) and network failures are retried with exponential backoff and jitter, honouring
``Retry-After`` / ``retry-after-ms``; any other refusal is a non-retryable ``TeacherError`` carrying the status
and the server's own error message. The API key is sent as ``Authorization: Bearer`` and appears in no message,
log or repr.

The HTTP layer is aiohttp, not httpx: measured against the reference teacher server on this 2-core machine
(64 requests in flight, instant answers, client and server sharing the cores), httpx.AsyncClient 0.28 reached
about 360 requests/s with a p95 of 580 ms (its connection pool degrades with concurrency, encode/httpx#3215),
httpx over an aiohttp transport about 1,900/s, and this client about 8,000/s with a p95 of 9 ms. The router,
which must sustain 2,000 requests/s per process with the teacher in its path, cannot afford the difference.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import SecretStr

from services.core.records import ChatMessage, ToolCall
from services.teacher.base import Completion, TeacherError, approx_tokens

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx
MAX_RETRY_AFTER_S = 60.0  # a server asking for a longer pause gets this; the caller's timeout budget matters more
MAX_BACKOFF_S = 8.0
ERROR_TEXT_LIMIT = 500


def _retryable(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI, Azure) or ``Retry-After`` (seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff_delay(attempt: int, base_s: float, retry_after_s: float | None, rng: random.Random) -> float:
    """The pause before retry number ``attempt`` (0-based): the server's Retry-After when given (capped),
    else exponential backoff with "equal jitter" (half fixed, half random) so that many clients throttled at
    the same moment do not come back in lockstep."""
    if retry_after_s is not None:
        return min(retry_after_s, MAX_RETRY_AFTER_S)
    ceiling = min(MAX_BACKOFF_S, base_s * (2**attempt))
    return ceiling / 2 + rng.random() * ceiling / 2


def server_error_message(body: bytes, limit: int = ERROR_TEXT_LIMIT) -> str:
    """The server's own explanation from an error body: OpenAI ``{"error": {"message"}}``, vLLM
    ``{"message"}``, Ollama ``{"error": "..."}``, else the raw text (shortened)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:limit]
        if isinstance(err, str) and err:
            return err[:limit]
        if data.get("message"):
            return str(data["message"])[:limit]
        if data.get("detail"):
            return str(data["detail"])[:limit]
    return (text or "(empty body)")[:limit]


def tools_payload(tools: str | None) -> list[dict[str, Any]] | None:
    """The request's tool JSON text as OpenAI ``tools``. Accepts the OpenAI form
    (``[{"type": "function", "function": {...}}]``), bare function definitions (``[{"name": ..., ...}]``), bare
    tool names (``["card_block", ...]``) or an object with a ``tools`` list; raises ValueError otherwise."""
    if tools is None or not tools.strip():
        return None
    data = json.loads(tools)
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError("tools must be a JSON list of tool definitions")
    out: list[dict[str, Any]] = []
    for item in data:
        if isinstance(item, str):
            out.append({"type": "function", "function": {"name": item, "parameters": {"type": "object"}}})
        elif isinstance(item, dict) and "type" in item:
            out.append(item)
        elif isinstance(item, dict) and "name" in item:
            out.append({"type": "function", "function": item})
        else:
            raise ValueError(f"cannot read tool definition {item!r}")
    return out or None


def _proxy_for(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to ``url`` (None when unset or NO_PROXY exempts the host)."""
    parts = urlsplit(url)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def message_payload(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def parse_completion(data: Any, *, requested_model: str, prompt_chars: int, latency_ms: float) -> Completion:
    """A ``Completion`` from a chat-completions response body; raises ValueError on a body without a choice."""
    if not isinstance(data, dict):
        raise ValueError("the response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("the response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts (some servers answer like this)
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    calls: list[ToolCall] = []
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):  # Ollama's native API gives an object; the contract is a JSON string
            args = json.dumps(args, separators=(",", ":"))
        calls.append(ToolCall(id=str(call.get("id") or f"call_{i}"), name=str(fn.get("name", "")), arguments=args))
    usage = data.get("usage") or {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    # Servers that report no usage (some proxies) get an approximate count, so cost accounting still works.
    if not isinstance(prompt_tokens, int):
        prompt_tokens = (prompt_chars + 3) // 4
    if not isinstance(completion_tokens, int):
        completion_tokens = approx_tokens(content) + sum(approx_tokens(c.name + c.arguments) for c in calls)
    return Completion(
        content=content if content is None else str(content),
        tool_calls=calls,
        model=str(data.get("model") or requested_model),
        input_tokens=prompt_tokens,
        output_tokens=completion_tokens,
        latency_ms=latency_ms,
        finish_reason=choice.get("finish_reason"),
    )


class OpenAICompatibleTeacher:
    """The teacher behind an OpenAI-compatible ``/chat/completions`` endpoint at ``base_url`` (for example
    ``https://api.openai.com/v1``, ``http://vllm:8000/v1``, ``http://127.0.0.1:11434/v1`` for Ollama).

    ``timeout_s`` bounds one attempt (connection, waiting for a pooled connection and the whole answer);
    ``max_retries`` retries follow with backoff. ``headers`` are sent with every request (e.g. an
    organisation header, or the reference teacher's test headers). The HTTP session is opened on first use,
    in the running event loop, and closed by ``aclose``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr | str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 0.25,
        max_connections: int = 200,
        headers: Mapping[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_connections = max_connections
        self._rng = random.Random(seed)
        self._headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatibleTeacher({self.base_url!r})"

    async def __aenter__(self) -> OpenAICompatibleTeacher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                # connect fails fast so an unreachable teacher is retried (and reported) quickly; total covers
                # a slow model's whole answer.
                timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=min(self.timeout_s, 10.0)),
                # Proxies come from the environment once, at first use (_proxy_for): aiohttp's own trust_env
                # also reads ~/.netrc in a worker thread on every request, which cut throughput by 4x.
                proxy=_proxy_for(self.url),
                raise_for_status=False,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        model: str,
        tools: str | None = None,
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> Completion:
        try:
            tool_list = tools_payload(tools)
        except ValueError as exc:
            raise TeacherError(f"teacher {self.url}: the request's tools are not usable: {exc}") from exc
        body: dict[str, Any] = {
            "model": model,
            "messages": [message_payload(m) for m in messages],
            "temperature": temperature,
        }
        if tool_list:
            body["tools"] = tool_list
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        payload = json.dumps(body, separators=(",", ":")).encode()
        prompt_chars = sum(len(m.content) for m in messages)
        session = self._get_session()

        start = time.perf_counter()
        attempt = 0
        while True:
            status: int | None = None
            retry_after: float | None = None
            try:
                async with session.post(self.url, data=payload) as resp:
                    status = resp.status
                    raw = await resp.read()
                    headers = resp.headers
            except asyncio.TimeoutError:
                cause = f"no answer within {self.timeout_s:g}s"
            except aiohttp.InvalidURL as exc:
                raise TeacherError(f"teacher {self.url}: not a usable URL ({exc})") from exc
            except aiohttp.ClientConnectorError as exc:
                cause = f"cannot connect ({exc.os_error or exc})"
            except (aiohttp.ClientError, OSError) as exc:
                cause = f"connection failed ({type(exc).__name__}: {exc or 'no detail'})"
            else:
                if status < 300:
                    try:
                        return parse_completion(
                            json.loads(raw),
                            requested_model=model,
                            prompt_chars=prompt_chars,
                            latency_ms=(time.perf_counter() - start) * 1000.0,
                        )
                    except ValueError as exc:
                        raise TeacherError(
                            f"teacher {self.url}: unreadable answer for model {model!r}: {exc}", status=status
                        ) from exc
                cause = f"HTTP {status}: {server_error_message(raw)}"
                if not _retryable(status):
                    raise TeacherError(f"teacher {self.url} refused the request: {cause}", status=status)
                retry_after = parse_retry_after(headers)
            if attempt >= self.max_retries:
                raise TeacherError(
                    f"teacher {self.url} failed after {attempt + 1} attempts: {cause}", status=status, retryable=True
                )
            delay = backoff_delay(attempt, self.backoff_s, retry_after, self._rng)
            log.warning("teacher %s: %s; retry %d/%d in %.2fs", self.url, cause, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
            attempt += 1
