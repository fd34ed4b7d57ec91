"""Avro object-container framing for the interactions hot path (pure, no I/O).

The records on ``flywheel.interactions`` are Avro single-object encoded: ``C3 01``, an 8-byte fingerprint,
then the binary body. Decoding each body in Python (fastavro, then the typed model) costs 30-50 µs a
record, which caps one logger process far below the 100,000 records/s goal. ClickHouse reads Avro itself, in
C++, from an object container file (OCF): a header that carries the writer schema, then blocks of bodies.
So the logger strips the 10-byte single-object header and wraps the untouched bodies in a container, and
ClickHouse does the decoding and the row mapping (``rows.INTERACTION_SELECT``).

Every body gets a block of its own (count 1, its size, the body, the sync marker): the block size frames
the record, so a truncated or garbled body fails the insert (the reader runs off the block's end) instead
of shifting into the next record and writing wrong rows. That costs 18 bytes a record. (One difference from
the codec remains: a complete record followed by stray bytes is written, ClickHouse skipping the rest of its
block, where the codec would reject it as ``bad_body``.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

OCF_MAGIC = b"Obj\x01"
SYNC_MARKER = b"flywheel-logger\x00"  # any 16 bytes; constant so a container is reproducible in tests
BLOCK_COUNT_ONE = b"\x02"  # zigzag(1)
_PREFIX_CACHE_LIMIT = 1 << 16


def zigzag_long(value: int) -> bytes:
    """Avro's variable-length zigzag encoding of a long."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def container_header(schema_json: str, sync: bytes = SYNC_MARKER) -> bytes:
    """The OCF header: magic, the metadata map (writer schema, no codec) and the sync marker.

    ``schema_json`` must keep logical types (``timestamp-micros``): the schema's parsing canonical form
    drops them, and ClickHouse would then read the timestamps as plain integers.
    """
    if len(sync) != 16:
        raise ValueError(f"an Avro sync marker is 16 bytes, got {len(sync)}")
    meta = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
    parts = [OCF_MAGIC, zigzag_long(len(meta))]
    for key, value in meta.items():
        parts += [zigzag_long(len(key)), key, zigzag_long(len(value)), value]
    parts += [zigzag_long(0), sync]
    return b"".join(parts)


class ContainerWriter:
    """Builds containers of one writer schema."""

    def __init__(self, schema_json: str, sync: bytes = SYNC_MARKER) -> None:
        self.header = container_header(schema_json, sync)
        self.sync = sync
        self._prefixes: dict[int, dict[int, bytes]] = {}  # skip → record length → block prefix

    def container(self, records: Sequence[bytes], skip: int = 0) -> bytes:
        """One container holding each record's body (its first ``skip`` bytes left out, e.g. a single-object
        header) in a block of its own.

        The hot path of the logger: the per-record work runs in C (map, zip, join); the only Python per
        record is a block prefix for a record length not seen before (most records share a few lengths).
        """
        lengths = list(map(len, records))
        cache = self._prefixes.setdefault(skip, {})
        if len(cache) > _PREFIX_CACHE_LIMIT:
            cache.clear()
        for length in set(lengths).difference(cache):
            cache[length] = BLOCK_COUNT_ONE + zigzag_long(length - skip)
        prefixes = map(cache.__getitem__, lengths)
        bodies = map(itemgetter(slice(skip, None)), records) if skip else records
        blocks = chain.from_iterable(zip(prefixes, bodies, repeat(self.sync)))
        return b"".join(chain((self.header,), blocks))


# The ClickHouse column structure that reads a schema's records ------------------------------------------
_PRIMITIVES = {
    "string": "String",
    "bytes": "String",
    "boolean": "Bool",
    "int": "Int32",
    "long": "Int64",
    "float": "Float32",
    "double": "Float64",
}
_LOGICAL = {"timestamp-micros": "DateTime64(6, 'UTC')", "timestamp-millis": "DateTime64(3, 'UTC')"}


def clickhouse_structure(schema: dict[str, Any]) -> str:
    """ClickHouse columns (``name Type, ...``) that read the records of an Avro record schema.

    Generated from the schema so the staging table follows the schema files. Enums are read as their symbol
    names (String). A nullable record (``["null", record]``) becomes a Tuple whose primitive fields are all
    Nullable: a null record then reads as the tuple's default, all NULL, which ``rows.INTERACTION_SELECT``
    tells from a present record by a field that is never null when the record is there. (Nullable(Tuple) would
    be simpler, but ClickHouse 24.x, the production image, does not have it.)
    """
    if schema.get("type") != "record":
        raise ValueError("clickhouse_structure takes a record schema")
    named: dict[str, Any] = {}
    return ", ".join(f"{_quote(f['name'])} {_type(f['type'], named, False)}" for f in schema["fields"])


def _type(avro: Any, named: dict[str, Any], inside_null: bool) -> str:
    if isinstance(avro, str):
        if avro in _PRIMITIVES:
            return _nullable(_PRIMITIVES[avro], inside_null)
        if avro in named:
            return _type(named[avro], named, inside_null)
        raise ValueError(f"unknown Avro type {avro!r}")
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1 or len(avro) != 2:
            raise ValueError(f"only [null, T] unions are supported, got {avro!r}")
        inner = branches[0]
        resolved = named.get(inner, inner) if isinstance(inner, str) else inner
        if isinstance(resolved, dict) and resolved.get("type") == "record":
            return _type(inner, named, True)
        return _nullable(_type(inner, named, False), True)
    kind = avro["type"]
    if avro.get("logicalType") in _LOGICAL:
        return _nullable(_LOGICAL[avro["logicalType"]], inside_null)
    if kind in ("record", "enum", "fixed"):
        named[avro["name"]] = avro
        if "namespace" in avro:
            named[f"{avro['namespace']}.{avro['name']}"] = avro
    if kind == "record":
        fields = ", ".join(f"{_quote(f['name'])} {_type(f['type'], named, inside_null)}" for f in avro["fields"])
        return f"Tuple({fields})"
    if kind == "enum":
        return _nullable("String", inside_null)
    if kind == "fixed":
        return _nullable(f"FixedString({int(avro['size'])})", inside_null)
    if kind == "array":
        return f"Array({_type(avro['items'], named, False)})"
    if kind == "map":
        return f"Map(String, {_type(avro['values'], named, False)})"
    return _type(kind, named, inside_null)


def _nullable(ch_type: str, nullable: bool) -> str:
    if not nullable or ch_type.startswith("Nullable("):
        return ch_type
    return f"Nullable({ch_type})"


def _quote(name: str) -> str:
    return "`" + name.replace("`", "\\`") + "`"


def compact_schema_json(path_text: str) -> str:
    """A schema file's JSON without whitespace (logical types kept), for the container header."""
    return json.dumps(json.loads(path_text), separators=(",", ":"))
