"""Confidence intervals for the verdict (docs/reproduce.md, "The verdict"): Wilson's score interval
for one proportion and Newcombe's hybrid score interval for the difference of two proportions
measured on the same examples (paired).

Wilson (1927), "Probable inference, the law of succession, and statistical inference", JASA 22.
Newcombe (1998), "Improved confidence intervals for the difference between binomial proportions
based on paired data", Statistics in Medicine 17, method 10.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(successes, n, z=Z95):
    """``(low, high)`` of the Wilson score interval for ``successes`` out of ``n`` (``n`` >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_counts(first, second):
    """``(a, b, c, d)``: examples both got right, only ``first``, only ``second``, neither."""
    if len(first) != len(second):
        raise ValueError(f"paired results need the same examples, got {len(first)} and {len(second)}")
    a = sum(1 for x, y in zip(first, second) if x and y)
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return a, b, c, len(first) - a - b - c


def paired_difference_interval(first, second, z=Z95):
    """Newcombe's hybrid score interval (method 10) for accuracy(first) − accuracy(second), where
    ``first`` and ``second`` are per-example 0/1 correctness on the same examples. Returns a dict with
    the difference, its interval and the discordant counts."""
    a, b, c, d = paired_counts(first, second)
    n = a + b + c + d
    if n < 1:
        raise ValueError("paired results need at least one example")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator else 0.0
    diff = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return {"difference": diff, "low": max(-1.0, diff - math.sqrt(max(below, 0.0))),
            "high": min(1.0, diff + math.sqrt(max(above, 0.0))), "only_first": b, "only_second": c, "n": n,
            "method": "Newcombe's hybrid score interval for paired proportions (1998, method 10), 95 %"}
