"""The teacher behind any OpenAI-compatible chat-completions endpoint (OpenAI, Azure OpenAI, vLLM, Ollama,
LiteLLM, ``transformers serve``, the local stack's reference teacher...), on the official ``openai`` SDK.

The SDK does the HTTP: retries of 408/409/429/5xx and network failures with exponential backoff and jitter,
``Retry-After``/``retry-after-ms``, timeouts, error types. What the platform adds here:

* **Per-agent request options** (``TeacherOptions``, from the agent's ``teacher`` settings): reasoning models get
  ``max_completion_tokens`` and no ``temperature`` (they answer 400 to both), ``response_format`` comes from the
  agent's output schema, extra headers and query parameters (Azure's ``api-version``) go with every request, and
  the key can travel in another header than ``Authorization`` (Azure's ``api-key``).
* **Token accounting** where a server reports no ``usage`` (some proxies): an approximate count, so cost
  accounting still works; arguments given as an object (Ollama) become the contract's JSON text.
* **Errors that name the teacher**: ``TeacherError`` carries the URL, the HTTP status, the server's own message
  and whether a later retry may succeed. The key appears in no message, log or repr.

The transport is aiohttp (``openai.DefaultAioHttpClient``): measured on this 2-core machine, the SDK's default
httpx transport degrades badly with many requests in flight (encode/httpx#3215), which the router cannot afford.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2
import openai
from pydantic import SecretStr

from services.core.records import ChatMessage, ToolCall
from services.openai_shape import tool_calls_payload
from services.teacher.base import Completion, TeacherError, TeacherOptions, approx_tokens

# The SDK's HTTP layer logs every request at INFO: a line per teacher call, thousands a second in the router.
for _name in ("httpx2", "httpx"):
    logging.getLogger(_name).setLevel(logging.WARNING)

ERROR_TEXT_LIMIT = 500
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx: what the SDK retries


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


def message_payload(message: ChatMessage) -> dict[str, Any]:
    """A message as the API takes it; an assistant turn's tool calls go back as they came."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = tool_calls_payload(message.tool_calls)
        out["content"] = message.content or None  # "" is refused beside tool calls by some servers
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def request_body(
    messages: Sequence[ChatMessage],
    *,
    model: str,
    tools: list[dict[str, Any]] | None,
    temperature: float,
    max_tokens: int | None,
    options: TeacherOptions,
) -> dict[str, Any]:
    """The chat-completions body: only what this agent's teacher accepts."""
    body: dict[str, Any] = {"model": model, "messages": [message_payload(m) for m in messages]}
    if options.reasoning:
        if max_tokens is not None:
            body["max_completion_tokens"] = max_tokens
        if options.reasoning_effort:
            body["reasoning_effort"] = options.reasoning_effort
    else:
        body["temperature"] = temperature
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
    if tools:
        body["tools"] = tools
    if options.response_format is not None:
        body["response_format"] = options.response_format
    return body


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


def _connection_refusal(exc: BaseException) -> OSError | None:
    """The OS error under a failed connection, if any: the aiohttp transport reports a refused connection as a
    connect *timeout*, which would tell the operator the wrong story."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return seen
        seen = seen.__cause__ or getattr(seen, "os_error", None)
    return None


class OpenAICompatibleTeacher:
    """The teacher behind an OpenAI-compatible ``/chat/completions`` endpoint at ``base_url`` (for example
    ``https://api.openai.com/v1``, ``http://vllm:8000/v1``, ``http://127.0.0.1:11434/v1`` for Ollama).

    ``timeout_s`` bounds one attempt; ``max_retries`` retries follow with the SDK's backoff. ``headers`` go with
    every request (an organisation header, the reference teacher's test headers); ``api_key_header`` sends the
    key in that header instead of ``Authorization: Bearer`` (Azure: ``api-key``). The SDK client is made on first
    use, in the running event loop, and closed by ``aclose``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr | str | None = None,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        headers: Mapping[str, str] | None = None,
        api_key_header: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        self._headers = dict(headers or {})
        # The SDK wants a key (and would take OPENAI_API_KEY from the environment): without one of this teacher's
        # own for the Authorization header, a placeholder goes in and each request leaves the header out.
        self._key, self._omit_authorization = "unused", True
        if key and api_key_header and api_key_header.lower() != "authorization":
            self._headers[api_key_header] = key
        elif key:
            self._key, self._omit_authorization = key, False
        self._client: openai.AsyncOpenAI | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAICompatibleTeacher({self.base_url!r})"

    async def __aenter__(self) -> OpenAICompatibleTeacher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _get_client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            timeout = openai.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._key,
                organization=None,
                project=None,
                timeout=timeout,
                max_retries=self.max_retries,
                default_headers=self._headers,
                http_client=openai.DefaultAioHttpClient(timeout=timeout),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

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
        opts = options or TeacherOptions()
        try:
            tool_list = tools_payload(tools)
        except ValueError as exc:
            raise TeacherError(f"teacher {self.url}: the request's tools are not usable: {exc}") from exc
        body = request_body(
            messages, model=model, tools=tool_list, temperature=temperature, max_tokens=max_tokens, options=opts
        )
        start = time.perf_counter()
        try:
            # The SDK's documented way to send a body as built (client.post): chat.completions.create() first walks
            # every parameter through its typed transform, which took 37 % of a call's CPU and cut the router's
            # teacher path from 1,556 to 635 requests/s. The raw response's JSON is read leniently
            # (parse_completion), as servers differ in the details.
            options: dict[str, Any] = {}
            if headers := self._request_headers(opts):
                options["headers"] = headers
            if opts.query:
                options["params"] = dict(opts.query)
            raw = await self._get_client().post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                options=options,  # type: ignore[arg-type]
            )
            data = json.loads(raw.content)
        except openai.APIConnectionError as exc:  # APITimeoutError among them
            refused = _connection_refusal(exc)
            if refused is not None:
                raise self._gave_up(f"cannot connect ({refused})", None) from exc
            if isinstance(exc, openai.APITimeoutError):
                raise self._gave_up(f"no answer within {self.timeout_s:g}s", None) from exc
            raise self._gave_up(f"connection failed ({exc.__cause__ or exc})", None) from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            cause = f"HTTP {status}: {server_error_message(exc.response.content)}"
            if status in RETRYABLE_STATUS or status >= 500:
                raise self._gave_up(cause, status) from exc
            raise TeacherError(f"teacher {self.url} refused the request: {cause}", status=status) from exc
        except ValueError as exc:
            raise TeacherError(f"teacher {self.url}: unreadable answer for model {model!r}: {exc}") from exc
        try:
            return parse_completion(
                data,
                requested_model=model,
                prompt_chars=sum(len(m.content) for m in messages),
                latency_ms=(time.perf_counter() - start) * 1000.0,
            )
        except ValueError as exc:
            raise TeacherError(
                f"teacher {self.url}: unreadable answer for model {model!r}: {exc}", status=raw.status_code
            ) from exc

    def _request_headers(self, opts: TeacherOptions) -> dict[str, Any] | None:
        headers: dict[str, Any] = dict(opts.headers)
        if self._omit_authorization:
            headers["Authorization"] = openai.omit
        return headers or None

    def _gave_up(self, cause: str, status: int | None) -> TeacherError:
        # The SDK made every attempt it was allowed before raising (max_retries retries after the first).
        return TeacherError(
            f"teacher {self.url} failed after {self.max_retries + 1} attempts: {cause}", status=status, retryable=True
        )
