"""Dead letters you can act on: list, show and replay what the logger stored from the ``.dlq`` topics
(``dead_letters``, migration 0007). A replay sends the failed record's bytes (or a corrected record) back to
its source topic, with its key, and records the replay in ``dead_letter_replays``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from services.core import topics
from services.core.codec import AvroCodec, DecodeError
from services.core.records import RECORD_TYPES

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

    from services.core.settings import Settings


class DeadLetterError(LookupError):
    """A dead letter that does not exist, or cannot be replayed as asked; the message says which and why."""


@dataclass(frozen=True)
class StoredLetter:
    id: str
    source_topic: str
    source_partition: int
    source_offset: int
    error_kind: str
    error: str
    service: str
    key: bytes | None
    value: bytes | None
    created_at: datetime
    replays: int


# Each dead letter with how often it was replayed (0 when never: the join's default).
_FROM = (
    "SELECT d.id, d.source_topic, d.source_partition, d.source_offset, d.error_kind, d.error, d.service, d.key, "
    "d.value, d.created_at, r.replays FROM dead_letters AS d FINAL "
    "LEFT JOIN (SELECT id, count() AS replays FROM dead_letter_replays GROUP BY id) AS r ON r.id = d.id"
)


_RAW = {"key": "bytes", "value": "bytes"}  # the failed record's bytes as they were, not decoded as text


def topic_name(name: str) -> str:
    """A topic as users type it: 'requests' or 'flywheel.requests' (the source topic, not its .dlq)."""
    full = name if name.startswith("flywheel.") else f"flywheel.{name}"
    return topics.by_name(full.removesuffix(topics.DLQ_SUFFIX)).name


def list_letters(ch: Client, topic: str | None = None, kind: str | None = None, limit: int = 50) -> list[StoredLetter]:
    """The newest dead letters first, optionally of one source topic and error kind."""
    where, params = ["1"], {"limit": limit}
    if topic:
        where.append("d.source_topic = {topic:String}")
        params["topic"] = topic_name(topic)
    if kind:
        where.append("d.error_kind = {kind:String}")
        params["kind"] = kind
    sql = f"{_FROM} WHERE {' AND '.join(where)} ORDER BY d.created_at DESC LIMIT {{limit:UInt32}}"
    return [_letter(row) for row in ch.query(sql, parameters=params, column_formats=_RAW).result_rows]


def get_letter(ch: Client, letter_id: str) -> StoredLetter:
    sql = f"{_FROM} WHERE d.id = {{id:String}}"
    rows = ch.query(sql, parameters={"id": letter_id}, column_formats=_RAW).result_rows
    if not rows:
        raise DeadLetterError(f"no dead letter {letter_id!r}; `flywheel dlq list` shows their ids")
    return _letter(rows[0])


def describe_value(letter: StoredLetter, codec: AvroCodec | None = None) -> tuple[str, Any]:
    """('record', the decoded record as JSON-ready data) when the bytes still decode, else ('bytes', text)."""
    codec = codec or AvroCodec()
    value = letter.value or b""
    try:
        return "record", json.loads(codec.decode(value).model_dump_json())
    except (DecodeError, ValueError):
        text = value.decode("utf-8", errors="replace")
        return "bytes", text if text.isprintable() else value.hex(" ")


def replacement_value(letter: StoredLetter, fixed: dict[str, Any], codec: AvroCodec | None = None) -> bytes:
    """A corrected record for the letter's source topic, encoded as that topic's record type."""
    codec = codec or AvroCodec()
    spec = topics.by_name(letter.source_topic)
    if spec.record is None:
        raise DeadLetterError(f"{letter.source_topic} has no record type: a corrected record cannot be encoded")
    record_type = RECORD_TYPES[spec.record]
    try:
        record = record_type.model_validate(fixed)
    except ValueError as exc:
        raise DeadLetterError(f"the corrected record is not a valid {record_type.__name__}: {exc}") from exc
    return codec.encode(record)


async def replay(settings: Settings, letters: list[StoredLetter], values: dict[str, bytes] | None = None) -> int:
    """Send each letter's bytes (or its replacement in `values`) back to its source topic, acknowledged, then
    record the replays. Returns how many were sent."""
    from services.core.clickhouse import client
    from services.core.kafka import create_producer

    values = values or {}
    for letter in letters:
        if letter.value is None and letter.id not in values:
            raise DeadLetterError(f"dead letter {letter.id} holds no record bytes to replay")
    producer = create_producer(settings)
    await producer.start()
    try:
        for letter in letters:
            await producer.send_and_wait(letter.source_topic, values.get(letter.id, letter.value), key=letter.key)
    finally:
        await producer.stop()
    now = datetime.now(timezone.utc)
    ch = client(settings)
    try:
        ch.insert(
            "dead_letter_replays",
            [[letter.id, now, letter.source_topic, letter.id in values] for letter in letters],
            column_names=["id", "replayed_at", "replayed_to", "edited"],
        )
    finally:
        ch.close()
    return len(letters)


def _letter(row: tuple[Any, ...]) -> StoredLetter:
    (id_, topic, partition, offset, kind, error, service, key, value, created_at, replays) = row
    return StoredLetter(
        id_, topic, partition, offset, kind, error, service, _bytes(key), _bytes(value), created_at, int(replays)
    )


def _bytes(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return value.encode("utf-8", errors="surrogateescape")
