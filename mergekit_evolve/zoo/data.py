"""Synthetic skills of the zoo, in the spirit of the paper (a language model + a math model -> math in that language).

- script: a seeded "language": every digit has a letter; the skill is reading it ("dbh>" -> "317").
- math: single-digit arithmetic facts in plain digits ("3*4=" -> "12"), +, - (non-negative) and *.
- script_math (the target): the same facts with the digits written in the script ("d*e=" -> "12"
  when d is 3 and e is 4). It needs both skills; no source model is trained on it.
"""

from __future__ import annotations

import random

OPS = "+-*"


def script_map(seed: int) -> dict[str, str]:
    letters = random.Random(1000 + seed).sample("abcdefghijklmnopqrstuvwxyz", 10)
    return dict(zip("0123456789", letters))


def to_script(text: str, mapping: dict[str, str]) -> str:
    return "".join(mapping.get(c, c) for c in text)


def all_facts() -> list[tuple[int, str, int]]:
    return [(a, o, b) for a in range(10) for b in range(10) for o in OPS if not (o == "-" and a < b)]


def value(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


FITNESS_FACTS = 100


def split_facts(seed: int) -> tuple[list, list]:
    """Disjoint fitness (100) / held-out (the other 155) facts: every fact not used for selection is reported."""
    facts = all_facts()
    random.Random(2000 + seed).shuffle(facts)
    return facts[:FITNESS_FACTS], facts[FITNESS_FACTS:]


def split_script_strings(seed: int, per_split: int = 150) -> tuple[list[str], list[str]]:
    """Disjoint fitness / held-out digit strings for the script task (no string is in both splits)."""
    rng = random.Random(3000 + seed)
    seen: dict[str, None] = {}
    while len(seen) < 2 * per_split:
        seen.setdefault(digits(rng))
    strings = list(seen)
    return strings[:per_split], strings[per_split:]


def digits(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n or rng.randint(1, 6)))


class Skills:
    """Row samplers for training and the fixed evaluation splits, all from one seed."""

    def __init__(self, seed: int = 0):
        self.map = script_map(seed)
        self.fit_facts, self.heldout_facts = split_facts(seed)
        self.fit_strings, self.heldout_strings = split_script_strings(seed)
        self.facts = all_facts()

    # -- training samplers (prompt, answer) ---------------------------------------------------
    def copy_row(self, rng):
        d = digits(rng)
        return d + ">", d

    def script_row(self, rng):
        d = digits(rng)
        return to_script(d, self.map) + ">", d

    def math_row(self, rng):
        a, o, b = rng.choice(self.facts)
        return f"{a}{o}{b}=", str(value(a, o, b))

    def garbled_math_row(self, rng):
        """The math format with random answers: the base learns the format, not the facts."""
        a, o, b = rng.choice(self.facts)
        return f"{a}{o}{b}=", str(rng.randint(0, 81 if o == "*" else 18))

    def base_row(self, rng):
        return self.copy_row(rng) if rng.random() < 0.75 else self.garbled_math_row(rng)

    # -- evaluation splits -----------------------------------------------------------------------
    def task_rows(self, task: str, split: str) -> list[dict]:
        if task == "script":
            strings = self.fit_strings if split == "fitness" else self.heldout_strings
            return [{"prompt": to_script(d, self.map) + ">", "answer": d} for d in strings]
        facts = self.fit_facts if split == "fitness" else self.heldout_facts
        if task == "math":
            return [{"prompt": f"{a}{o}{b}=", "answer": str(value(a, o, b))} for a, o, b in facts]
        if task == "script_math":
            return [
                {"prompt": to_script(f"{a}{o}{b}", self.map) + "=", "answer": str(value(a, o, b))} for a, o, b in facts
            ]
        raise KeyError(task)
