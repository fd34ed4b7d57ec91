"""The one Avro codec: single-object encoding (``C3 01`` + 8-byte little-endian CRC-64-AVRO fingerprint of the
writer schema's canonical form + the binary body), so any Avro library can read and write the topics without
a schema registry.

Readers resolve the fingerprint against every version in ``schemas/<record>/v<N>.avsc`` and read the body
into the latest version (Avro schema resolution), so an old producer's records still decode after a schema
grows. Anything that does not decode raises ``DecodeError`` with a ``kind`` that the Kafka helper puts on the
dead-letter topic beside the raw bytes.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import ValidationError

from services.core.records import RECORD_TYPES, Record

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8
DEFAULT_SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"
_VERSION_FILE = re.compile(r"^v(\d+)\.avsc$")

R = TypeVar("R", bound=Record)


class DecodeError(ValueError):
    """A payload that cannot become a record. ``kind`` is one of: not_single_object, truncated,
    unknown_fingerprint, bad_body, wrong_record, invalid."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


class EncodeError(ValueError):
    """A record that does not fit its schema (a bug in the producer, not bad input)."""


@dataclass(frozen=True)
class SchemaVersion:
    record: str  # folder name, e.g. "inference_request"
    version: int
    parsed: Any
    fingerprint: bytes
    path: Path


def load_schema_versions(schemas_dir: Path) -> dict[str, list[SchemaVersion]]:
    """Every schema version on disk, oldest first, per record folder."""
    if not schemas_dir.is_dir():
        raise FileNotFoundError(f"schemas directory {schemas_dir} does not exist")
    out: dict[str, list[SchemaVersion]] = {}
    for folder in sorted(p for p in schemas_dir.iterdir() if p.is_dir()):
        versions = []
        for path in folder.iterdir():
            match = _VERSION_FILE.match(path.name)
            if not match:
                continue
            raw = json.loads(path.read_text())
            parsed = fastavro.parse_schema(raw, named_schemas={})
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            versions.append(SchemaVersion(folder.name, int(match.group(1)), parsed, fp, path))
        if versions:
            out[folder.name] = sorted(versions, key=lambda v: v.version)
    return out


class AvroCodec:
    def __init__(self, schemas_dir: Path | None = None) -> None:
        self.schemas_dir = schemas_dir or DEFAULT_SCHEMAS_DIR
        self.versions = load_schema_versions(self.schemas_dir)
        self.latest = {name: vs[-1] for name, vs in self.versions.items()}
        self.by_fingerprint: dict[bytes, SchemaVersion] = {}
        for versions in self.versions.values():
            for sv in versions:
                self.by_fingerprint[sv.fingerprint] = sv
        missing = sorted(set(RECORD_TYPES) - set(self.latest))
        if missing:
            raise FileNotFoundError(f"no schema in {self.schemas_dir} for records: {', '.join(missing)}")

    # Encoding -----------------------------------------------------------------------------------
    def encode(self, record: Record) -> bytes:
        return self.encode_dict(record.SCHEMA, record.model_dump())

    def encode_dict(self, schema: str, datum: dict[str, Any]) -> bytes:
        sv = self.latest[schema]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(sv.fingerprint)
        try:
            fastavro.schemaless_writer(buf, sv.parsed, datum)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise EncodeError(f"{schema}: record does not fit schema v{sv.version}: {exc}") from exc
        return buf.getvalue()

    # Decoding -----------------------------------------------------------------------------------
    def decode_dict(self, data: bytes | None) -> tuple[str, dict[str, Any]]:
        """(record name, datum in the latest schema's shape) or DecodeError."""
        if data is None:
            raise DecodeError("truncated", "empty payload (null value)")
        if len(data) < HEADER_LEN:
            if data[: len(MAGIC)] == MAGIC[: len(data)]:
                raise DecodeError("truncated", f"{len(data)} bytes, shorter than the {HEADER_LEN}-byte header")
            raise DecodeError("not_single_object", "missing the Avro single-object marker C3 01")
        if data[:2] != MAGIC:
            raise DecodeError(
                "not_single_object", f"missing the Avro single-object marker C3 01 (got {data[:2].hex()})"
            )
        fp = data[2:HEADER_LEN]
        writer = self.by_fingerprint.get(fp)
        if writer is None:
            raise DecodeError(
                "unknown_fingerprint",
                f"schema fingerprint {fp.hex()} matches no schema in {self.schemas_dir}",
            )
        reader = self.latest[writer.record]
        body = io.BytesIO(data[HEADER_LEN:])
        try:
            datum = fastavro.schemaless_reader(body, writer.parsed, reader.parsed if reader is not writer else None)
        except Exception as exc:  # fastavro raises many types (EOFError, IndexError, ValueError...)
            kind = "truncated" if self._decodes_when_padded(writer, data[HEADER_LEN:]) else "bad_body"
            what = "body ends early" if kind == "truncated" else "body does not decode"
            raise DecodeError(kind, f"{writer.record} v{writer.version} {what}: {exc!r}") from exc
        rest = len(data) - HEADER_LEN - body.tell()
        if rest:
            raise DecodeError(
                "bad_body",
                f"{writer.record} v{writer.version} body has {rest} trailing bytes after the record",
            )
        return writer.record, datum

    @staticmethod
    def _decodes_when_padded(writer: SchemaVersion, body: bytes) -> bool:
        """Tells a cut record from a garbled one: zero bytes are valid for most Avro types (empty string,
        first union branch, end of array), so a record cut short usually decodes once padded."""
        try:
            fastavro.schemaless_reader(io.BytesIO(body + bytes(256)), writer.parsed, None)
        except Exception:
            return False
        return True

    def decode(self, data: bytes | None, expected: type[R] | None = None) -> R:
        """Decode into the typed record; ``expected`` guards a topic against another record type."""
        name, datum = self.decode_dict(data)
        cls = RECORD_TYPES.get(name)
        if cls is None:
            raise DecodeError("wrong_record", f"no typed record for schema {name}")
        if expected is not None and cls is not expected:
            raise DecodeError("wrong_record", f"expected {expected.SCHEMA}, got {name}")
        try:
            return cls.model_validate(datum)  # type: ignore[return-value]
        except ValidationError as exc:
            raise DecodeError("invalid", f"{name}: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from exc
