"""Schema hygiene: every version stays readable by its successor, every catalogue topic has a schema, and
the typed records match the latest schemas field for field."""

from __future__ import annotations

import io
import typing

import fastavro
import pytest
from fastavro.utils import generate_many

from services.core.codec import DEFAULT_SCHEMAS_DIR, SchemaVersion, load_schema_versions
from services.core.records import RECORD_TYPES, Record
from services.core.topics import all_topics

VERSIONS = load_schema_versions(DEFAULT_SCHEMAS_DIR)
PAIRS = [(vs[i - 1], vs[i]) for vs in VERSIONS.values() for i in range(1, len(vs))]


def backward_problems(old: SchemaVersion, new: SchemaVersion, samples: int = 200) -> list[str]:
    """Why ``new`` cannot read data written with ``old`` (empty when it can). Checked by resolution of
    generated records, which exercises every branch of unions and enums the data covers."""
    problems = []
    for datum in generate_many(old.parsed, samples):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old.parsed, datum)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, old.parsed, new.parsed)
        except Exception as exc:
            problems.append(f"{new.path.name} cannot read {old.path.name}: {exc}")
            break
    return problems


def test_versions_are_numbered_from_one_without_gaps() -> None:
    for name, versions in VERSIONS.items():
        assert [v.version for v in versions] == list(range(1, len(versions) + 1)), name


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{n.record}-v{n.version}" for _, n in PAIRS])
def test_each_schema_reads_its_previous_version(old: SchemaVersion, new: SchemaVersion) -> None:
    assert backward_problems(old, new) == []


def test_the_compat_check_catches_a_breaking_change(tmp_path) -> None:
    import json
    import shutil

    shutil.copytree(DEFAULT_SCHEMAS_DIR / "retrain_triggered", tmp_path / "retrain_triggered")
    v1 = json.loads((tmp_path / "retrain_triggered" / "v1.avsc").read_text())
    v1["fields"].append({"name": "priority", "type": "int"})  # no default: old data cannot fill it
    (tmp_path / "retrain_triggered" / "v2.avsc").write_text(json.dumps(v1))
    old, new = load_schema_versions(tmp_path)["retrain_triggered"]
    assert backward_problems(old, new)


def test_every_topic_has_a_schema() -> None:
    for topic in all_topics():
        assert topic.record in VERSIONS, topic.name


def _avro_fields(schema: dict) -> set[str]:
    return {f["name"] for f in schema["fields"]}


@pytest.mark.parametrize("name", sorted(RECORD_TYPES))
def test_typed_record_matches_latest_schema(name: str) -> None:
    cls: type[Record] = RECORD_TYPES[name]
    schema = VERSIONS[name][-1].parsed
    assert set(cls.model_fields) == _avro_fields(schema)
    # Nested records too (one level: messages, answers, tool calls, gate verdicts).
    for field in schema["fields"]:
        avro_type = field["type"]
        branches = avro_type if isinstance(avro_type, list) else [avro_type]
        for branch in branches:
            inner = branch.get("items") if isinstance(branch, dict) and branch.get("type") == "array" else branch
            if isinstance(inner, dict) and inner.get("type") == "record":
                annotation = cls.model_fields[field["name"]].annotation
                models = [
                    a
                    for a in typing.get_args(annotation) or (annotation,)
                    for a in (typing.get_args(a) or (a,))
                    if isinstance(a, type) and hasattr(a, "model_fields")
                ]
                assert models, f"{name}.{field['name']} should be a typed model"
                assert set(models[0].model_fields) == _avro_fields(inner), f"{name}.{field['name']}"
