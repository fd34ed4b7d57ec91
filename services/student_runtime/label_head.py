"""The label head: one decision over a version's valid labels from the hidden state where the label starts.

Trained beside the LoRA (``services/trainer/train.py``) on the hidden state of the answer prefix's last token
(``{"intent": "``), the one whose output layer row would otherwise pick the label's first token. At serving the
head's choice replaces the label's token-by-token decisions: its tokens are then forced (appended without a
decision), and its probability is the answer's label confidence. The weights travel as ``label_head.safetensors``
beside the adapter (or the merged model), rows in the order of the spec's ``labels``.
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


def save_label_head(path: Path, weight: Any, bias: Any) -> None:
    from safetensors.torch import save_file

    save_file({"weight": weight.detach().float().contiguous(), "bias": bias.detach().float().contiguous()}, str(path))


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

    def choose(self, hidden: Any) -> tuple[list[int], float]:
        """The chosen label's token ids and its probability among the labels, for one hidden state."""
        import torch

        scores = hidden.float() @ self.weight.T + self.bias
        best = int(scores.argmax())
        return self.sequences[best], float(torch.exp(scores[best] - torch.logsumexp(scores, dim=0)))
