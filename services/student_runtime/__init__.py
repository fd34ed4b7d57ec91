"""The student runtime: everything that turns a PROMPT string into a student's answer.

One package used by the Triton model file (which only adapts tensors), the trainer's holdout evaluation, the
benchmarks and the tests, so every one of them answers with the same code:

* ``prompt``: parsing and validating a PROMPT (chat messages as JSON, or a pre-formatted prompt), rendering it
  with the tokenizer's chat template, the system prompt's shared token prefix, and the one truncation rule that
  training and serving both apply;
* ``labels``: the prefix trie of the valid labels' token ids (constrained decoding);
* ``answer``: putting an answer's template-fixed fields back (compact answers);
* ``decode``: the fast greedy constrained decoder (jump-forward over forced tokens, drafts of the answer's fixed
  structure verified in one forward pass, only allowed tokens scored, the system prompt's keys/values computed
  once, ragged batches);
* ``reference``: the plain greedy constrained decode (one forward pass per token), kept as the definition the
  fast decoder must reproduce token for token;
* ``generator``: ``StudentGenerator``, loading a student from its spec and answering with either decoder.
"""

from services.student_runtime.answer import expand_answer
from services.student_runtime.generator import Answer, StudentGenerator, load_spec
from services.student_runtime.prompt import PromptError, fit_prompt, parse_prompt, render_prompt

__all__ = [
    "Answer",
    "PromptError",
    "StudentGenerator",
    "expand_answer",
    "fit_prompt",
    "load_spec",
    "parse_prompt",
    "render_prompt",
]
