"""The reference teacher served over the OpenAI chat-completions HTTP API (aiohttp), so the router talks to it
exactly as to OpenAI, vLLM or Ollama.

Routes (``prefix`` is ``/v1`` by default, the path of FLYWHEEL_TEACHER_URL):

* ``POST {prefix}/chat/completions``: non-streaming chat completions. ``model`` chooses the workload
  (``reference/banking77``, ``reference/nlupp``; another model is a 404 in OpenAI's error format). With
  ``tools`` in the request the answer also carries one ``tool_calls`` entry (the contract's tool and its
  arguments) and ``content`` still holds the whole JSON answer, so agreement compares the same thing either
  way. ``max_tokens`` (or ``max_completion_tokens``) cuts the answer as a real model would.
* ``GET {prefix}/models``, ``GET {prefix}/models/{id}``, ``GET /health``.

Per-request headers (for tests and benchmarks): ``X-Reference-Flaws: 0`` switches flaws off,
``X-Reference-Latency-Ms`` sets the median latency (0 = instant), ``X-Reference-Latency-Sigma`` its spread
(0 = exactly the median). Responses carry ``X-Reference-Flaw`` (the flaw kind or ``none``) and
``X-Reference-Match`` (``exact``, ``nearest`` or ``hashed``), diagnostics a real teacher would not give.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import secrets
import time
from typing import Any

from aiohttp import web

from services.teacher.base import approx_tokens
from services.teacher.reference import ReferenceTeacher, UnknownModel, prompt_tokens

TEACHER_KEY: web.AppKey[ReferenceTeacher] = web.AppKey("teacher", ReferenceTeacher)
OWNER = "slm-flywheel-reference-teacher"
_FALSE = frozenset({"0", "false", "no", "off"})


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


def error_response(message: str, *, status: int, param: str | None = None, code: str | None = None) -> web.Response:
    """OpenAI's error shape, which every OpenAI-compatible client knows how to read."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI content parts (``[{"type": "text", "text": ...}]``), or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise BadRequest("message content must be a string, a list of content parts or null", "messages")


def _header_float(request: web.Request, name: str) -> float | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"header {name} must be a non-negative number, got {raw!r}")
    return value


def parse_chat_request(body: Any) -> tuple[str, list[tuple[str, str]], Any, int | None]:
    """(model, [(role, text)], tools, max_tokens) from a chat-completions body; BadRequest names the problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest(
            'streaming is not supported by the reference teacher: send "stream": false (or leave it out)',
            "stream",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required (a string)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    pairs = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a 'role'", "messages")
        pairs.append((m["role"], _text(m.get("content"))))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise BadRequest("'max_tokens' must be a positive integer", "max_tokens")
    return model, pairs, body.get("tools"), max_tokens


class _Ids:
    """Cheap unique ids (a random prefix per process and a counter), not uuid4 per request."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_ids = _Ids()


async def chat_completions(request: web.Request) -> web.Response:
    teacher = request.app[TEACHER_KEY]
    try:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
        model, pairs, tools, max_tokens = parse_chat_request(body)
        flaws = request.headers.get("X-Reference-Flaws", "1").strip().lower() not in _FALSE
        median = _header_float(request, "X-Reference-Latency-Ms")
        sigma = _header_float(request, "X-Reference-Latency-Sigma")
        try:
            # answer_chat: the last user message's answer, or a plan when a system message asks for one.
            ans = teacher.answer_chat(model, pairs, tools=bool(tools), flaws=flaws, max_tokens=max_tokens)
        except UnknownModel as exc:
            raise BadRequest(str(exc), "model", status=404, code="model_not_found") from exc
    except BadRequest as exc:
        return error_response(str(exc), status=exc.status, param=exc.param, code=exc.code)

    delay_ms = teacher.sample_latency_ms(median, sigma)
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000.0)

    ident = _ids.next()
    message: dict[str, Any] = {"role": "assistant", "content": ans.content}
    if ans.tool_call is not None:
        message["tool_calls"] = [
            {
                "id": f"call_{ident}",
                "type": "function",
                "function": {"name": ans.tool_call[0], "arguments": ans.tool_call[1]},
            }
        ]
    tools_text = json.dumps(tools) if tools else None
    usage_in = prompt_tokens((text for _, text in pairs), tools_text)
    usage_out = approx_tokens(ans.content)
    payload = {
        "id": f"chatcmpl-{ident}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": OWNER,
        "choices": [{"index": 0, "message": message, "finish_reason": ans.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": usage_in, "completion_tokens": usage_out, "total_tokens": usage_in + usage_out},
    }
    headers = {"X-Reference-Flaw": ans.flaw or "none", "X-Reference-Match": ans.match}
    return web.Response(text=json.dumps(payload), content_type="application/json", headers=headers)


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": OWNER}


async def list_models(request: web.Request) -> web.Response:
    models = request.app[TEACHER_KEY].models
    return web.json_response({"object": "list", "data": [_model_card(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    teacher = request.app[TEACHER_KEY]
    model = request.match_info["model"]
    if model not in teacher.models:
        return error_response(
            str(UnknownModel(model, teacher.models)), status=404, param="model", code="model_not_found"
        )
    return web.json_response(_model_card(model))


async def health(request: web.Request) -> web.Response:
    teacher = request.app[TEACHER_KEY]
    return web.json_response(
        {
            "status": "ok",
            "teacher": "reference",
            "models": teacher.models,
            "latency_ms": teacher.latency_ms,
            "flaw_rate": teacher.flaw_rate,
            "seed": teacher.seed,
        }
    )


def create_app(teacher: ReferenceTeacher, prefix: str = "/v1") -> web.Application:
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[TEACHER_KEY] = teacher
    app.router.add_post(f"{prefix}/chat/completions", chat_completions)
    app.router.add_get(f"{prefix}/models", list_models)
    app.router.add_get(f"{prefix}/models/{{model:.+}}", get_model)
    app.router.add_get("/health", health)
    if prefix:
        app.router.add_get(f"{prefix}/health", health)
    return app
