"""The built-in workloads' tables: which tool serves each BANKING77 and NLU++ intent, the reply of each, and the
BANKING77 argument extractor (amounts and currencies). Pure data and one pure function; the loaders in
``datasets.py`` turn them and the data files into workloads."""

from __future__ import annotations

import re

NO_INTENT = "inform"  # NLU++ messages with slots but no intent label: the user only gives information

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
