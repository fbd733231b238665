"""Checking one option's value against its definition in options.py.

An option may carry `valid`, the range its numbers must lie in, written as a person reads it:
`">= 1"`, `"> 0"`, `"[0, 1)"`, `"(0, 1)"`. Every number must also be finite and of the option's
type (an integer option takes no 2.5, no True). The same check covers the command line and a
hand-edited run_config.json, so a bad value stops the run before anything is written.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_NUMBER = r"-?\d+(?:\.\d*)?(?:e-?\d+)?"
_BOUND = re.compile(rf"^(>=|>|<=|<)\s*({_NUMBER})$")
_INTERVAL = re.compile(rf"^([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])$")


@dataclass(frozen=True)
class Bounds:
    """low <= x (low < x when low_open) and x <= high (x < high when high_open); None: no bound."""

    text: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)


def parse_bounds(rule: str) -> Bounds:
    rule = rule.strip()
    if m := _BOUND.match(rule):
        op, value = m.group(1), float(m.group(2))
        if op.startswith(">"):
            return Bounds(rule, low=value, low_open=op == ">")
        return Bounds(rule, high=value, high_open=op == "<")
    if m := _INTERVAL.match(rule):
        return Bounds(rule, float(m.group(2)), float(m.group(3)), m.group(1) == "(", m.group(4) == ")")
    raise ValueError(f"not a range: {rule!r} (write '>= 1', '> 0', '[0, 1)' ...)")


def number_problem(value: Any, kind: type, rule: str | None, optional: bool) -> str | None:
    """What `value` should have been, as `"an integer >= 1"`, or None when it is valid."""
    if value is None and optional:
        return None
    wanted = "an integer" if kind is int else "a number"
    if rule is not None:
        wanted += f" in {rule.strip()}" if rule.strip()[0] in "[(" else f" {rule.strip()}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return wanted
    if kind is int and not isinstance(value, int):
        return wanted
    if not math.isfinite(value):
        return wanted
    if rule is not None and value not in parse_bounds(rule):
        return wanted
    return None
