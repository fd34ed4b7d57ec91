"""The OpenAI-compatible gateway: ``POST /v1/chat/completions`` (``model`` names the agent) and ``GET
/v1/models``. Each request goes to ``flywheel.requests`` like any client's, and the router's response comes
back in the OpenAI shape (``content`` or ``tool_calls``, ``usage``, ``finish_reason``; ``stream: true`` as
server-sent events), with who served it and the model version in ``X-Flywheel-*`` headers. Errors are
OpenAI-style (``{"error": {...}}``) with the status codes the SDKs expect.

API keys per agent (``FLYWHEEL_GATEWAY_API_KEYS`` and/or ``FLYWHEEL_GATEWAY_KEYS_FILE``; never logged); without
any, the gateway serves loopback only. Run: ``python -m services.gateway`` (or ``flywheel run gateway``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
from pathlib import Path
from urllib.parse import urlsplit

import yaml
from aiohttp import web

from services.client import FlywheelClient
from services.core.agents import load_agents
from services.core.health import clear_ready, mark_ready
from services.core.network import public_bind_refusal
from services.core.settings import Settings, SettingsError, url_port
from services.openai_shape import ShapeError, completion, error_body, model_list, request_from_body, stream_chunks

log = logging.getLogger("flywheel.gateway")
SERVICE = "gateway"
MAX_BODY = 8 << 20


class Keys:
    """Which API keys may use which agent ("*" for every agent). Empty: no key needed (loopback only)."""

    def __init__(self, by_agent: dict[str, list[str]]) -> None:
        self.by_agent = {agent: [k for k in keys if k] for agent, keys in by_agent.items()}

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        by_agent: dict[str, list[str]] = {}
        if settings.gateway_api_keys is not None:
            for item in settings.gateway_api_keys.get_secret_value().split(","):
                agent, sep, key = item.strip().partition("=")
                if not sep or not agent or not key:
                    raise SettingsError("gateway_api_keys (FLYWHEEL_GATEWAY_API_KEYS): expected agent=key[,agent=key]")
                by_agent.setdefault(agent, []).append(key)
        if settings.gateway_keys_file is not None:
            try:
                data = yaml.safe_load(Path(settings.gateway_keys_file).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise SettingsError(f"gateway_keys_file {settings.gateway_keys_file}: {exc}") from exc
            if not isinstance(data, dict):
                raise SettingsError(f"gateway_keys_file {settings.gateway_keys_file}: expected {{agent: [keys]}}")
            for agent, keys in data.items():
                by_agent.setdefault(str(agent), []).extend(str(k) for k in (keys if isinstance(keys, list) else [keys]))
        return cls(by_agent)

    @property
    def required(self) -> bool:
        return any(self.by_agent.values())

    def allows(self, key: str, agent: str) -> bool:
        candidates = [*self.by_agent.get(agent, []), *self.by_agent.get("*", [])]
        return any(hmac.compare_digest(key.encode(), k.encode()) for k in candidates)

    def agents_for(self, key: str, agents: list[str]) -> list[str]:
        return [a for a in agents if not self.required or self.allows(key, a)]


class Gateway:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.agents = load_agents(settings.agents_file)
        self.keys = Keys.from_settings(settings)
        self.client = FlywheelClient(settings)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        await self.client.start()
        mark_ready(self.settings, SERVICE)

    async def _stop(self, app: web.Application) -> None:
        clear_ready(self.settings, SERVICE)
        await self.client.close()

    # Handlers ------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        key = _bearer(request)
        if self.keys.required and not key:
            return _error(
                401, "Missing API key: send Authorization: Bearer <key>", "invalid_request_error", "invalid_api_key"
            )
        return web.json_response(model_list(self.keys.agents_for(key, sorted(self.agents.agents))))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "The body is not valid JSON", "invalid_request_error")
        try:
            flywheel_request = request_from_body(body, request.headers.get("X-Flywheel-Conversation-Id"))
        except (ShapeError, ValueError) as exc:
            return _error(400, f"Invalid request: {exc}", "invalid_request_error")
        agent = flywheel_request.agent_id
        if agent not in self.agents.agents:
            known = ", ".join(sorted(self.agents.agents))
            return _error(
                404,
                f"The model '{agent}' does not exist: it names an agent ({known})",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        if self.keys.required and not self.keys.allows(_bearer(request), agent):
            return _error(401, f"Incorrect API key for '{agent}'", "invalid_request_error", "invalid_api_key")
        try:
            response = await self.client.submit(flywheel_request, timeout_s=self.settings.gateway_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            return _error(504, f"No answer within {self.settings.gateway_timeout_s:g} s", "timeout", "timeout")
        if response.error:
            return _error(502, f"The flywheel could not answer: {response.error}", "api_error", "upstream_error")
        done = completion(response, flywheel_request)
        headers = {
            "X-Flywheel-Served-By": response.served_by,
            "X-Flywheel-Model-Version": response.model_version or "",
            "X-Flywheel-Request-Id": response.request_id,
        }
        if not body.get("stream"):
            return web.json_response(done, headers=headers)
        stream = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await stream.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for chunk in stream_chunks(done):
            if not include_usage:
                chunk.pop("usage", None)
            await stream.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream


def _bearer(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("api-key", "")


def _error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, code, param), status=status)


def unsafe_bind(host: str, keys: Keys) -> str | None:
    return public_bind_refusal(
        host,
        keys.required,
        "API keys",
        "use every agent",
        "set FLYWHEEL_GATEWAY_API_KEYS or FLYWHEEL_GATEWAY_KEYS_FILE, or bind 127.0.0.1",
    )


async def _main(settings: Settings) -> None:
    gateway = Gateway(settings)
    url = urlsplit(settings.gateway_url)
    host, port = url.hostname or "127.0.0.1", url_port(settings.gateway_url, 8300)
    refusal = unsafe_bind(host, gateway.keys)
    if refusal:
        raise SettingsError(refusal)
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info(
        "gateway: OpenAI-compatible API on %s/v1 (agents: %s)", settings.gateway_url, ", ".join(gateway.agents.agents)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load()
        asyncio.run(_main(settings))
    except SettingsError as exc:
        log.error("gateway: %s", exc)
        raise SystemExit(2) from None
