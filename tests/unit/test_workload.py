"""The workload generator's draw is deterministic and respects the chosen intents."""

from __future__ import annotations

import itertools

from services.core.settings import Settings
from services.teacher.workloads import load_workload
from services.workload import answered_intent, draw, to_request


def test_draw_is_seeded_and_restricted() -> None:
    w = load_workload("banking77", Settings().data_dir)
    first = [e.text for e in itertools.islice(draw(w, ["card_arrival", "exchange_rate"], seed=3), 50)]
    again = [e.text for e in itertools.islice(draw(w, ["card_arrival", "exchange_rate"], seed=3), 50)]
    other = [e.text for e in itertools.islice(draw(w, ["card_arrival", "exchange_rate"], seed=4), 50)]
    assert first == again and first != other
    assert {e.intent for e in itertools.islice(draw(w, ["card_arrival"]), 20)} == {"card_arrival"}


def test_request_carries_the_gold_label_and_an_optional_client_label() -> None:
    w = load_workload("banking77", Settings().data_dir)
    example = next(draw(w, ["card_arrival"]))
    unlabelled = to_request(example, "support-bot", label=False)
    assert unlabelled.intent is None and unlabelled.metadata["gold_intent"] == "card_arrival"
    assert to_request(example, "support-bot", label=True).intent == "card_arrival"


def test_answered_intent() -> None:
    from services.core.records import InferenceResponse

    ok = InferenceResponse(request_id="r", conversation_id="c", agent_id="a", content='{"intent":"x","tool":"t"}')
    assert answered_intent(ok) == "x"
    assert answered_intent(ok.model_copy(update={"content": "not json"})) is None
