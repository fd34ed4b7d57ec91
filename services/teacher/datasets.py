"""Labelled data sets as workloads: the built-in BANKING77 and NLU++ in ``data/``, and your own file.

Every data set goes through the same loader, ``build_workload(name, examples, mapping)``: labelled
``Example``s plus a mapping from labels to tools and replies. What differs is how the rows are read:

* **your own file** (``read_labelled_file``): CSV (or TSV) with a header, or JSONL, one message per row:
  ``text`` and ``label`` (required), ``arguments`` (optional: a JSON object of strings; in CSV as JSON text) and
  ``split`` (optional: ``train`` or ``test``; a row without one is put in ``test`` one time in five, by a hash of
  its text, so the same file always splits the same way). Its mapping (``read_mapping``, YAML or JSON) is
  optional: ``{labels: {<label>: {tool: <name>, reply: <sentence>}}}``; a label it does not name gets a tool of
  its own name and a generic reply. Every bad row is reported with its line number, at once.
* **BANKING77**: ``banking77/train.csv`` and ``test.csv`` (``text``, ``category``), the same CSV reader, with the
  tool table and replies of ``tables.py`` and its amount extractor.
* **NLU++**: ``nlupp_banking/fold*.json`` (folds 0-15 train, 16-19 test), several intents per message.

A data set of your own is registered (``register``) under ``FLYWHEEL_HOME/reference-data/<name>/`` so that the
reference teacher, which runs as its own process, can answer for it as ``reference/<name>``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from services.teacher.contract import Example, Workload, nlupp_label
from services.teacher.tables import (
    BANKING77_REPLIES,
    BANKING77_TOOLS,
    NLUPP_REPLIES,
    NLUPP_TOOLS,
    NO_INTENT,
    banking77_arguments,
)

TEST_SHARE_BUCKETS = 5  # a row without a split is a test row when its text hashes to bucket 0 of 5 (20 %)
MAX_PROBLEMS = 20  # bad rows listed in one error
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI accepts as a function name
REGISTRY = "reference-data"


class DataSetError(ValueError):
    """A data set or mapping that cannot be used; the message names the file and, for rows, their lines."""


# The one loader ------------------------------------------------------------------------------------------------
def build_workload(
    name: str,
    examples: list[Example],
    tool_table: Mapping[str, Iterable[str]],
    replies: Mapping[str, str],
    *,
    intents: Iterable[str] | None = None,
    multi_label: bool = False,
    extractor: Callable[[str], dict[str, str]] | None = None,
) -> Workload:
    """A workload from labelled examples and a tool table (tool -> labels, in rank order); ``intents`` defaults
    to the labels of the table in its order."""
    table = {tool: tuple(labels) for tool, labels in tool_table.items()}
    labels = list(intents) if intents is not None else [label for group in table.values() for label in group]
    return Workload(
        name=name,
        intents=labels,
        tools=list(table),
        tool_table=table,
        replies=dict(replies),
        multi_label=multi_label,
        _examples=examples,
        extractor=extractor,
    )


# Your own file ----------------------------------------------------------------------------------------------
def default_split(text: str) -> str:
    digest = hashlib.sha256(" ".join(text.lower().split()).encode()).digest()
    return "test" if digest[0] % TEST_SHARE_BUCKETS == 0 else "train"


def _row_example(row: Mapping[str, Any], line: int, text_key: str, label_key: str) -> Example:
    text, label = row.get(text_key), row.get(label_key)
    if not isinstance(text, str) or not text.strip():
        raise DataSetError(f"line {line}: '{text_key}' is missing or empty")
    if not isinstance(label, str) or not label.strip():
        raise DataSetError(f"line {line}: '{label_key}' is missing or empty")
    label = label.strip()
    if "\n" in label or "'" in label:
        raise DataSetError(f"line {line}: the label {label!r} has a line break or a quote")
    arguments = row.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise DataSetError(f"line {line}: 'arguments' is not JSON ({exc})") from None
    if not isinstance(arguments, dict) or not all(isinstance(v, str) for v in arguments.values()):
        raise DataSetError(f"line {line}: 'arguments' must be an object of strings")
    split = row.get("split") or default_split(text)
    if split not in ("train", "test"):
        raise DataSetError(f"line {line}: split {split!r} is neither train nor test")
    return Example(text, label, (label,), dict(sorted(arguments.items())), split)


def _rows(path: Path, text_key: str, label_key: str) -> Iterable[tuple[int, Any]]:
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DataSetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    with handle:
        try:
            if path.suffix.lower() in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                missing = {text_key, label_key} - set(reader.fieldnames or ())
                if missing:
                    raise DataSetError(
                        f"{path}: the CSV header has no {', '.join(sorted(missing))} column "
                        f"(it has: {', '.join(reader.fieldnames or ()) or 'nothing'})"
                    )
                for row in reader:
                    yield reader.line_num, row
                return
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except ValueError as exc:
                    yield number, DataSetError(f"line {number}: not JSON ({exc})")
        except UnicodeDecodeError as exc:
            raise DataSetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_labelled_file(path: Path | str, *, text_key: str = "text", label_key: str = "label") -> list[Example]:
    """The examples of a CSV, TSV or JSONL file (see the module's doc). Raises DataSetError listing every bad row
    (up to ``MAX_PROBLEMS``), naming the file and the lines."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise DataSetError(f"{path}: a data set is a .csv, .tsv or .jsonl file")
    examples, problems = [], []
    for line, row in _rows(path, text_key, label_key):
        try:
            if isinstance(row, DataSetError):
                raise row
            if not isinstance(row, dict):
                raise DataSetError(f"line {line}: not a JSON object")
            examples.append(_row_example(row, line, text_key, label_key))
        except DataSetError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise DataSetError(f"{path}: {len(problems)} bad rows{more}: " + "; ".join(problems[:MAX_PROBLEMS]))
    if not examples:
        raise DataSetError(f"{path}: no rows")
    return examples


def read_mapping(path: Path | str | None) -> dict[str, dict[str, str]]:
    """A mapping file (YAML or JSON): ``{labels: {<label>: {tool: ..., reply: ...}}}``; {} without a file."""
    if path is None:
        return {}
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataSetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise DataSetError(f"{path}: not YAML or JSON ({exc})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise DataSetError(f"{path}: a mapping is an object with 'labels': {{<label>: {{tool: ..., reply: ...}}}}")
    out = {}
    for label, spec in labels.items():
        if not isinstance(spec, dict) or set(spec) - {"tool", "reply"}:
            raise DataSetError(f"{path}: labels.{label} must be an object with 'tool' and/or 'reply'")
        if not all(isinstance(v, str) and v.strip() for v in spec.values()):
            raise DataSetError(f"{path}: labels.{label}: 'tool' and 'reply' must be non-empty text")
        out[str(label)] = {k: v.strip() for k, v in spec.items()}
    return out


def default_tool(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:64] or "answer"


def default_reply(label: str) -> str:
    words = re.sub(r"[_\-+]+", " ", label).strip()
    return f"I can help you with {words}."


def labelled_workload(name: str, examples: list[Example], mapping: Mapping[str, Mapping[str, str]]) -> Workload:
    """Your data set's workload: its labels in order of first appearance, each with the mapping's tool and reply
    or its own (``default_tool``, ``default_reply``)."""
    labels = list(dict.fromkeys(e.intent for e in examples))
    unknown = sorted(set(mapping) - set(labels))
    if unknown:
        raise DataSetError(f"the mapping names labels the data set does not have: {', '.join(unknown)}")
    table: dict[str, list[str]] = {}
    replies = {}
    for label in labels:
        spec = mapping.get(label, {})
        tool = spec.get("tool") or default_tool(label)
        if not TOOL_NAME_RE.match(tool):
            raise DataSetError(f"label {label!r}: tool name {tool!r} is not [A-Za-z0-9_-], at most 64 characters")
        table.setdefault(tool, []).append(label)
        replies[label] = spec.get("reply") or default_reply(label)
        if len(replies[label]) > 200:
            raise DataSetError(f"label {label!r}: the reply is longer than the contract's 200 characters")
    return build_workload(name, examples, table, replies, intents=labels)


def dataset_name(path: Path | str) -> str:
    """A data set's name from its file name (``my_intents.csv`` -> ``my_intents``), as a model name takes it."""
    stem = re.sub(r"[^a-z0-9_-]+", "-", Path(path).stem.lower()).strip("-_")[:48]
    if not stem or not NAME_RE.match(stem):
        raise DataSetError(f"{path}: no usable name in the file name; give one (--name)")
    return stem


def load_file(path: Path | str, mapping: Path | str | None = None, name: str | None = None) -> Workload:
    """Your data set (and its optional mapping file) as a workload named ``name`` (default: from the file)."""
    name = name or dataset_name(path)
    if not NAME_RE.match(name):
        raise DataSetError(f"data set name {name!r}: lower-case letters, digits, '-' or '_' (at most 48)")
    return labelled_workload(name, read_labelled_file(path), read_mapping(mapping))


# The registry the reference teacher reads ---------------------------------------------------------------
def registry_dir(home: Path) -> Path:
    return home / REGISTRY


def register(workload: Workload, home: Path) -> Path:
    """Write a data set where the reference teacher finds it (``reference/<name>``); the same data again is a
    no-op, other data under a registered name replaces it (the teacher reloads it)."""
    folder = registry_dir(home) / workload.name
    rows = [
        {"text": e.text, "label": e.intent, "arguments": dict(e.arguments), "split": e.split}
        for e in workload.examples()
    ]
    mapping = {
        "labels": {
            label: {"tool": workload.tool_for_intent(label), "reply": workload.reply_for(label)}
            for label in workload.intents
        }
    }
    examples_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    mapping_text = json.dumps(mapping, ensure_ascii=False, indent=1) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, text in (("mapping.json", mapping_text), ("examples.jsonl", examples_text)):
        target = folder / file_name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)  # a reader never sees half a file
    return folder


def load_registered(folder: Path) -> Workload:
    """A registered data set (``register``) as a workload."""
    return labelled_workload(
        folder.name, read_labelled_file(folder / "examples.jsonl"), read_mapping(folder / "mapping.json")
    )


# The built-in data sets ------------------------------------------------------------------------------------
def read_banking77(data_dir: Path) -> Workload:
    folder = data_dir / "banking77"
    categories = json.loads((folder / "categories.json").read_text())
    examples = []
    for split in ("train", "test"):
        for e in read_labelled_file(folder / f"{split}.csv", label_key="category"):
            examples.append(Example(e.text, e.intent, e.intents, banking77_arguments(e.text), split))
    return build_workload(
        "banking77",
        examples,
        BANKING77_TOOLS,
        BANKING77_REPLIES,
        intents=categories,
        extractor=banking77_arguments,
    )


def _fold_number(path: Path) -> int:
    return int(path.stem.removeprefix("fold"))


def read_nlupp(data_dir: Path) -> Workload:
    folder = data_dir / "nlupp_banking"
    ontology = json.loads((folder / "ontology.json").read_text())
    folds = sorted(folder.glob("fold*.json"), key=_fold_number)
    if not folds:
        raise FileNotFoundError(f"{folder}/fold*.json: no NLU++ folds found")
    examples = []
    for path in folds:
        split = "test" if _fold_number(path) >= 16 else "train"
        for item in json.loads(path.read_text()):
            intents = tuple(sorted(set(item.get("intents") or ())))
            slots = item.get("slots") or {}
            arguments = {name: str(slot["text"]) for name, slot in sorted(slots.items())}
            examples.append(Example(item["text"], nlupp_label(intents), intents or (NO_INTENT,), arguments, split))
    # The banking and general intents of the ontology (the hotel ones never occur in this domain's folds),
    # in ontology order, plus the label of intent-less messages.
    known = {i for tool_intents in NLUPP_TOOLS.values() for i in tool_intents}
    intents = [
        name
        for name, spec in ontology["intents"].items()
        if name in known and set(spec.get("domain", ())) & {"banking", "general"}
    ]
    intents.append(NO_INTENT)
    return build_workload("nlupp", examples, NLUPP_TOOLS, NLUPP_REPLIES, intents=intents, multi_label=True)
