"""The training step's loss (``train.batch_loss``) is the plain Hugging Face loss, with its savings.

On the tiny model with LoRA: the answer-only output layer and the shared system-prompt pass give the same loss
and the same gradients as ``model(**batch).loss`` (and as each other), with and without a label head.
"""

from __future__ import annotations

import pytest

from services.core.agents import Distillation
from services.trainer import data as D
from services.trainer.train import add_lora, batch_loss, shared_prefix_length
from tests.helpers.tiny_model import TINY_LABELS, TINY_SYSTEM, build_tiny_model, tiny_encoded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64)
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = add_lora(
        AutoModelForCausalLM.from_pretrained(base),
        Distillation(lora_r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    with torch.no_grad():  # B starts at zero: make the adapter matter so its gradients are compared too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model, tokenizer, tiny_encoded(tokenizer, {label: i for i, label in enumerate(TINY_LABELS)})


def grads_of(model, head, loss) -> list:
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if head else [])
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in params]


def test_the_shared_prefix_is_the_system_prompt_and_stops_before_anything_learned(tiny) -> None:
    _model, tokenizer, encoded = tiny
    batch = D.collate(encoded[:4], tokenizer.pad_token_id)
    start = shared_prefix_length(batch)
    assert start > 0
    prompt = tokenizer.decode(batch["input_ids"][0, :start])
    assert TINY_SYSTEM in prompt
    assert (batch["labels"][:, : start + 1] == D.IGNORE).all()  # nothing predicted from the shared part
    assert int(batch["head_pos"].min()) >= start
    assert shared_prefix_length(D.collate(encoded[:1], tokenizer.pad_token_id)) == 0  # one row: nothing to share


@pytest.mark.parametrize("with_head", [False, True])
def test_the_loss_and_gradients_are_the_plain_forwards(tiny, with_head: bool) -> None:
    import torch

    model, tokenizer, encoded = tiny
    model.train()
    batch = D.collate(encoded, tokenizer.pad_token_id)
    head = tail = None
    if with_head:
        torch.manual_seed(1)
        head = torch.nn.Linear(64, len(TINY_LABELS))
        tail = torch.nn.Linear(64, 1)
        # Both kinds of answer are in the batch: the tail decision learns from each.
        assert set(batch["head_usual"].tolist()) == {0, 1}
    plain_inputs = {k: v for k, v in batch.items() if k not in ("head_pos", "head_label", "head_usual")}
    plain = model(**plain_inputs, output_hidden_states=True)
    expected = plain.loss
    if head is not None and tail is not None:
        hidden = plain.hidden_states[-1][torch.arange(len(encoded)), batch["head_pos"]]
        expected = expected + 0.5 * torch.nn.functional.cross_entropy(head(hidden), batch["head_label"])
        expected = expected + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
            tail(hidden)[:, 0], batch["head_usual"].float()
        )
    heads = torch.nn.ModuleList([head, tail]) if head is not None else None
    expected_grads = grads_of(model, heads, expected)
    for share in (False, True):
        loss = batch_loss(model, batch, head, 0.5, share_prefix=share, tail=tail)
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
        for got, want in zip(grads_of(model, heads, loss), expected_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
