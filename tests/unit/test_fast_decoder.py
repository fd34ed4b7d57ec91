"""The fast decoder against the plain greedy constrained decode, on a tiny student trained to write compact
answers: the same tokens, the same confidences (within 1e-4), with far fewer forward passes; bad rows of a
batch get their error and the others are answered; long prompts are cut as training cuts them."""

from __future__ import annotations

import json
import threading
import time

import pytest

from services.student_runtime import StudentGenerator
from services.trainer import data as D
from tests.helpers.tiny_model import (
    TINY_LABELS,
    TINY_SYSTEM,
    TINY_TRAINING,
    build_trained_tiny_student,
    tiny_target,
)

UNSEEN = ["card arrive refund", "balance of 7 euros", "what?", "stolen top up", "refund 30 pounds now please"]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> StudentGenerator:
    base = build_trained_tiny_student(tmp_path_factory.mktemp("tiny-student"))
    targets = [tiny_target(label, args) for _, label, args in TINY_TRAINING]
    tails, default = D.label_tails(targets)
    spec = {
        "base_model": str(base),
        "max_new_tokens": 40,
        "labels": TINY_LABELS,
        "label_prefix": '{"intent": "',
        "label_suffix": '"',
        "system_prompt": TINY_SYSTEM,
        "label_tails": tails,
        "default_tail": default,
        "tail_corpus": D.tail_corpus(targets),
        "max_prompt_tokens": 60,
    }
    return StudentGenerator(spec)


def chat(text: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    return json.dumps([*messages, {"role": "user", "content": text}])


def parsed_or_empty(text: str) -> dict:
    try:
        return json.loads(text)
    except ValueError:
        return {}


def random_head(student: StudentGenerator, seed: int):
    """(hidden size, weight, bias) of a random label head over the tiny student's labels (seeded)."""
    import torch

    hidden = student.model.get_output_embeddings().weight.shape[1]
    torch.manual_seed(seed)
    return hidden, torch.randn(len(TINY_LABELS), hidden), torch.randn(len(TINY_LABELS))


def assert_same(fast, plain) -> None:
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain, strict=True):
        assert a.error == b.error
        assert a.token_ids == b.token_ids, (a.text, b.text)
        assert a.text == b.text
        assert abs(a.confidence - b.confidence) < 1e-4
        assert (a.input_tokens, a.output_tokens) == (b.input_tokens, b.output_tokens)


def test_fast_answers_are_the_plain_greedy_answers(student: StudentGenerator) -> None:
    prompts = [chat(text) for text, _, _ in TINY_TRAINING] + [chat(text) for text in UNSEEN]
    plain = [student.answer([p], reference=True)[0] for p in prompts]
    alone = [student.answer([p])[0] for p in prompts]
    batched = student.answer(prompts)
    assert_same(alone, plain)
    assert_same(batched, plain)
    # The student learnt the format: most answers are a known label and no arguments, in two forward passes
    # (an unseen message may get broken arguments: the tiny model's values vary with library versions).
    parsed = [parsed_or_empty(a.text) for a in alone]
    assert sum(p.get("intent") in TINY_LABELS for p in parsed) >= len(parsed) - 2
    simple = [a for a, p in zip(alone, parsed, strict=True) if p.get("arguments") == {}]
    assert simple and max(a.forward_passes for a in simple) <= 4
    plain_passes = sum(len(b.token_ids) for b in plain)  # one pass per token in the plain decode
    assert sum(a.forward_passes for a in alone) * 3 < plain_passes
    screened, redone = student.fast.screen_stats
    assert screened > redone > 0  # the bfloat16 screen decided most rows, the uncertain ones went to fp32


def test_the_fp32_output_layer_alone_gives_the_same_answers(
    student: StudentGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = [chat(text) for text in UNSEEN]
    screened = student.answer(prompts)
    monkeypatch.setattr(student.fast, "head_bf16", None)
    assert_same(screened, student.answer(prompts))


def test_packed_rows_and_padded_rows_give_the_same_answers(
    student: StudentGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny student is a Llama: its rows are packed. Other families go through the padded HF forward.
    assert student.fast.packed is not None
    prompts = [chat(text) for text, _, _ in TINY_TRAINING[:6]] + [chat(text) for text in UNSEEN]
    packed = student.answer(prompts)
    monkeypatch.setattr(student.fast, "packed", None)
    assert_same(packed, student.answer(prompts))


def test_prompts_without_the_shared_prefix_and_long_prompts_match(student: StudentGenerator) -> None:
    prompts = [
        chat("When will my new card arrive?", system="Another system prompt."),  # no shared prefix
        "balance please",  # a pre-formatted prompt
        chat("I lost my card yesterday " * 20),  # over max_prompt_tokens: cut as in training
        chat("What is my balance?"),
    ]
    plain = [student.answer([p], reference=True)[0] for p in prompts]
    assert_same(student.answer(prompts), plain)
    assert plain[2].input_tokens == 60


def test_bad_rows_get_their_error_and_the_others_are_answered(student: StudentGenerator) -> None:
    good = chat("What is my balance?")
    answers = student.answer(["", good, json.dumps([{"role": "wizard", "content": "x"}]), "x" * 70000, good])
    assert answers[0].error == "PROMPT is empty"
    assert "unknown chat role 'wizard'" in (answers[2].error or "")
    assert "over the limit" in (answers[3].error or "")
    expected = student.answer([good])[0]
    for a in (answers[1], answers[4]):
        assert a.error is None and a.token_ids == expected.token_ids


def serve(scheduler, jobs: list[list[str]], stagger_s: float = 0.0) -> list[list]:
    """Submit ``jobs`` (one request each) to a scheduler, a few at a time; their answers in order."""
    got: dict[int, list] = {}
    ready = threading.Event()

    def done(index: int, answers: list) -> None:
        got[index] = answers
        if len(got) == len(jobs):
            ready.set()

    for index, job in enumerate(jobs):
        scheduler.submit(job, lambda answers, i=index: done(i, answers))
        if stagger_s and index % 3 == 2:
            time.sleep(stagger_s)  # the next requests join passes already running
    assert ready.wait(120), f"{len(jobs) - len(got)} requests not answered"
    return [got[i] for i in range(len(jobs))]


def test_requests_joining_a_running_batch_get_the_plain_answers(student: StudentGenerator) -> None:
    from services.student_runtime.scheduler import Scheduler, SchedulerClosed

    prompts = [chat(text) for text, _, _ in TINY_TRAINING[:9]] + [chat(text) for text in UNSEEN]
    expected = [student.answer([p])[0] for p in prompts]
    scheduler = Scheduler(lambda: student, capacity=3)  # fewer slots than requests: some wait for one
    try:
        answers = serve(scheduler, [[p] for p in prompts], stagger_s=0.01)
        # A request of several rows, one of them bad: the bad one gets its error, the others their answers.
        mixed = serve(scheduler, [[prompts[0], "", prompts[1]]])[0]
    finally:
        assert scheduler.close()
    for got, want in zip(answers, expected, strict=True):
        assert_same(got, [want])
    assert mixed[1].error == "PROMPT is empty"
    assert_same([mixed[0], mixed[2]], expected[:2])
    assert scheduler.passes < sum(a.forward_passes for a in expected)  # requests shared forward passes
    with pytest.raises(SchedulerClosed, match="takes no more requests"):
        scheduler.submit([prompts[0]], lambda answers: None)


def test_a_failed_pass_answers_its_rows_with_the_error_and_serving_goes_on(
    student: StudentGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.student_runtime.decode import LiveBatch
    from services.student_runtime.scheduler import Scheduler

    real_step = LiveBatch.step
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return real_step(self)

    monkeypatch.setattr(LiveBatch, "step", flaky)
    reports: list[str] = []
    scheduler = Scheduler(lambda: student, capacity=4, name="student_tiny", report=reports.append)
    try:
        failed = serve(scheduler, [[chat("What is my balance?")]])[0]
        after = serve(scheduler, [[chat("What is my balance?")]])[0]
    finally:
        assert scheduler.close()
    assert failed[0].error == "RuntimeError: out of memory"
    assert reports == ["student_tiny: a forward pass failed: RuntimeError: out of memory"]
    assert_same(after, student.answer([chat("What is my balance?")]))


def test_serving_reads_a_long_prompt_as_training_did(student: StudentGenerator) -> None:
    from services.student_runtime import render_prompt
    from services.student_runtime.prompt import shared_prefix_ids

    messages = [{"role": "user", "content": "my card was stolen and " * 30}]
    tok = student.tokenizer
    text = render_prompt(tok, messages, TINY_SYSTEM)
    target = tiny_target("lost_or_stolen_card", {})
    trained = D.encode_example(
        tok, text, target, tok.eos_token_id, 256, prompt_limit=60, prefix_ids=shared_prefix_ids(tok, TINY_SYSTEM)
    )
    assert trained is not None
    prompt_ids = [t for t, label in zip(trained.input_ids, trained.labels, strict=True) if label == D.IGNORE]
    assert student.prepare(json.dumps(messages)).ids == prompt_ids


def test_weight_formats_answer_and_an_unknown_one_fails_the_load(student: StudentGenerator) -> None:
    from services.student_runtime.weights import WeightFormatError

    prompts = [chat(text) for text, _, _ in TINY_TRAINING]
    fp32 = student.answer(prompts)
    for fmt in ("bf16", "int8"):
        light = StudentGenerator({**student.spec, "weight_format": fmt})
        answers = light.answer(prompts)
        # The same decoder on lighter weights: valid answers, mostly the fp32 ones (the trainer measures how many).
        assert all(json.loads(a.text)["intent"] in TINY_LABELS for a in answers)
        assert sum(a.text == b.text for a, b in zip(answers, fp32, strict=True)) >= len(prompts) // 2
        assert_same(answers, light.answer(prompts, reference=True))
    with pytest.raises(WeightFormatError, match="unknown weight format 'int4'"):
        StudentGenerator({**student.spec, "weight_format": "int4"})


def test_a_label_head_decides_the_label_in_one_step_and_both_decoders_follow_it(
    student: StudentGenerator, tmp_path
) -> None:
    import torch

    from services.student_runtime.label_head import HEAD_FILE, save_label_head

    _, weight, bias = random_head(student, seed=3)
    save_label_head(tmp_path / HEAD_FILE, weight, bias)
    headed = StudentGenerator({**student.spec, "label_head": str(tmp_path / HEAD_FILE)})
    prompts = [chat(text) for text, _, _ in TINY_TRAINING] + [chat(text) for text in UNSEEN]
    plain = [headed.answer([p], reference=True)[0] for p in prompts]
    assert_same([headed.answer([p])[0] for p in prompts], plain)
    assert_same(headed.answer(prompts), plain)
    # The label is the head's argmax over its hidden state, and the answer's label confidence is its probability.
    for prompt, answer in zip(prompts, plain, strict=True):
        prep = headed.prepare(prompt)
        seq = prep.ids + headed.labels.prefix_ids
        with torch.inference_mode():
            state = headed.fast.body(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
        probs = torch.softmax(state @ weight.T + bias, dim=0)
        label = TINY_LABELS[int(probs.argmax())]
        if answer.text.startswith('{"intent": "'):
            assert answer.text.startswith('{"intent": "' + label + '"')
            assert answer.confidence <= float(probs.max()) + 1e-4
    # A head whose shape does not fit the version's labels fails the load, naming the file.
    save_label_head(tmp_path / "wrong.safetensors", weight[:2], bias[:2])
    with pytest.raises(ValueError, match=r"wrong\.safetensors has weight"):
        StudentGenerator({**student.spec, "label_head": str(tmp_path / "wrong.safetensors")})
    with pytest.raises(FileNotFoundError, match=r"label head .*missing\.safetensors does not exist"):
        StudentGenerator({**student.spec, "label_head": str(tmp_path / "missing.safetensors")})


def test_a_tail_decision_ends_usual_answers_in_one_pass_and_both_decoders_follow_it(
    student: StudentGenerator, tmp_path
) -> None:
    import torch

    from services.student_runtime.label_head import HEAD_FILE, save_label_head

    hidden, weight, bias = random_head(student, seed=5)
    prompts = [chat(text) for text, _, _ in TINY_TRAINING] + [chat(text) for text in UNSEEN]
    # A tail decision that goes both ways over these prompts: its bias at the median of its scores.
    tail_weight = torch.randn(hidden)
    with torch.inference_mode():
        states = [
            student.fast.body(
                input_ids=torch.tensor([student.prepare(p).ids + student.labels.prefix_ids])
            ).last_hidden_state[0, -1]
            for p in prompts
        ]
    scores = torch.stack([h @ tail_weight for h in states])
    save_label_head(tmp_path / HEAD_FILE, weight, bias, tail_weight, -scores.median())
    headed = StudentGenerator({**student.spec, "label_head": str(tmp_path / HEAD_FILE)})
    assert headed.tail_decision
    plain = [headed.answer([p], reference=True)[0] for p in prompts]
    alone = [headed.answer([p])[0] for p in prompts]
    assert_same(alone, plain)
    assert_same(headed.answer(prompts), plain)
    assert_same(
        headed.answer(prompts[:3], max_new_tokens=4), headed.answer(prompts[:3], max_new_tokens=4, reference=True)
    )
    usual = [bool(float(s) >= float(scores.median())) for s in scores]
    assert 0 < sum(usual) < len(usual)
    for answer, is_usual, state in zip(alone, usual, states, strict=True):
        if not answer.text.startswith('{"intent": "'):
            continue  # the model left the answer's prefix: the head never decided
        label_seq, label_prob = headed.label_head.choose(state)
        label = next(name for name, seq in headed.labels.sequences.items() if seq == label_seq)
        p_usual = float(torch.sigmoid(state @ tail_weight - scores.median()))
        if is_usual:  # label, usual tail and EOS written after the one pass that read the prompt
            assert answer.forward_passes == 1
            assert answer.text == '{"intent": "' + label + '"' + headed.spec["label_tails"][label]
            # The label and tail decided together; the prefix's tokens are the model's decisions too.
            assert answer.confidence <= label_prob * p_usual + 1e-4
        else:  # the model writes what follows the label; the decision's probability counts in the confidence
            assert answer.forward_passes >= 2
            assert answer.text.startswith('{"intent": "' + label + '"')
            assert answer.confidence <= label_prob * (1 - p_usual) + 1e-4
    # ``tail_decision: false`` in the spec: the model writes every tail, as with a head without the decision.
    off = StudentGenerator({**headed.spec, "tail_decision": False})
    assert not off.tail_decision
    assert_same(off.answer(prompts), off.answer(prompts, reference=True))
    assert all(a.forward_passes >= 2 for a in off.answer(prompts))
    save_label_head(tmp_path / "bad-tail.safetensors", weight, bias, tail_weight[:3], torch.zeros(()))
    with pytest.raises(ValueError, match=r"bad-tail\.safetensors has tail_weight"):
        StudentGenerator({**student.spec, "label_head": str(tmp_path / "bad-tail.safetensors")})


def test_answers_with_arguments_take_drafts_from_the_tail_corpus(student: StudentGenerator) -> None:
    prompts = [chat(text) for text, _, args in TINY_TRAINING if args] + [chat("refund 30 pounds now please")]
    with_corpus = student.answer(prompts)
    assert_same(with_corpus, [student.answer([p], reference=True)[0] for p in prompts])
    without = StudentGenerator({**student.spec, "tail_corpus": []}).answer(prompts)
    assert [a.token_ids for a in without] == [a.token_ids for a in with_corpus]
    # The arguments' keys and punctuation come as verified drafts: fewer passes for the same answers.
    assert sum(a.forward_passes for a in with_corpus) < sum(a.forward_passes for a in without)
