"""A tiny Hugging Face causal LM, tokenizer and LoRA adapter built offline, for tests of serving and training.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few strings with the ``tokenizers``
library (byte-level like SmolLM2's, so every string round-trips and JSON/labels tokenise realistically),
the model a randomly initialised Llama with hidden size 32 and two layers (a few hundred KB, milliseconds a
token).
Its answers are noise, but deterministic for a given seed, which is all a plumbing test needs.
"""

from __future__ import annotations

import os
from pathlib import Path

# Tests must never reach the hub; set before transformers is imported anywhere through this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A minimal chat template in the usual shape: role markers, an end marker, and the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TRAINING_TEXT = [
    '{"intent": "card_arrival", "tool": "track_card", "arguments": {}, "reply": "Your card is on its way."}',
    '{"intent": "lost_or_stolen_card", "tool": "block_card", "arguments": {"card": "debit"}, "reply": "Ok"}',
    '{"intent": "balance", "tool": "get_balance", "arguments": {}, "reply": "Here is your balance."}',
    "When will my new card arrive? I lost my card yesterday. What is my balance?",
    "You are a support agent. Answer with JSON: intent, tool, arguments, reply.",
    "refund pending transfer exchange rate top up failed cash withdrawal declined",
]


def build_tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with pad/eos/bos tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> Path:
    """Save a tiny Llama causal LM and its tokenizer to ``path`` (``from_pretrained``-loadable); return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_lora_adapter(base_path: Path, path: Path, seed: int = 1, r: int = 4) -> Path:
    """Save a LoRA adapter (q/k/v/o, like the design's) for the model at ``base_path`` and return ``path``.

    The adapter's weights are random rather than peft's default zero-initialised B matrix, so a model with the
    adapter answers differently from the base: that difference is how a test sees that the adapter was loaded.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # random A and B: a visible change
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)  # tiny r and hidden size: make the change big enough to flip greedy tokens
    path = Path(path)
    model.save_pretrained(path)
    return path


# A tiny student trained to answer in the compact format, with some answers carrying arguments (so the label
# tail's draft is sometimes rejected) and labels sharing token prefixes (so some label steps are forced).
TINY_TRAINING = [
    ("When will my new card arrive?", "card_arrival", {}),
    ("My card has still not arrived", "card_arrival", {}),
    ("I lost my card yesterday", "lost_or_stolen_card", {}),
    ("Someone stole my card", "lost_or_stolen_card", {}),
    ("What is my balance?", "balance", {}),
    ("Show my account balance please", "balance", {}),
    ("I want a refund of 20 euros", "refund", {"amount": "20 euros"}),
    ("Refund my pending transfer", "refund", {}),
    ("My top up failed", "top_up_failed", {}),
    ("Top up of 5 pounds failed", "top_up_failed", {"amount": "5 pounds"}),
]
TINY_LABELS = sorted({label for _, label, _ in TINY_TRAINING})
TINY_SYSTEM = "You are a support agent. Answer with JSON: intent, arguments."


def tiny_target(label: str, arguments: dict[str, str]) -> str:
    import json

    return json.dumps({"intent": label, "arguments": arguments})


def tiny_encoded(tokenizer, label_index: dict[str, int] | None = None) -> list:
    """``TINY_TRAINING`` in the trainer's encoding (``data.encode_example``), with the label head's fields
    (label and tail decision) when ``label_index`` is given."""
    from services.student_runtime.prompt import render_prompt
    from services.trainer import data as D

    tails, _ = D.label_tails(tiny_target(label, args) for _, label, args in TINY_TRAINING)

    encoded = [
        D.encode_example(
            tokenizer,
            render_prompt(tokenizer, [{"role": "user", "content": text}], TINY_SYSTEM),
            tiny_target(label, args),
            tokenizer.eos_token_id,
            256,
            label_index=label_index,
            label_tails=tails if label_index is not None else None,
        )
        for text, label, args in TINY_TRAINING
    ]
    return [e for e in encoded if e is not None]


def build_trained_tiny_student(path: Path, steps: int = 150, seed: int = 0) -> Path:
    """A tiny model fully fine-tuned (a few seconds) on ``TINY_TRAINING`` in the trainer's encoding: it writes
    the answer structure, often the right label, and not always (a realistic mix for decoder tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.trainer import data as D

    base = build_tiny_model(Path(path), seed=seed, hidden_size=64, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    batch = D.collate(tiny_encoded(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(base)
    return base


# A quality gate every tiny student passes: the tests that use it are about the loop, not the student's quality.
LAX_VALIDATION = {"quality_threshold": 0.0, "format_threshold": 0.0, "served_agreement": 0.0}
