"""Sizes in metres: whether one size splits into another, and common multiples of GSDs."""

from __future__ import annotations

import math
from fractions import Fraction


def is_multiple(value: float, step: float) -> bool:
    """value = k * step for a whole k >= 1 (up to float rounding)."""
    ratio = value / step
    return ratio >= 1 - 1e-9 and abs(ratio - round(ratio)) < 1e-6


def common_step_m(gsds: list[float]) -> float:
    """The least common multiple of GSDs in metres (10, 30 -> 30; 0.6, 10 -> 30)."""
    fractions = [Fraction(str(g)).limit_denominator(1000) for g in gsds]
    numerator = math.lcm(*(f.numerator for f in fractions))
    denominator = math.gcd(*(f.denominator for f in fractions))
    return float(Fraction(numerator, denominator))
