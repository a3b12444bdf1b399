"""Turning a generated continuation into an answer, and comparing it with the reference."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number with thousands separators ("1,000,000") or plain digits, optional sign and decimals.
# Thousands groups come first so "1,000" is one number while "1,2,3" is three.
NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def normalise_number(text: str) -> str | None:
    """Canonical form of a number: "1,000" -> "1000", "7.0" -> "7", "-0" -> "0", "2.50" -> "2.5"."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def last_number(text: str) -> str | None:
    """The last number in the text, normalised (MGSM-style answer extraction)."""
    found = NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None


def regex_group(text: str, pattern: re.Pattern[str]) -> str | None:
    """The first capture group of the first match, stripped."""
    match = pattern.search(text)
    if match is None or match.group(1) is None:
        return None
    return match.group(1).strip()


def extract(text: str, mode: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """The prediction in ``text``; None when nothing could be extracted (scored as wrong)."""
    if mode == "exact":
        return text.strip()
    if mode == "regex":
        assert pattern is not None
        return regex_group(text, pattern)
    if mode == "last_number":
        return last_number(text)
    raise ValueError(f"unknown extraction {mode!r}")


def reference(answer: str, mode: str) -> str | None:
    """The reference answer in the form predictions are compared in."""
    return last_number(answer) if mode == "last_number" else answer.strip()
