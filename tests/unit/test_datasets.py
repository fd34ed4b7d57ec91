"""Data sets of your own (CSV, TSV, JSONL and a mapping) as workloads; the registry the reference teacher reads;
the demo's agent for such a data set; BANKING77 and NLU++ through the same loader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from services.core.agents import load_agents
from services.core.settings import REPO_ROOT, Settings
from services.demo.own_data import OwnDataError, agent_id_for, demo_agent, demo_sizes, write_agents_file
from services.teacher.datasets import (
    DataSetError,
    dataset_name,
    default_split,
    load_file,
    read_labelled_file,
    register,
    registry_dir,
)
from services.teacher.reference import ReferenceTeacher, UnknownModel
from services.teacher.workloads import load_workload

ROWS = [
    ("wake me up at 7 tomorrow", "alarm_set", {"time": "7"}),
    ("set an alarm for 6am", "alarm_set", {"time": "6am"}),
    ("cancel my alarms", "alarm_remove", {}),
    ("what's the weather like", "weather_query", {}),
    ("will it rain in paris", "weather_query", {"place": "paris"}),
    ("play some jazz", "play_music", {"genre": "jazz"}),
]


def write_jsonl(path: Path, rows=ROWS, split: bool = True) -> Path:
    with path.open("w") as fh:
        for i, (text, label, args) in enumerate(rows):
            row = {"text": text, "label": label, "arguments": args}
            if split:
                row["split"] = "test" if i % 3 == 2 else "train"
            fh.write(json.dumps(row) + "\n")
    return path


def test_a_jsonl_file_becomes_a_workload_with_one_tool_per_label(tmp_path: Path) -> None:
    w = load_file(write_jsonl(tmp_path / "home_assistant.jsonl"))
    assert w.name == "home_assistant" and w.model == "reference/home_assistant"
    assert w.intents == ["alarm_set", "alarm_remove", "weather_query", "play_music"]
    assert w.tools == w.intents and w.tool_for_intent("weather_query") == "weather_query"
    assert len(w.examples("train")) == 4 and len(w.examples("test")) == 2
    first = w.examples("train")[0]
    assert w.answer_for(first) == {
        "intent": "alarm_set",
        "tool": "alarm_set",
        "arguments": {"time": "7"},
        "reply": "I can help you with alarm set.",
    }
    # A message outside the data set keeps the neighbour's arguments it contains, and only those.
    assert w.arguments_for("set an alarm at 7 please", first) == {"time": "7"}
    assert w.arguments_for("set an alarm", first) == {}
    schema = w.output_schema()
    assert schema["properties"]["intent"]["enum"] == w.intents and w.check_output(json.dumps(w.answer_for(first))) == []


def test_csv_and_tsv_with_a_mapping_and_a_stable_split(tmp_path: Path) -> None:
    csv_file = tmp_path / "Support Desk.csv"
    csv_file.write_text(
        'text,label,arguments\n"where is my parcel, please",track_order,"{""order"": ""A1""}"\nrefund me,refund,\n'
    )
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(
        yaml.safe_dump({"labels": {"track_order": {"tool": "order_lookup", "reply": "Let me find your order."}}})
    )
    w = load_file(csv_file, mapping)
    assert w.name == "support-desk"
    assert w.tools == ["order_lookup", "refund"] and w.reply_for("track_order") == "Let me find your order."
    assert w.examples()[0].arguments == {"order": "A1"}
    # No split column: one in five messages is a test message, the same ones every time.
    assert {e.split for e in w.examples()} <= {"train", "test"}
    assert [e.split for e in w.examples()] == [default_split(e.text) for e in w.examples()]
    texts = [f"message number {i}" for i in range(1000)]
    share = sum(default_split(t) == "test" for t in texts) / len(texts)
    assert 0.15 < share < 0.25 and default_split("Hello  World") == default_split("hello world")
    tsv = tmp_path / "intents.tsv"
    tsv.write_text("text\tlabel\nturn the lights off\tlights_off\nlights on please\tlights_on\n")
    assert load_file(tsv).intents == ["lights_off", "lights_on"]


def test_bad_rows_are_all_named_with_their_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                json.dumps({"text": "fine", "label": "ok"}),
                "{not json",
                json.dumps({"text": "", "label": "ok"}),
                json.dumps({"text": "no label"}),
                json.dumps({"text": "x", "label": "ok", "arguments": {"n": 1}}),
                json.dumps({"text": "x", "label": "ok", "split": "dev"}),
                json.dumps(["a", "list"]),
            ]
        )
    )
    with pytest.raises(DataSetError) as err:
        read_labelled_file(bad)
    message = str(err.value)
    assert str(bad) in message and "6 bad rows" in message
    for expected in (
        "line 2: not JSON",
        "line 3: 'text' is missing or empty",
        "line 4: 'label' is missing or empty",
        "line 5: 'arguments' must be an object of strings",
        "line 6: split 'dev' is neither train nor test",
        "line 7: not a JSON object",
    ):
        assert expected in message
    header = tmp_path / "header.csv"
    header.write_text("message,intent\nhi,greet\n")
    with pytest.raises(
        DataSetError, match=re.escape("the CSV header has no label, text column (it has: message, intent)")
    ):
        read_labelled_file(header)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,order\n".encode("latin-1"))
    with pytest.raises(DataSetError, match="not UTF-8"):
        read_labelled_file(latin)
    with pytest.raises(DataSetError, match=re.escape("a data set is a .csv, .tsv or .jsonl file")):
        read_labelled_file(tmp_path / "data.xlsx")
    with pytest.raises(DataSetError, match="cannot be read"):
        read_labelled_file(tmp_path / "missing.csv")
    mapping = tmp_path / "m.yaml"
    mapping.write_text(yaml.safe_dump({"labels": {"nope": {"tool": "x"}}}))
    with pytest.raises(DataSetError, match="the mapping names labels the data set does not have: nope"):
        load_file(write_jsonl(tmp_path / "d.jsonl"), mapping)
    mapping.write_text(yaml.safe_dump({"labels": {"alarm_set": {"tool": "set alarm!"}}}))
    with pytest.raises(DataSetError, match="tool name 'set alarm!' is not"):
        load_file(tmp_path / "d.jsonl", mapping)
    with pytest.raises(DataSetError, match="no usable name"):
        dataset_name(tmp_path / "___.csv")


def test_a_registered_data_set_is_answered_by_the_reference_teacher(tmp_path: Path) -> None:
    home = tmp_path / "home"
    w = load_file(write_jsonl(tmp_path / "assistant.jsonl"))
    folder = register(w, home)
    assert folder == registry_dir(home) / "assistant"
    again = load_workload("assistant", REPO_ROOT / "data", registry_dir(home))
    assert again.intents == w.intents and [e.text for e in again.examples()] == [e.text for e in w.examples()]
    teacher = ReferenceTeacher({}, registry=registry_dir(home))
    assert teacher.models == ["reference/assistant"]
    answer = teacher.answer("reference/assistant", "will it rain in paris", flaws=False)
    assert json.loads(answer.content)["intent"] == "weather_query"
    # Registered again with other data: the next request reads it again.
    register(
        load_file(write_jsonl(tmp_path / "assistant.jsonl", [("will it rain in paris", "forecast", {})] * 2)), home
    )
    assert json.loads(teacher.answer("reference/assistant", "will it rain in paris", flaws=False).content)[
        "intent"
    ] == ("forecast")
    with pytest.raises(UnknownModel, match="reference/other"):
        teacher.answer("reference/other", "hi")
    with pytest.raises(ValueError, match="unknown workload 'other'; known: banking77, nlupp, assistant"):
        load_workload("other", REPO_ROOT / "data", registry_dir(home))


def test_the_demo_agent_of_a_data_set_is_the_support_bot_with_its_contract(tmp_path: Path) -> None:
    w = load_file(write_jsonl(tmp_path / "assistant.jsonl"))
    base = Settings().agents_file
    template = load_agents(base).agent("support-bot")
    agent = demo_agent(w, template, 3)
    assert agent.agent_id == agent_id_for(w) == "assistant-bot"
    assert agent.teacher.model == "reference/assistant" and agent.grace_period.min_unique_intents == 3
    assert agent.output.valid_tools == w.tools and agent.output.json_schema == w.output_schema()
    assert agent.distillation == template.distillation and agent.routing == template.routing
    target = write_agents_file(base, agent, tmp_path / "home" / "agents.yaml")
    written = load_agents(target)
    assert written.agent("assistant-bot") == agent and "support-bot" in written.agents
    assert demo_sizes(150, 20) == (20, 5) and demo_sizes(8, 20) == (6, 2) and demo_sizes(4, 20) == (3, 1)
    with pytest.raises(OwnDataError, match="at least 3 labels"):
        demo_sizes(2, 20)


def test_banking77_and_nlupp_come_through_the_same_loader() -> None:
    data = REPO_ROOT / "data"
    banking = load_workload("banking77", data)
    assert len(banking.intents) == 77 and banking.extractor is not None
    assert {e.split for e in banking.examples()} == {"train", "test"}
    nlupp = load_workload("nlupp", data)
    assert nlupp.multi_label and nlupp.extractor is None


def test_the_examples_of_docs_own_data_load(tmp_path: Path) -> None:
    doc = (REPO_ROOT / "docs" / "own-data.md").read_text()
    blocks = dict(re.findall(r"```(csv|json|yaml)\n(.*?)```", doc, re.DOTALL))
    (tmp_path / "doc.csv").write_text(blocks["csv"])
    (tmp_path / "doc.jsonl").write_text(blocks["json"])
    csv_set = load_file(tmp_path / "doc.csv")
    assert csv_set.intents == ["lights_off", "thermostat_query"] and len(csv_set.examples("test")) == 1
    assert load_file(tmp_path / "doc.jsonl").examples()[0].arguments == {"time": "7"}
    rows = "text,label\nturn the lights off,lights_off\nlights on please,lights_on\n"
    (tmp_path / "lights.csv").write_text(rows)
    (tmp_path / "mapping.yaml").write_text(blocks["yaml"])
    mapped = load_file(tmp_path / "lights.csv", tmp_path / "mapping.yaml")
    assert mapped.tools == ["lights"] and mapped.reply_for("lights_off") == "Turning the lights off."
    assert mapped.reply_for("lights_on") == "I can help you with lights on."


def test_the_reference_teacher_process_refuses_a_bad_data_file_naming_it(tmp_path: Path, capsys) -> None:
    from services.teacher.__main__ import main

    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\n,empty\n")
    assert main(["--data", str(bad), "--port", "1"]) == 2
    assert "line 2: 'text' is missing or empty" in capsys.readouterr().err
    assert main(["--data", str(bad), "--data", str(bad), "--mapping", str(bad)]) == 2
    assert "--mapping goes with exactly one --data" in capsys.readouterr().err


def test_the_cluster_threshold_is_calibrated_on_the_data_sets_own_messages() -> None:
    import numpy as np

    from services.curator.labelling import calibrate_threshold

    rng = np.random.default_rng(0)
    centres = np.eye(8)[:4]

    def messages(spread: float) -> tuple[list[str], np.ndarray]:
        labels, vecs = [], []
        for i, c in enumerate(centres):
            for _ in range(30):
                v = c + rng.normal(0, spread, 8)
                vecs.append(v / np.linalg.norm(v))
                labels.append(f"intent{i}")
        return labels, np.array(vecs)

    tight = calibrate_threshold(*messages(0.05), samples=8)
    loose = calibrate_threshold(*messages(0.4), samples=8)
    assert tight == 0.7  # paraphrases closer than the default: the default (the ceiling) stays
    assert 0.3 <= loose < 0.7  # further apart: lower, so known intents are not taken for unseen ones
    assert calibrate_threshold(["a"] * 3, np.eye(3), samples=8) == 0.7  # too few messages to measure


def test_the_demo_agent_carries_the_calibrated_threshold(tmp_path: Path) -> None:
    w = load_file(write_jsonl(tmp_path / "assistant.jsonl"))
    template = load_agents(Settings().agents_file).agent("support-bot")
    assert demo_agent(w, template, 3, 0.41).curation.cluster_threshold == 0.41
    assert demo_agent(w, template, 3).curation.cluster_threshold == template.curation.cluster_threshold == 0.7
