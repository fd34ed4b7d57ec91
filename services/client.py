"""A small client for applications: ``submit(request) -> response`` over Kafka, async and sync.

It produces the request to ``flywheel.requests`` and waits for the response with the same request_id on the
reply topic (``flywheel.responses`` unless the request names another). Many requests may be in flight at
once; each waits for its own answer.

    async with FlywheelClient(Settings.load()) as client:
        response = await client.submit(InferenceRequest(conversation_id="c1", agent_id="support-bot",
                                                        messages=[ChatMessage(role="user", content="hi")]))

    with SyncFlywheelClient(Settings.load()) as client:
        response = client.submit(request)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiokafka import TopicPartition

from services.core import topics
from services.core.codec import AvroCodec, DecodeError
from services.core.kafka import Publisher, create_consumer, create_producer
from services.core.records import InferenceRequest, InferenceResponse
from services.core.settings import Settings

T = TypeVar("T")


class FlywheelClient:
    def __init__(self, settings: Settings, reply_topic: str = topics.RESPONSES.name) -> None:
        self.settings = settings
        self.reply_topic = reply_topic
        self.codec = AvroCodec()
        self._waiting: dict[str, asyncio.Future[InferenceResponse]] = {}
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self._producer = create_producer(self.settings)
        await self._producer.start()
        self._publisher = Publisher(self._producer, self.codec)
        self._consumer = create_consumer(self.settings, None)
        await self._consumer.start()
        await self._consumer.topics()  # fetches the cluster's metadata
        partitions = self._consumer.partitions_for_topic(self.reply_topic)
        if not partitions:
            raise RuntimeError(f"reply topic {self.reply_topic} does not exist at {self.settings.kafka_bootstrap}")
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # pin the end positions now, before any request goes out
            await self._consumer.position(tp)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            for messages in (await self._consumer.getmany(timeout_ms=200)).values():
                for msg in messages:
                    try:
                        response = self.codec.decode(msg.value, InferenceResponse)
                    except DecodeError:
                        continue  # not ours to judge: the reply topic may carry other records
                    future = self._waiting.pop(response.request_id, None)
                    if future is not None and not future.done():
                        future.set_result(response)

    async def submit(self, request: InferenceRequest, timeout_s: float = 120.0) -> InferenceResponse:
        """Send one request and wait for its response. Raises TimeoutError naming the request."""
        if request.reply_topic not in (None, self.reply_topic):
            raise ValueError(f"this client reads {self.reply_topic}; the request asks for {request.reply_topic}")
        future: asyncio.Future[InferenceResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request.request_id] = future
        try:
            reply_topic = None if self.reply_topic == topics.RESPONSES.name else self.reply_topic
            if reply_topic != request.reply_topic:
                request = request.model_copy(update={"reply_topic": reply_topic})
            await self._publisher.send(topics.REQUESTS, request, key=request.conversation_id)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no response to request {request.request_id} (agent {request.agent_id}) within {timeout_s:.0f}s; "
                "is the router running? (flywheel status)"
            ) from None
        finally:
            self._waiting.pop(request.request_id, None)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    async def __aenter__(self) -> FlywheelClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncFlywheelClient:
    """The same client for synchronous code: an event loop runs in a background thread."""

    def __init__(self, settings: Settings, reply_topic: str = topics.RESPONSES.name) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="flywheel-client", daemon=True)
        self._thread.start()
        self._client = FlywheelClient(settings, reply_topic)
        self._run(self._client.start())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, request: InferenceRequest, timeout_s: float = 120.0) -> InferenceResponse:
        return self._run(self._client.submit(request, timeout_s))

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> SyncFlywheelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
