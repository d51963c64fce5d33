"""Argument checks with one wording, and `from_dict` for every config dataclass.

Every error reads `{name} must be {what}, got {value!r}`, where `name` is the argument
(or `Config.field`) and `what` the rule's description ("an int >= 1", "None or a
number in (0, 1]", "one of ('pre', 'post')"). A config validates itself with a table
of rules, one per field:

    check_fields(self, {"max_steps": integer(1), "lr": number(0, low_open=True), ...})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, NoReturn

import numpy as np

# ---------------------------------------------------------------- predicates


def is_int(value, *, numpy: bool = False) -> bool:
    """An int and not a bool (True as a layer count is always a mistake); numpy=True also
    takes numpy integers (values read out of arrays)."""
    kinds = (int, np.integer) if numpy else int
    return isinstance(value, kinds) and not isinstance(value, bool)


def is_number(value, *, numpy: bool = False) -> bool:
    """A finite int or float, not a bool; numpy=True also takes numpy scalars."""
    kinds = (int, float, np.integer, np.floating) if numpy else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def describe(value) -> str:
    """How an error message names what it got: dtype and shape for tensors and arrays, the
    type's name otherwise."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        kind = "array" if isinstance(value, np.ndarray) else "tensor"
        return f"{value.dtype} {kind} of shape {tuple(shape)}"
    return type(value).__name__


def fail(name: str, what: str, value) -> NoReturn:
    """Raise the one ValueError wording."""
    raise ValueError(f"{name} must be {what}, got {value!r}")


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """What a value must be: `ok(value)` decides, `what` says it in the error message."""

    what: str
    ok: Callable[[Any], bool]

    def check(self, name: str, value):
        if not self.ok(value):
            fail(name, self.what, value)
        return value


def _interval(low, high, low_open: bool, high_open: bool) -> tuple[str, Callable[[Any], bool]]:
    """The description and test of low <= (or <) x <= (or <) high, either end optional."""
    if low is None and high is None:
        return "", lambda x: True
    if high is None:
        return f" {'>' if low_open else '>='} {low}", (lambda x: x > low) if low_open else (lambda x: x >= low)
    if low is None:
        return f" {'<' if high_open else '<='} {high}", (lambda x: x < high) if high_open else (lambda x: x <= high)
    text = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return text, lambda x: (x > low if low_open else x >= low) and (x < high if high_open else x <= high)


def integer(low=None, high=None, *, numpy: bool = False) -> Rule:
    """An int in [low, high], either end optional."""
    text, inside = _interval(low, high, False, False)
    return Rule(f"an int{text}", lambda x: is_int(x, numpy=numpy) and inside(x))


def bounded_int(low: int, high: int, high_label: str) -> Rule:
    """An int in [low, high] where high comes from another field: "an int in [1, n_expert=4]"."""
    return Rule(f"an int in [{low}, {high_label}={high}]", lambda x: is_int(x) and low <= x <= high)


def number(low=None, high=None, *, low_open: bool = False, high_open: bool = False, numpy: bool = False) -> Rule:
    """A finite number in the interval; open ends with low_open/high_open."""
    text, inside = _interval(low, high, low_open, high_open)
    what = "a finite number" if low is None or high is None else "a number"
    return Rule(f"{what}{text}", lambda x: is_number(x, numpy=numpy) and inside(x))


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
FRACTION = number(0, 1)  # [0, 1]
PROBABILITY = number(0, 1, low_open=True, high_open=True)  # (0, 1)
BOOL = Rule("a bool", lambda x: isinstance(x, bool))
STRING = Rule("a non-empty str", lambda x: isinstance(x, str) and bool(x))


def one_of(allowed: Iterable) -> Rule:
    allowed = tuple(allowed)
    return Rule(f"one of {allowed}", lambda x: x in allowed)


def optional(rule: Rule) -> Rule:
    """None, or what `rule` takes."""
    return Rule(f"None or {rule.what}", lambda x: x is None or rule.ok(x))


def check_fields(obj, rules: Mapping[str, Rule], *, prefix: str | None = None) -> None:
    """Check each named field of a (config) object against its rule, in the table's order;
    errors name it as `Config.field`."""
    prefix = type(obj).__name__ if prefix is None else prefix
    for name, rule in rules.items():
        rule.check(f"{prefix}.{name}" if prefix else name, getattr(obj, name))


def check_relations(obj, rows: Iterable[tuple[bool, str, str, Any]], *, prefix: str | None = None) -> None:
    """Rules between fields, in the same wording: rows of (holds, field, what, value), e.g.
    (n_embd % n_head == 0, "n_embd", f"divisible by n_head ({n_head})", n_embd)."""
    prefix = type(obj).__name__ if prefix is None else prefix
    for holds, name, what, value in rows:
        if not holds:
            fail(f"{prefix}.{name}" if prefix else name, what, value)


# ---------------------------------------------------------------- arguments


def check_int(name: str, value, low=None, high=None, *, numpy: bool = False) -> int:
    """`value` if it is an int in [low, high], else the ValueError."""
    return integer(low, high, numpy=numpy).check(name, value)


def check_number(name: str, value, low=None, high=None, *, low_open=False, high_open=False, numpy=False) -> float:
    """`value` if it is a finite number in the interval, else the ValueError."""
    return number(low, high, low_open=low_open, high_open=high_open, numpy=numpy).check(name, value)


def check_choice(name: str, value, allowed: Iterable):
    return one_of(allowed).check(name, value)


# ---------------------------------------------------------------- from_dict


def from_dict(cls, d: dict, *, convert: Mapping[str, Callable[[Any], Any]] | None = None):
    """cls(**d) for a dataclass, with a ValueError naming any unknown or missing key.
    `convert` maps a key to a function applied to its value first (JSON lists back to
    tuples, a nested config back to its class)."""
    name = cls.__name__
    if not isinstance(d, dict):
        raise ValueError(f"{name}.from_dict expects a dict, got {type(d).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown {name} key(s) {unknown}; expected a subset of {known}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{name}.from_dict is missing required key(s) {missing}")
    converted = {k: (convert[k](v) if convert and k in convert else v) for k, v in d.items()}
    return cls(**converted)
