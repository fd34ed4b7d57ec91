"""The label head: one decision over a version's valid labels from the hidden state where the label starts.

Trained beside the LoRA (``services/trainer/train.py``) on the hidden state of the answer prefix's last token
(``{"intent": "``), the one whose output layer row would otherwise pick the label's first token. At serving the
head's choice replaces the label's token-by-token decisions: its tokens are then forced (appended without a
decision), and its probability is the answer's label confidence. The weights travel as ``label_head.safetensors``
beside the adapter (or the merged model), rows in the order of the spec's ``labels``.

The same file may hold the **tail decision** (``tail_weight``, ``tail_bias``), trained on the same hidden state:
does the answer go on with its label's usual tail (``label_tails`` of the spec: ``", "arguments": {}}`` for the
demo)? Where it does, the answer is complete after that one forward pass: the label's tokens, the usual tail and
EOS are written without feeding them to the model. Where it does not (the answer has arguments), the label is
fed and the model writes the rest as before. So the model generates only the arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEAD_FILE = "label_head.safetensors"


def head_path(name: str, adapter_dir: Path | None, base_dir: Path | None) -> Path:
    """Where a spec's ``label_head`` is: as written if absolute, else beside the adapter, else in the (merged)
    model's folder."""
    path = Path(name)
    if path.is_absolute():
        return path
    folder = adapter_dir or base_dir
    if folder is None:
        raise FileNotFoundError(f"label head {name}: no adapter or local model folder to find it in")
    return folder / path


def save_label_head(path: Path, weight: Any, bias: Any, tail_weight: Any = None, tail_bias: Any = None) -> None:
    """Write a head (and, with ``tail_weight`` [hidden] and ``tail_bias`` [], its tail decision)."""
    from safetensors.torch import save_file

    tensors = {"weight": weight, "bias": bias}
    if tail_weight is not None and tail_bias is not None:
        tensors |= {"tail_weight": tail_weight.reshape(-1), "tail_bias": tail_bias.reshape(())}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path))


def head_answer(label: list[int], tail: list[int], end_id: int, limit: int) -> list[int]:
    """The answer's tokens from the label on when the tail decision says "the usual tail": the label's tokens, its
    usual tail and EOS, cut at ``limit`` tokens as a decode would stop (both decoders write it so)."""
    return [*label, *tail, end_id][: max(0, limit)]


class LabelHead:
    """Scores the labels of one loaded version (fp32, as the output layer is kept)."""

    def __init__(self, path: Path, sequences: list[list[int]], hidden_size: int) -> None:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"label head {path} does not exist")
        tensors = load_file(str(path))
        if "weight" not in tensors or "bias" not in tensors:
            raise ValueError(f"label head {path} lacks 'weight' or 'bias'")
        self.weight, self.bias = tensors["weight"].float(), tensors["bias"].float()
        if tuple(self.weight.shape) != (len(sequences), hidden_size) or tuple(self.bias.shape) != (len(sequences),):
            raise ValueError(
                f"label head {path} has weight {tuple(self.weight.shape)} and bias {tuple(self.bias.shape)}; the "
                f"version has {len(sequences)} labels and hidden size {hidden_size}"
            )
        self.sequences = [list(s) for s in sequences]
        self.tail_weight = self.tail_bias = None
        if "tail_weight" in tensors:
            self.tail_weight, self.tail_bias = tensors["tail_weight"].float(), tensors["tail_bias"].float()
            if tuple(self.tail_weight.shape) != (hidden_size,) or self.tail_bias.numel() != 1:
                raise ValueError(
                    f"label head {path} has tail_weight {tuple(self.tail_weight.shape)}; the version's hidden size "
                    f"is {hidden_size}"
                )

    @property
    def decides_tail(self) -> bool:
        return self.tail_weight is not None

    def choose(self, hidden: Any) -> tuple[list[int], float]:
        """The chosen label's token ids and its probability among the labels, for one hidden state."""
        import torch

        scores = hidden.float() @ self.weight.T + self.bias
        best = int(scores.argmax())
        return self.sequences[best], float(torch.exp(scores[best] - torch.logsumexp(scores, dim=0)))

    def tail_is_usual(self, hidden: Any) -> tuple[bool, float]:
        """(the answer goes on with its label's usual tail, the probability of that decision)."""
        import torch

        assert self.tail_weight is not None and self.tail_bias is not None
        p = float(torch.sigmoid(hidden.float() @ self.tail_weight + self.tail_bias.reshape(())))
        return (True, p) if p >= 0.5 else (False, 1.0 - p)

    def decide(self, hidden: Any, tail_decision: bool) -> tuple[list[int], float, bool]:
        """The one decision both decoders take where the label starts: (the label's token ids, its probability
        times the tail decision's, whether the answer ends with the label's usual tail). Without the tail
        decision the tail is never taken as usual and the probability is the label's."""
        label, prob = self.choose(hidden)
        if not tail_decision:
            return label, prob, False
        usual, tail_prob = self.tail_is_usual(hidden)
        return label, prob * tail_prob, usual
