"""The statistics every comparison of robust accuracies uses (one implementation for the
evaluation's reports, ``--ckpt a.pt b.pt`` comparisons and ``reproduce.py verdict``):

- Wilson's score interval for one proportion: E. B. Wilson (1927), "Probable inference, the law of
  succession, and statistical inference", Journal of the American Statistical Association
  22(158):209-212.
- Newcombe's hybrid score interval for the difference of two proportions measured on the same
  examples (paired data), his method 10: R. G. Newcombe (1998), "Improved confidence intervals for
  the difference between binomial proportions based on paired data", Statistics in Medicine
  17(22):2635-2650. Method 10 squares and adds the Wilson intervals of the two proportions with the
  continuity-corrected correlation φ̂ (section 2, method 10); its limits for 18 tables are printed
  in the paper's Table III.
- Exact one-sided binomial tests: McNemar's test in its exact form (the discordant examples, split
  1 : 1 under the null) and the binomial test of a count against a fixed rate. Sanity FLAGs and the
  verdict's rules claim something only when such a test rejects at ``LEVEL``.

What an interval here covers: which test images were drawn (the evaluated subset as a sample of
the test distribution), for the models and attacks that ran. It says nothing about training seeds,
other test sets or other attacks (docs/reproduce.md, "The verdict": what the intervals cover).
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
LEVEL = 0.05             # the exact tests' one-sided level
NEWCOMBE_METHOD = ("Newcombe's hybrid score interval for paired proportions (Statistics in Medicine 1998, "
                   "17(22):2635-2650, method 10), 95 %")
MCNEMAR_NAME = "exact one-sided McNemar test"
MCNEMAR_TEST = f"{MCNEMAR_NAME} at level {LEVEL:g}"
BINOMIAL_TEST = f"exact one-sided binomial test at level {LEVEL:g}"


def wilson_interval(successes, n, z=Z95):
    """``(low, high)`` of the Wilson score interval for ``successes`` out of ``n`` (``n`` >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 of n the low end is exactly 0 and at n of n the high end exactly 1 (no rounding residue)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def paired_counts(first, second):
    """``(a, b, c, d)``: examples both got right, only ``first``, only ``second``, neither."""
    if len(first) != len(second):
        raise ValueError(f"paired results need the same examples, got {len(first)} and {len(second)}")
    a = sum(1 for x, y in zip(first, second) if x and y)
    b = sum(1 for x, y in zip(first, second) if x and not y)
    c = sum(1 for x, y in zip(first, second) if y and not x)
    return a, b, c, len(first) - a - b - c


def corrected_phi(a, b, c, d):
    """Newcombe's continuity-corrected φ̂ = C / √A, A = (a+b)(c+d)(a+c)(b+d): C = max(ad − bc − n/2, 0)
    when ad > bc, else ad − bc; 0 when a margin is empty (A = 0)."""
    n = a + b + c + d
    product = (a + b) * (c + d) * (a + c) * (b + d)
    if product == 0:
        return 0.0
    excess = a * d - b * c
    numerator = max(excess - n / 2, 0.0) if excess > 0 else float(excess)
    return numerator / math.sqrt(product)


def newcombe_paired_interval(a, b, c, d, z=Z95):
    """``(low, high)`` of Newcombe's method 10 for ``(a + b)/n − (a + c)/n`` from the paired counts:
    with Wilson intervals (l1, u1) of p1 = (a+b)/n and (l2, u2) of p2 = (a+c)/n,
    low  = θ − √((p1 − l1)² − 2φ̂(p1 − l1)(u2 − p2) + (u2 − p2)²),
    high = θ + √((u1 − p1)² − 2φ̂(u1 − p1)(p2 − l2) + (p2 − l2)²), θ = (b − c)/n, φ̂ corrected."""
    n = a + b + c + d
    if min(a, b, c, d) < 0 or n < 1:
        raise ValueError(f"paired counts must be >= 0 with at least one example, got {(a, b, c, d)}")
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_interval(a + b, n, z)
    l2, u2 = wilson_interval(a + c, n, z)
    phi = corrected_phi(a, b, c, d)
    theta = (b - c) / n
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, theta - math.sqrt(max(below, 0.0))), min(1.0, theta + math.sqrt(max(above, 0.0)))


def paired_difference_interval(first, second, z=Z95):
    """Newcombe's method 10 for accuracy(first) − accuracy(second), where ``first`` and ``second``
    are per-example 0/1 correctness on the same examples. Returns a dict with the difference, its
    interval, the discordant counts and the exact one-sided McNemar p-values of each direction."""
    a, b, c, d = paired_counts(first, second)
    n = a + b + c + d
    if n < 1:
        raise ValueError("paired results need at least one example")
    low, high = newcombe_paired_interval(a, b, c, d, z)
    return {"difference": (b - c) / n, "low": low, "high": high, "only_first": b, "only_second": c, "n": n,
            "p_first_above": mcnemar_exact(b, c), "p_second_above": mcnemar_exact(c, b), "method": NEWCOMBE_METHOD}


# ---------------------------------------------------------------- exact tests

def _log_pmf(k, n, p):
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * math.log(p) + (n - k) * math.log1p(-p))


def binomial_upper_tail(k, n, p):
    """P(X >= k) for X ~ Binomial(n, p), summed exactly term by term (in log space)."""
    if not 0 <= p <= 1 or n < 0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n = {n}, p = {p}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [_log_pmf(i, n, p) for i in range(k, n + 1)]
    top = max(logs)
    if top == -math.inf:
        return 0.0
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def binomial_lower_tail(k, n, p):
    """P(X <= k) for X ~ Binomial(n, p)."""
    return binomial_upper_tail(n - k, n, 1.0 - p)


def mcnemar_exact(more, fewer):
    """One-sided exact McNemar p-value that the side with ``more`` discordant examples is really
    ahead: P(X >= more) for X ~ Binomial(more + fewer, 1/2). 1 without discordant examples."""
    return binomial_upper_tail(more, more + fewer, 0.5)


def beyond_noise(more, fewer, level=LEVEL):
    """``more`` discordant examples against ``fewer`` are evidence at ``level`` (exact McNemar)."""
    return more > fewer and mcnemar_exact(more, fewer) <= level


def above_rate(count, n, rate, level=LEVEL):
    """``count`` of ``n`` is evidence at ``level`` that the true rate exceeds ``rate`` (exact binomial)."""
    return n > 0 and count > rate * n and binomial_upper_tail(count, n, rate) <= level


# ---------------------------------------------------------------- printing bounds

def _outward(value, decimals, up):
    scaled = value * 10 ** decimals
    return (math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)) / 10 ** decimals


def bound_text(value, up, decimals=1, most=6):
    """``value`` rounded outward (up for an upper bound, down for a lower one) with ``decimals``
    decimals, or more until a bound that is not 0 shows its sign (never "0.0" for 0.003, never "-0.0")."""
    for places in range(decimals, most + 1):
        rounded = _outward(value, places, up)
        if value == 0 or rounded != 0 or places == most:
            text = f"{rounded:.{places}f}"
            return text[1:] if text.startswith("-") and float(text) == 0 else text
    raise AssertionError("unreachable")


def interval_text(low, high, scale=100.0, decimals=1):
    """``[low, high]`` times ``scale`` (percent by default), rounded outward so that the printed
    interval holds the computed one and each bound shows its sign."""
    return f"[{bound_text(low * scale, False, decimals)}, {bound_text(high * scale, True, decimals)}]"


def number_text(value, decimals=1, most=6, sign=False):
    """``value`` rounded to ``decimals`` decimals, or more until a value that is not 0 shows as not 0
    (never "-0.0"); ``sign`` writes "+" before positive values (0 has no sign)."""
    for places in range(decimals, most + 1):
        text = f"{value:+.{places}f}" if sign else f"{value:.{places}f}"
        if value == 0 or float(text) != 0 or places == most:
            break
    return f"{0:.{places}f}" if float(text) == 0 else text
