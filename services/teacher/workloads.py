"""The workloads behind the reference teacher: labelled public data sets in ``data/`` and, for each, a compact
output contract the agent (teacher and student alike) answers in.

The contract is one JSON object, kept short on purpose because the student trains on 2 CPU cores and every
answer token costs training and inference time::

    {"intent": "<label>", "tool": "<tool name>", "arguments": {...}, "reply": "<one short sentence>"}

* ``intent``: the data set's label. BANKING77 has one intent per message; NLU++ has several, written as the
  sorted labels joined by ``+`` (``"card+lost_stolen"``) so that one string comparison decides agreement.
* ``tool``: derived from the intent by the fixed tables below (``BANKING77_TOOLS``, ``NLUPP_TOOLS``).
* ``arguments``: what can be read from the message itself. NLU++: each annotated slot's text span
  (``{"amount_of_money": "73 pounds", "date": "last night"}``); its resolved values (dates relative to the
  corpus's reference day) cannot be read from the text and are left out. BANKING77 has no slot annotation:
  ``amount`` and ``currency`` when the message names them (``EXTRACTORS``), else ``{}``.
* ``reply``: one templated sentence per intent (BANKING77) or per tool (NLU++).

``Workload`` exposes ``name``, ``intents``, ``tools``, ``tool_for_intent``, ``examples(split)``,
``output_schema()`` (a JSON schema for agents.yaml and format checks), ``answer_for(example)`` and
``check_output(text)`` (the format-compliance check without a JSON-schema library), and for plan-and-execute
(docs/plan-execute.md) ``plan_for(text, example)`` (one step per intent) and ``intent_answer(intent, arguments)``
(a step's answer).
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOAD_NAMES = ("banking77", "nlupp")
SPLITS = ("train", "test", "all")
NO_INTENT = "inform"  # NLU++ messages with slots but no intent label: the user only gives information
# The instruction of a step in the reference teacher's plans; it answers a request whose last user message has
# this form for that one intent (``STEP_INSTRUCTION_RE``), reading the arguments from the quoted message.
STEP_INSTRUCTION = "Handle only the '{intent}' part of: {text}"
STEP_INSTRUCTION_RE = re.compile(r"^Handle only the '(?P<intent>[^'\n]+)' part of: (?P<text>.+)$", re.DOTALL)

# BANKING77: 77 intents onto 15 tools (each intent in exactly one list; a unit test checks the cover).
BANKING77_TOOLS: dict[str, tuple[str, ...]] = {
    "card_delivery_status": ("card_arrival", "card_delivery_estimate"),
    "card_order": (
        "activate_my_card",
        "card_linking",
        "getting_virtual_card",
        "get_physical_card",
        "order_physical_card",
        "getting_spare_card",
        "get_disposable_virtual_card",
        "disposable_card_limits",
        "card_about_to_expire",
    ),
    "card_block": ("lost_or_stolen_card", "compromised_card", "lost_or_stolen_phone", "card_swallowed"),
    "card_troubleshooting": (
        "card_not_working",
        "contactless_not_working",
        "virtual_card_not_working",
        "declined_card_payment",
        "card_acceptance",
        "apple_pay_or_google_pay",
        "pending_card_payment",
    ),
    "pin_and_passcode": ("pin_blocked", "change_pin", "passcode_forgotten"),
    "transfer_status": (
        "pending_transfer",
        "transfer_not_received_by_recipient",
        "transfer_timing",
        "failed_transfer",
        "declined_transfer",
        "cancel_transfer",
        "beneficiary_not_allowed",
        "balance_not_updated_after_bank_transfer",
        "receiving_money",
        "transfer_into_account",
    ),
    "top_up_support": (
        "automatic_top_up",
        "pending_top_up",
        "top_up_limits",
        "top_up_reverted",
        "topping_up_by_card",
        "verify_top_up",
        "top_up_by_cash_or_cheque",
        "top_up_failed",
        "balance_not_updated_after_cheque_or_cash_deposit",
    ),
    "exchange_rates": (
        "exchange_rate",
        "exchange_via_app",
        "card_payment_wrong_exchange_rate",
        "wrong_exchange_rate_for_cash_withdrawal",
        "fiat_currency_support",
    ),
    "fees_info": (
        "top_up_by_bank_transfer_charge",
        "card_payment_fee_charged",
        "transfer_fee_charged",
        "exchange_charge",
        "top_up_by_card_charge",
        "cash_withdrawal_charge",
        "extra_charge_on_statement",
    ),
    "transaction_dispute": (
        "card_payment_not_recognised",
        "direct_debit_payment_not_recognised",
        "cash_withdrawal_not_recognised",
        "transaction_charged_twice",
        "reverted_card_payment?",
    ),
    "refund_request": ("request_refund", "Refund_not_showing_up"),
    "cash_withdrawal_support": (
        "atm_support",
        "pending_cash_withdrawal",
        "declined_cash_withdrawal",
        "wrong_amount_of_cash_received",
    ),
    "account_verification": (
        "why_verify_identity",
        "unable_to_verify_identity",
        "verify_my_identity",
        "verify_source_of_funds",
    ),
    "account_management": ("edit_personal_details", "terminate_account"),
    "general_support": ("age_limit", "country_support", "supported_cards_and_currencies", "visa_or_mastercard"),
}

# One short sentence per BANKING77 intent (the labels are the data set's own, odd spellings included).
BANKING77_REPLIES: dict[str, str] = {
    "card_arrival": "Let me check where your card is.",
    "card_delivery_estimate": "Let me check when your card will arrive.",
    "activate_my_card": "I can help you activate your card.",
    "card_linking": "I can help you link your card.",
    "getting_virtual_card": "I can help you get a virtual card.",
    "get_physical_card": "I can help you get a physical card.",
    "order_physical_card": "I can help you order a physical card.",
    "getting_spare_card": "I can help you get a spare card.",
    "get_disposable_virtual_card": "I can help you get a disposable virtual card.",
    "disposable_card_limits": "Let me explain the limits of disposable cards.",
    "card_about_to_expire": "I can help you replace your expiring card.",
    "lost_or_stolen_card": "I will block your lost or stolen card now.",
    "compromised_card": "I will block your card to keep it safe.",
    "lost_or_stolen_phone": "I will secure your account and cards now.",
    "card_swallowed": "I will block the card the ATM kept.",
    "card_not_working": "Let me check why your card is not working.",
    "contactless_not_working": "Let me check why contactless is not working.",
    "virtual_card_not_working": "Let me check why your virtual card is not working.",
    "declined_card_payment": "Let me check why your card payment was declined.",
    "card_acceptance": "Let me check where your card is accepted.",
    "apple_pay_or_google_pay": "I can help you set up Apple Pay or Google Pay.",
    "pending_card_payment": "Let me check your pending card payment.",
    "pin_blocked": "I can help you unblock your PIN.",
    "change_pin": "I can help you change your PIN.",
    "passcode_forgotten": "I can help you reset your passcode.",
    "pending_transfer": "Let me check your pending transfer.",
    "transfer_not_received_by_recipient": "Let me check why the recipient has not received it.",
    "transfer_timing": "Let me check how long your transfer takes.",
    "failed_transfer": "Let me check why your transfer failed.",
    "declined_transfer": "Let me check why your transfer was declined.",
    "cancel_transfer": "I can help you cancel your transfer.",
    "beneficiary_not_allowed": "Let me check why the beneficiary was refused.",
    "balance_not_updated_after_bank_transfer": "Let me check why your balance has not updated.",
    "receiving_money": "Let me explain how to receive money.",
    "transfer_into_account": "Let me explain how to transfer money in.",
    "automatic_top_up": "I can help you set up automatic top-ups.",
    "pending_top_up": "Let me check your pending top-up.",
    "top_up_limits": "Let me explain the top-up limits.",
    "top_up_reverted": "Let me check why your top-up was reverted.",
    "topping_up_by_card": "I can help you top up by card.",
    "verify_top_up": "I can help you verify your top-up.",
    "top_up_by_cash_or_cheque": "Let me explain topping up by cash or cheque.",
    "top_up_failed": "Let me check why your top-up failed.",
    "balance_not_updated_after_cheque_or_cash_deposit": "Let me check why your deposit is not showing.",
    "exchange_rate": "Let me look up the exchange rate.",
    "exchange_via_app": "I can help you exchange currency in the app.",
    "card_payment_wrong_exchange_rate": "Let me check the exchange rate on your payment.",
    "wrong_exchange_rate_for_cash_withdrawal": "Let me check the exchange rate on your withdrawal.",
    "fiat_currency_support": "Let me check which currencies we support.",
    "top_up_by_bank_transfer_charge": "Let me explain the bank transfer top-up fee.",
    "card_payment_fee_charged": "Let me check the fee on your card payment.",
    "transfer_fee_charged": "Let me check the fee on your transfer.",
    "exchange_charge": "Let me explain the exchange fee.",
    "top_up_by_card_charge": "Let me explain the card top-up fee.",
    "cash_withdrawal_charge": "Let me explain the cash withdrawal fee.",
    "extra_charge_on_statement": "Let me check the extra charge on your statement.",
    "card_payment_not_recognised": "I will look into the card payment you do not recognise.",
    "direct_debit_payment_not_recognised": "I will look into the direct debit you do not recognise.",
    "cash_withdrawal_not_recognised": "I will look into the withdrawal you do not recognise.",
    "transaction_charged_twice": "I will look into the double charge.",
    "reverted_card_payment?": "Let me check why your card payment was reverted.",
    "request_refund": "I can help you request a refund.",
    "Refund_not_showing_up": "Let me check where your refund is.",
    "atm_support": "Let me help you with the ATM.",
    "pending_cash_withdrawal": "Let me check your pending cash withdrawal.",
    "declined_cash_withdrawal": "Let me check why your withdrawal was declined.",
    "wrong_amount_of_cash_received": "I will look into the wrong cash amount.",
    "why_verify_identity": "Let me explain why we verify your identity.",
    "unable_to_verify_identity": "I can help you finish verifying your identity.",
    "verify_my_identity": "I can help you verify your identity.",
    "verify_source_of_funds": "Let me explain how to verify your source of funds.",
    "edit_personal_details": "I can help you update your personal details.",
    "terminate_account": "I can help you close your account.",
    "age_limit": "Let me explain the age requirements.",
    "country_support": "Let me check which countries we support.",
    "supported_cards_and_currencies": "Let me check which cards and currencies we support.",
    "visa_or_mastercard": "Let me check which card network you get.",
}

# NLU++ (banking domain): a message has several intents, so the tool is that of its highest-ranked intent in
# this ordered table (most specific first: a lost card is a card block whatever else the message asks).
NLUPP_TOOLS: dict[str, tuple[str, ...]] = {
    "card_block": ("lost_stolen",),
    "handoff_to_agent": ("handoff",),
    "book_appointment": ("appointment",),
    "refund_request": ("refund",),
    "lending_info": ("loan", "mortgage", "overdraft", "credit"),
    "recurring_payments": ("direct_debit", "standing_order"),
    "fees_and_limits": ("fees_interests", "limits"),
    "card_services": ("card", "pin", "contactless", "debit"),
    "cash_and_cheques": ("withdrawal", "cheque"),
    "payments_transfers": ("transfer_payment_deposit", "international", "arrival"),
    "account_services": ("account", "savings", "current", "business", "balance"),
    "general_support": (
        "wrong_notworking_notshowing",
        "cancel_close_leave_freeze",
        "change",
        "make_open_apply_setup_get_activate",
        "request_info",
        "how",
        "why",
        "when",
        "how_much",
        "how_long",
        "more_higher_after",
        "less_lower_before",
        "new",
        "existing",
    ),
    "conversation": (
        "affirm",
        "deny",
        "dont_know",
        "acknowledge",
        "greet",
        "end_call",
        "thank",
        "repeat",
        NO_INTENT,
    ),
}

NLUPP_REPLIES: dict[str, str] = {
    "card_block": "I will block your card right away.",
    "handoff_to_agent": "I will connect you with a colleague.",
    "book_appointment": "I can help you with your appointment.",
    "refund_request": "I can help you with your refund.",
    "lending_info": "I can help you with borrowing and credit.",
    "recurring_payments": "I can help you with your regular payments.",
    "fees_and_limits": "Let me explain the fees and limits.",
    "card_services": "I can help you with your card.",
    "cash_and_cheques": "I can help you with cash and cheques.",
    "payments_transfers": "I can help you with your payment.",
    "account_services": "I can help you with your account.",
    "general_support": "I can help you with that.",
    "conversation": "Thanks, noted.",
}

# BANKING77 arguments: an amount only next to a currency marker ("£5", "20 euros", "100 GBP"), so that "2
# weeks" is no amount; a currency on its own ("rate for EUR") is still an argument for exchange questions.
_CURRENCY_WORDS: dict[str, str] = {
    "£": "GBP",
    "$": "USD",
    "€": "EUR",
    "¥": "JPY",
    "gbp": "GBP",
    "usd": "USD",
    "eur": "EUR",
    "jpy": "JPY",
    "chf": "CHF",
    "aud": "AUD",
    "cad": "CAD",
    "rub": "RUB",
    "pound": "GBP",
    "pounds": "GBP",
    "quid": "GBP",
    "dollar": "USD",
    "dollars": "USD",
    "euro": "EUR",
    "euros": "EUR",
    "yen": "JPY",
    "ruble": "RUB",
    "rubles": "RUB",
    "rouble": "RUB",
    "roubles": "RUB",
    "franc": "CHF",
    "francs": "CHF",
}
_NUM = r"\d+(?:,\d{3})*(?:\.\d+)?"
_SYM = r"[£$€¥]"
_WORD = r"(?:" + "|".join(sorted((re.escape(w) for w in _CURRENCY_WORDS if w[0].isalpha()), key=len, reverse=True))
_WORD += r")\b"
_AMOUNT_RE = re.compile(
    rf"(?P<sym>{_SYM})\s?(?P<n1>{_NUM})|(?P<n2>{_NUM})\s?(?P<sym2>{_SYM})|(?P<n3>{_NUM})\s?(?P<w>{_WORD})",
    re.IGNORECASE,
)
_CURRENCY_RE = re.compile(rf"(?P<sym>{_SYM})|\b(?P<w>{_WORD})", re.IGNORECASE)


def banking77_arguments(text: str) -> dict[str, str]:
    """``amount`` (digits as written, thousands separators dropped) and ``currency`` (ISO code) when present."""
    match = _AMOUNT_RE.search(text)
    if match:
        number = match.group("n1") or match.group("n2") or match.group("n3")
        marker = match.group("sym") or match.group("sym2") or match.group("w")
        return {"amount": number.replace(",", ""), "currency": _CURRENCY_WORDS[marker.lower()]}
    match = _CURRENCY_RE.search(text)
    if match:
        marker = match.group("sym") or match.group("w")
        return {"currency": _CURRENCY_WORDS[marker.lower()]}
    return {}


@dataclass(frozen=True)
class Example:
    """One labelled message: ``intent`` is the contract's label, ``intents`` its parts (one for BANKING77)."""

    text: str
    intent: str
    intents: tuple[str, ...]
    arguments: Mapping[str, str] = field(default_factory=dict)
    split: str = "train"


def nlupp_label(intents: Iterable[str]) -> str:
    """The contract's label for a set of NLU++ intents: sorted, ``+``-joined; no intent at all is ``inform``."""
    parts = sorted(set(intents))
    return "+".join(parts) if parts else NO_INTENT


@dataclass
class Workload:
    name: str
    intents: list[str]  # the atomic labels (NLU++: the parts of a "+"-joined label)
    tools: list[str]
    tool_table: dict[str, tuple[str, ...]]  # tool -> intents, in rank order (first listed wins for NLU++)
    replies: dict[str, str]  # intent (BANKING77) or tool (NLU++) -> reply
    multi_label: bool
    _examples: list[Example] = field(default_factory=list, repr=False)
    _rank: dict[str, int] = field(default_factory=dict, repr=False)
    _tool_of: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for rank, (tool, intents) in enumerate(self.tool_table.items()):
            for intent in intents:
                self._tool_of[intent] = tool
                self._rank[intent] = rank

    @property
    def model(self) -> str:
        """The model name that selects this workload on the reference teacher."""
        return f"reference/{self.name}"

    def split_intent(self, intent: str) -> tuple[str, ...]:
        return tuple(intent.split("+")) if self.multi_label else (intent,)

    def tool_for_intent(self, intent: str) -> str:
        """The tool for a contract label (for NLU++ a ``+``-joined label: its highest-ranked part decides).
        Raises KeyError for a label outside the workload."""
        parts = self.split_intent(intent)
        best = min(parts, key=lambda p: self._rank[p])
        return self._tool_of[best]

    def reply_for(self, intent: str) -> str:
        return self.replies[self.tool_for_intent(intent) if self.multi_label else intent]

    def has_intent(self, intent: str) -> bool:
        """Whether ``intent`` is one of the workload's atomic labels (NLU++: one part of a ``+`` label)."""
        return intent in self._tool_of

    def intent_answer(self, intent: str, arguments: Mapping[str, str]) -> dict[str, Any]:
        """The contract's answer for one atomic intent: what a plan step for that intent is answered with."""
        return {
            "intent": intent,
            "tool": self.tool_for_intent(intent),
            "arguments": dict(arguments),
            "reply": self.reply_for(intent),
        }

    def plan_for(self, text: str, example: Example) -> list[dict[str, str]]:
        """A plan for ``text``, labelled like ``example`` (itself or its nearest neighbour): one step per atomic
        intent, in tool-table rank order (most specific first: block a lost card before answering a question),
        ties by name; each step's instruction quotes the whole message (``STEP_INSTRUCTION``), so it stands on
        its own and its arguments can be read from it."""
        intents = sorted(set(example.intents), key=lambda i: (self._rank.get(i, len(self._rank)), i))
        return [
            {"instruction": STEP_INSTRUCTION.format(intent=i, text=text), "intent": i, "tool": self.tool_for_intent(i)}
            for i in intents
        ]

    def examples(self, split: str = "all") -> list[Example]:
        """Labelled messages of a split: ``train``, ``test`` or ``all``. BANKING77 has its own train/test
        files; NLU++ folds 0-15 are ``train`` and folds 16-19 ``test`` (about 80/20)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split == "all":
            return list(self._examples)
        return [e for e in self._examples if e.split == split]

    def answer_for(self, example: Example, text: str | None = None) -> dict[str, Any]:
        """The contract's answer for a labelled message (key order fixed: the JSON text is canonical). With
        ``text``, the answer is for that (unlabelled) message, labelled like ``example``, its nearest neighbour:
        the arguments are then read from ``text`` (``arguments_for``)."""
        arguments = dict(example.arguments) if text is None else self.arguments_for(text, example)
        return {
            "intent": example.intent,
            "tool": self.tool_for_intent(example.intent),
            "arguments": arguments,
            "reply": self.reply_for(example.intent),
        }

    def arguments_for(self, text: str, neighbour: Example) -> dict[str, str]:
        """Arguments of a message outside the data set: BANKING77's extractor; for NLU++ the neighbour's slot
        values that occur in the message (a neighbour's "yesterday" is no argument of a message without it)."""
        if not self.multi_label:
            return banking77_arguments(text)
        return {
            k: v
            for k, v in neighbour.arguments.items()
            if re.search(rf"(?<!\w){re.escape(v)}(?!\w)", text, re.IGNORECASE)
        }

    def output_schema(self, intents: Iterable[str] | None = None) -> dict[str, Any]:
        """JSON schema of an answer; ``intents`` narrows it to an agent's subset of (atomic) intents."""
        chosen = list(self.intents if intents is None else intents)
        unknown = [i for i in chosen if i not in self._tool_of]
        if unknown:
            raise ValueError(f"{self.name}: unknown intents {unknown}")
        tools = [t for t in self.tools if any(self._tool_of[i] == t for i in chosen)]
        if self.multi_label:
            alternatives = "|".join(re.escape(i) for i in sorted(chosen))
            intent_schema: dict[str, Any] = {
                "type": "string",
                "pattern": rf"^(?:{alternatives})(?:\+(?:{alternatives}))*$",
                "description": "the intents, sorted and joined with '+'",
            }
        else:
            intent_schema = {"type": "string", "enum": chosen}
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"{self.name} agent answer",
            "type": "object",
            "required": ["intent", "tool", "arguments", "reply"],
            "additionalProperties": False,
            "properties": {
                "intent": intent_schema,
                "tool": {"type": "string", "enum": tools},
                "arguments": {"type": "object", "additionalProperties": {"type": "string"}},
                "reply": {"type": "string", "minLength": 1, "maxLength": 200},
            },
        }

    def check_output(self, text: str | None) -> list[str]:
        """Format compliance of an answer text: the problems found (empty when it parses, has exactly the
        contract's keys, a known intent, a valid tool and string arguments). Hedging is a content problem,
        not a format one, and is not checked here."""
        if text is None:
            return ["no content"]
        try:
            data = json.loads(text)
        except ValueError as exc:
            return [f"not valid JSON: {exc}"]
        if not isinstance(data, dict):
            return ["not a JSON object"]
        problems = []
        expected = {"intent", "tool", "arguments", "reply"}
        if set(data) != expected:
            problems.append(f"keys {sorted(data)} instead of {sorted(expected)}")
        intent = data.get("intent")
        if not isinstance(intent, str) or not all(p in self._tool_of for p in self.split_intent(intent)):
            problems.append(f"unknown intent {intent!r}")
        if data.get("tool") not in self.tools:
            problems.append(f"invalid tool {data.get('tool')!r}")
        args = data.get("arguments")
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            problems.append("arguments must be an object of strings")
        reply = data.get("reply")
        if not isinstance(reply, str) or not reply or len(reply) > 200:
            problems.append("reply must be a non-empty string of at most 200 characters")
        return problems


def _read_banking77(data_dir: Path) -> Workload:
    folder = data_dir / "banking77"
    categories = json.loads((folder / "categories.json").read_text())
    examples = []
    for split in ("train", "test"):
        with open(folder / f"{split}.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                text, intent = row["text"], row["category"]
                examples.append(Example(text, intent, (intent,), banking77_arguments(text), split))
    return Workload(
        name="banking77",
        intents=list(categories),
        tools=list(BANKING77_TOOLS),
        tool_table=BANKING77_TOOLS,
        replies=BANKING77_REPLIES,
        multi_label=False,
        _examples=examples,
    )


def _fold_number(path: Path) -> int:
    return int(path.stem.removeprefix("fold"))


def _read_nlupp(data_dir: Path) -> Workload:
    folder = data_dir / "nlupp_banking"
    ontology = json.loads((folder / "ontology.json").read_text())
    folds = sorted(folder.glob("fold*.json"), key=_fold_number)
    if not folds:
        raise FileNotFoundError(f"{folder}/fold*.json: no NLU++ folds found")
    examples = []
    for path in folds:
        split = "test" if _fold_number(path) >= 16 else "train"
        for item in json.loads(path.read_text()):
            intents = tuple(sorted(set(item.get("intents") or ())))
            slots = item.get("slots") or {}
            arguments = {name: str(slot["text"]) for name, slot in sorted(slots.items())}
            examples.append(Example(item["text"], nlupp_label(intents), intents or (NO_INTENT,), arguments, split))
    # The banking and general intents of the ontology (the hotel ones never occur in this domain's folds),
    # in ontology order, plus the label of intent-less messages.
    known = {i for tool_intents in NLUPP_TOOLS.values() for i in tool_intents}
    intents = [
        name
        for name, spec in ontology["intents"].items()
        if name in known and set(spec.get("domain", ())) & {"banking", "general"}
    ]
    intents.append(NO_INTENT)
    return Workload(
        name="nlupp",
        intents=intents,
        tools=list(NLUPP_TOOLS),
        tool_table=NLUPP_TOOLS,
        replies=NLUPP_REPLIES,
        multi_label=True,
        _examples=examples,
    )


REQUIRED_FILES = (
    "banking77/train.csv",
    "banking77/test.csv",
    "banking77/categories.json",
    "nlupp_banking/ontology.json",
    "nlupp_banking/fold0.json",
)


def missing_files(data_dir: Path) -> list[Path]:
    """The data files the workloads need that ``data_dir`` lacks."""
    return [data_dir / rel for rel in REQUIRED_FILES if not (data_dir / rel).is_file()]


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, data_dir: Path) -> Workload:
    return {"banking77": _read_banking77, "nlupp": _read_nlupp}[name](data_dir)


def load_workload(name: str, data_dir: Path | str) -> Workload:
    """A workload by name, read once per data directory."""
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOAD_NAMES)}")
    return _load_cached(name, Path(data_dir).resolve())


def load_workloads(data_dir: Path | str) -> dict[str, Workload]:
    return {name: load_workload(name, data_dir) for name in WORKLOAD_NAMES}
