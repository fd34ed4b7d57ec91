"""The loop shared by the services that act on the agents' lifecycles (the curator, the drift monitor): read
every lifecycle event from ClickHouse at start (the durable record), catch up with the lifecycle topics, then
follow them and do one round of work every ``check_interval_s``.

A subclass sets ``SERVICE``, implements ``step`` (blocking I/O; run in a thread) and ``publish``, and may extend
``observe``. Everything it decides comes from ``events``, so a restart neither repeats nor loses work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.core import topics
from services.core.agents import AgentsFile
from services.core.codec import AvroCodec, DecodeError
from services.core.health import clear_ready, mark_ready
from services.core.kafka import Publisher, create_follower, create_producer
from services.core.lifecycle import LifecycleEvent, event_key
from services.core.records import DatasetSnapshot, ModelEvent, RetrainTriggered
from services.core.settings import Settings

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

LIFECYCLE_TOPICS = (topics.MODELS.name, topics.RETRAIN.name, topics.DATASETS.name)


class LifecycleService:
    SERVICE: ClassVar[str]
    settings: Settings
    agents: AgentsFile
    codec: AvroCodec
    check_interval_s: float
    events: dict[tuple[str, str], LifecycleEvent]
    publisher: Publisher | None

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"flywheel.{self.SERVICE}")

    def observe(self, event: LifecycleEvent) -> None:
        if event.agent_id in self.agents.agents:
            self.events[event_key(event)] = event

    def load_history(self, ch: Client) -> None:
        from services.core.lifecycle_store import read_lifecycle_events

        for event in read_lifecycle_events(ch):
            self.observe(event)

    def _apply_messages(self, got: dict) -> int:
        n = 0
        for messages in got.values():
            for msg in messages:
                try:
                    record = self.codec.decode(msg.value)
                except DecodeError as err:
                    self.log.warning("%s: undecodable record on %s: %s", self.SERVICE, msg.topic, err)
                    continue
                if isinstance(record, ModelEvent | RetrainTriggered | DatasetSnapshot):
                    self.observe(record)
                    n += 1
        return n

    def step(self, ch: Client) -> Sequence[Any]:
        raise NotImplementedError

    async def publish(self, records: Sequence[Any]) -> None:
        raise NotImplementedError

    async def run(self, stop: asyncio.Event) -> None:
        from services.core.clickhouse import client

        ch = client(self.settings)
        producer = create_producer(self.settings)
        follower = create_follower(self.settings, None, *LIFECYCLE_TOPICS)
        try:
            await asyncio.to_thread(self.load_history, ch)
            await producer.start()
            self.publisher = Publisher(producer, self.codec)
            await follower.start()
            # Catch up with the topics before deciding anything: an event already on a topic but not yet in
            # ClickHouse (a trigger, a snapshot) must count, or its work would be done twice.
            while self._apply_messages(await follower.getmany(timeout_ms=1000)):
                pass
            mark_ready(self.settings, self.SERVICE)
            self.log.info("%s: following lifecycle topics (agents: %s)", self.SERVICE, ", ".join(self.agents.agents))
            next_check = 0.0
            while not stop.is_set():
                self._apply_messages(await follower.getmany(timeout_ms=200))
                if time.monotonic() >= next_check:
                    try:
                        await self.publish(await asyncio.to_thread(self.step, ch))
                    except Exception:  # ClickHouse or the broker down, a bad row...: log, stay up, retry later
                        self.log.exception("%s: check failed; retrying in %.0fs", self.SERVICE, self.check_interval_s)
                    next_check = time.monotonic() + self.check_interval_s
        finally:
            clear_ready(self.settings, self.SERVICE)
            await follower.stop()
            await producer.stop()
            ch.close()
