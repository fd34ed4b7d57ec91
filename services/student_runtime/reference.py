"""The plain greedy constrained decode: one forward pass per answer token over a left-padded batch.

This is the definition the fast decoder (``decode.FastDecoder``) must reproduce token for token (confidences
within 1e-4): tests and ``benchmarks/bench_student_latency.py`` compare the two. It is not the serving path.
"""

from __future__ import annotations

from typing import Any

from services.student_runtime.label_head import head_answer
from services.student_runtime.labels import END


class LabelConstraint:
    """The label constraint as the plain decode applies it: the trie is walked again at every step."""

    def __init__(self, trie: Any) -> None:
        self.tokenizer = trie.tokenizer
        self.prefix = trie.prefix
        self.trie = trie.root

    def new_state(self, prompt: str) -> dict[str, Any]:
        started = 0 if (self.prefix == "" or prompt.endswith(self.prefix)) else None
        return {"start": started, "end": None, "chosen": None}

    def allowed(self, state: dict[str, Any], generated: list[int]) -> list[int] | None:
        if state["end"] is not None:
            return None
        if state["start"] is None:
            text = self.tokenizer.decode(generated, skip_special_tokens=False)
            if not text.endswith(self.prefix):
                return None
            state["start"] = len(generated)
        node = self.trie
        for tok in generated[state["start"] :]:
            node = node.get(tok, {})
        if END in node:
            state["end"] = len(generated)
            return None
        if state["chosen"] is not None:  # a label head chose the whole label
            return [state["chosen"][len(generated) - state["start"]]]
        children = [t for t in node if t != END]
        return children or None


def reference_decode(
    student: Any, prompts: list[tuple[str, list[int]]], limit: int
) -> list[tuple[list[int], list[float], dict[str, Any] | None, int]]:
    """(tokens, probabilities, constraint state, forward passes) per prompt; ``prompts`` are (text, ids)."""
    torch = student.torch
    model = student.model
    # The transformer and its output layer called apart, so the label head reads the same hidden state.
    body = getattr(model, model.base_model_prefix)
    output_layer = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    head = student.label_head
    constraint = LabelConstraint(student.labels) if student.labels else None
    width = max(len(ids) for _, ids in prompts)
    ids = torch.full((len(prompts), width), student.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (_, seq) in enumerate(prompts):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    states = [constraint.new_state(text) if constraint else None for text, _ in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    probs: list[list[float]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    passes = 0
    past = None
    step_ids, step_pos = ids, positions
    with torch.inference_mode():
        for _ in range(limit):
            out = body(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=past,
                use_cache=True,
            )
            passes += 1
            past = out.past_key_values
            hidden = out.last_hidden_state[:, -1, :]
            logits = output_layer(hidden).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.argmax(dim=-1)
            for row in range(len(prompts)):
                if done[row]:
                    chosen[row] = student.pad_id
                    continue
                allowed = constraint.allowed(states[row], tokens[row]) if constraint else None
                state = states[row]
                if allowed and head is not None and state["chosen"] is None and state["start"] == len(tokens[row]):
                    label, prob, usual = head.decide(hidden[row], student.tail_decision)
                    state["chosen"], tok = label, label[0]
                    if usual:  # the answer ends with its label's usual tail: complete now
                        rest = head_answer(
                            label, student.fast.usual_tail(label), student.end_id, limit - len(tokens[row])
                        )
                        tokens[row].extend(rest)
                        probs[row].extend([prob] + [1.0] * (len(rest) - 1))
                        if len(rest) >= len(label):
                            state["end"] = state["start"] + len(label)
                        done[row] = True
                        chosen[row] = student.pad_id
                        continue
                elif allowed:
                    allowed_t = torch.tensor(allowed, dtype=torch.long)
                    sub = logprobs[row, allowed_t]
                    best = int(sub.argmax())
                    tok = allowed[best]
                    prob = float(torch.exp(sub[best] - torch.logsumexp(sub, dim=0)))
                else:
                    tok = int(chosen[row])
                    prob = float(torch.exp(logprobs[row, tok]))
                chosen[row] = tok
                tokens[row].append(tok)
                probs[row].append(prob)
                if tok in student.eos_ids:
                    done[row] = True
            if all(done):
                break
            step_ids = chosen.unsqueeze(-1)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype)], dim=-1)
    for row in range(len(prompts)):
        if constraint and states[row] is not None:
            constraint.allowed(states[row], tokens[row])  # closes a label completed on the last step
    return [(tokens[r], probs[r], states[r], passes) for r in range(len(prompts))]
