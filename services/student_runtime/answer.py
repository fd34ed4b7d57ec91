"""Compact answers: the fields an answer template fixes per label are put back after generation."""

from __future__ import annotations

import json
from typing import Any


def expand_answer(text: str, template: dict[str, Any] | None) -> str:
    """The full answer for a compact one: the label's fixed fields added back, keys in the teacher's order.
    Text that is not a JSON object with a known label is returned as is (the format check judges it)."""
    if not template:
        return text
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return text
    label_field = str(template.get("label_field") or "intent")
    if not isinstance(data, dict) or not isinstance(data.get(label_field), str):
        return text
    fixed = (template.get("by_label") or {}).get(data[label_field])
    if not fixed:
        return text
    merged = {**fixed, **data}
    order = [k for k in template.get("fields") or [] if k in merged]
    ordered = {k: merged[k] for k in order} | {k: v for k, v in merged.items() if k not in order}
    return json.dumps(ordered, ensure_ascii=False)
