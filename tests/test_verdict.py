"""reproduce.py verdict: the intervals and exact tests (hand-computed from the formulas, and the limits
Newcombe's Table III prints), the families beyond the paper protocol, the generated paragraph on
hand-made results (claims that follow their intervals, pairing only of the same recorded images,
seeds), the time budget's plan, the RESULTS.md writer and its refusals, and (slow) the whole chain
with --smoke and two seeds."""
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import reproduce
from utils.evaluation.stats import (
    Z95,
    binomial_lower_tail,
    binomial_upper_tail,
    bound_text,
    corrected_phi,
    interval_text,
    mcnemar_exact,
    newcombe_paired_interval,
    number_text,
    paired_counts,
    paired_difference_interval,
    wilson_interval,
)
from utils.reproduce import verdict, verdict_run
from utils.reproduce.cli import main, make_plan
from utils.reproduce.studies import STUDIES
from utils.reproduce.table import RowInput, build_table, render_markdown

ROOT = Path(__file__).resolve().parents[1]
Z2 = Z95 ** 2


# ---------------------------------------------------------------- intervals

def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.71675, half-width z·sqrt(0.016 + z²/400) / (1 + z²/10) = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    # 0 of n: [0, z²/(n + z²)]; n of n: [n/(n + z²), 1] (exactly 0 and 1 at the ends)
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z2 / (10 + Z2))) and wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z2), 1.0)) and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_paired_counts():
    assert paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (1, 2, 1, 1)
    with pytest.raises(ValueError):
        paired_counts([1], [1, 0])


def _half(k, n):
    """Distances (p − l, u − p) of the Wilson interval of k of n."""
    low, high = wilson_interval(k, n)
    return k / n - low, high - k / n


def test_continuity_corrected_phi_by_hand():
    # phi = C/√A, A = (a+b)(c+d)(a+c)(b+d); C = max(ad − bc − n/2, 0) when ad > bc, else ad − bc; 0 when A = 0
    assert corrected_phi(3, 0, 0, 2) == pytest.approx((6 - 2.5) / math.sqrt(3 * 2 * 3 * 2))     # 3.5/6
    assert corrected_phi(1, 0, 0, 1) == 0.0                                                     # ad − bc = n/2
    assert corrected_phi(1, 2, 3, 1) == pytest.approx((1 - 6) / math.sqrt(3 * 4 * 4 * 3))      # ad < bc: uncorrected
    assert corrected_phi(2, 1, 1, 2) == pytest.approx(0.0)                                     # 4 − 1 − 3 = 0
    assert corrected_phi(5, 0, 0, 0) == 0.0 and corrected_phi(0, 4, 0, 0) == 0.0                # an empty margin


def test_method_10_on_the_issue_tables():
    # (1, 0, 0, 1): p1 = p2 = 1/2, phi = max(1 − 0 − 1, 0)/1 = 0, so each side is √2 x the Wilson half-width of 1
    # of 2, z·sqrt(1/8 + z²/16)/(1 + z²/2) = 0.40548: ±0.57342 (method 8's phi = 1 gave [0, 0])
    half = Z95 * math.sqrt(1 / 8 + Z2 / 16) / (1 + Z2 / 2)
    assert newcombe_paired_interval(1, 0, 0, 1) == pytest.approx((-math.sqrt(2) * half, math.sqrt(2) * half))
    assert newcombe_paired_interval(1, 0, 0, 1)[1] == pytest.approx(0.5734, abs=1e-4)
    # (300, 41, 25, 634): n = 1000, ad − bc = 190200 − 1025 = 189175 > n/2, C = 188675, A = 341·659·325·675,
    # p1 = 0.341, p2 = 0.325; low = 0.016 − sqrt(d1² − 2 phi d1 e2 + e2²) with d1 = p1 − l1, e2 = u2 − p2
    phi = 188675 / math.sqrt(341 * 659 * 325 * 675)
    d1, e1 = _half(341, 1000)
    d2, e2 = _half(325, 1000)
    low = 0.016 - math.sqrt(d1 ** 2 - 2 * phi * d1 * e2 + e2 ** 2)
    high = 0.016 + math.sqrt(e1 ** 2 - 2 * phi * e1 * d2 + d2 ** 2)
    assert newcombe_paired_interval(300, 41, 25, 634) == pytest.approx((low, high))
    assert low == pytest.approx(-2.3637e-5, rel=1e-3) and high == pytest.approx(0.032042, rel=1e-4)
    assert interval_text(low, high) == "[-0.1, 3.3]"  # the negative lower bound shows its sign


def test_method_10_without_discordant_pairs_keeps_a_width():
    # (500, 0, 0, 500): p1 = p2 = 1/2 share the Wilson half-width h, phi = (250000 − 500)/500² = 0.998,
    # so each side is h·sqrt(2(1 − phi)) = 0.0020 (method 8 gave [0, 0])
    h = _half(500, 1000)[0]
    width = h * math.sqrt(2 * (1 - 0.998))
    assert newcombe_paired_interval(500, 0, 0, 500) == pytest.approx((-width, width))
    assert width == pytest.approx(0.001956, abs=1e-6)
    # identical rows (a = 3, d = 2): phi = 3.5/6, each side sqrt(d² − 2 phi d e + e²) of the Wilson interval of 3/5
    d, e = _half(3, 5)
    side = math.sqrt(d * d - 2 * (3.5 / 6) * d * e + e * e)
    ci = paired_difference_interval([1, 1, 1, 0, 0], [1, 1, 1, 0, 0])
    assert ci["difference"] == 0.0 and (ci["low"], ci["high"]) == pytest.approx((-side, side))


def test_method_10_at_n_1_and_all_right_or_all_wrong():
    # n = 1: one example both right, or both wrong: phi = 0 (empty margins), each side 1 − 1/(1 + z²) = z²/(1 + z²)
    end = Z2 / (1 + Z2)
    assert newcombe_paired_interval(1, 0, 0, 0) == pytest.approx((-end, end))
    assert newcombe_paired_interval(0, 0, 0, 1) == pytest.approx((-end, end))
    # n = 1, only the first right: low = 1 − sqrt((1 − l1)² + u2²) = 1 − √2·z²/(1 + z²), high = 1
    assert newcombe_paired_interval(0, 1, 0, 0) == pytest.approx((1 - math.sqrt(2) * end, 1.0))
    assert newcombe_paired_interval(0, 0, 1, 0) == pytest.approx((-1.0, -(1 - math.sqrt(2) * end)))
    # all right or all wrong on n = 10: ±z²/(10 + z²)
    for counts in ((10, 0, 0, 0), (0, 0, 0, 10)):
        assert newcombe_paired_interval(*counts) == pytest.approx((-Z2 / (10 + Z2), Z2 / (10 + Z2)))
    # the first all right, the second all wrong (b = n): 1 − √2·z²/(n + z²), 1
    ci = paired_difference_interval([1] * 10, [0] * 10)
    assert ci["difference"] == 1.0 and ci["only_first"] == 10 and ci["only_second"] == 0
    assert ci["low"] == pytest.approx(1 - math.sqrt(2) * Z2 / (10 + Z2)) and ci["high"] == 1.0
    with pytest.raises(ValueError):
        newcombe_paired_interval(0, 0, 0, 0)


# Newcombe (1998), Table III, method 10 (a, b, c, d, lower, upper), limits printed to 4 decimals
TABLE_III = [(36, 12, 2, 0, 0.0569, 0.3404), (20, 12, 2, 16, 0.0562, 0.3292), (18, 12, 2, 18, 0.0562, 0.3290),
             (36, 14, 0, 0, 0.1528, 0.4167), (35, 14, 0, 1, 0.1461, 0.4175), (18, 14, 0, 18, 0.1441, 0.3963),
             (2, 97, 1, 0, 0.8721, 0.9854), (1, 97, 1, 1, 0.8736, 0.9850), (0, 29, 1, 0, 0.6666, 0.9882),
             (2, 98, 0, 0, 0.9178, 0.9945), (1, 98, 0, 1, 0.9171, 0.9916), (0, 30, 0, 0, 0.8395, 1.0),
             (54, 0, 0, 0, -0.0664, 0.0664), (53, 0, 0, 1, -0.0729, 0.0729), (30, 0, 0, 24, -0.0358, 0.0358),
             (29, 0, 0, 25, -0.0354, 0.0354), (28, 0, 0, 26, -0.0352, 0.0352), (27, 0, 0, 27, -0.0351, 0.0351)]


@pytest.mark.parametrize("a, b, c, d, low, high", TABLE_III)
def test_method_10_reproduces_newcombes_table_iii(a, b, c, d, low, high):
    # every limit to the printed 4 decimals, except (1, 97, 1, 1)'s lower 0.87367 (printed 0.8736): within 1e-4
    assert newcombe_paired_interval(a, b, c, d) == pytest.approx((low, high), abs=1e-4)
    exact = sum(round(v, 4) == ref for v, ref in zip(newcombe_paired_interval(a, b, c, d), (low, high)))
    assert exact == 2 or (a, b, c, d) == (1, 97, 1, 1)


def test_paired_interval_swaps_sign_and_contains_the_difference():
    first, second = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    ci, swapped = paired_difference_interval(first, second), paired_difference_interval(second, first)
    assert ci["difference"] == pytest.approx(0.3)
    assert ci["low"] < 0.3 < ci["high"]
    assert (swapped["low"], swapped["high"]) == pytest.approx((-ci["high"], -ci["low"]))


def test_exact_tests_by_hand():
    # McNemar, one-sided: P(X >= more), X ~ Bin(more + fewer, 1/2)
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32) and mcnemar_exact(4, 0) == pytest.approx(1 / 16)
    assert mcnemar_exact(6, 1) == pytest.approx(8 / 128) and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(41, 25) == pytest.approx(sum(math.comb(66, k) for k in range(41, 67)) / 2 ** 66, rel=1e-9)
    # binomial tails against a rate: P(X >= 2), X ~ Bin(50, 0.02); P(X <= 4), X ~ Bin(16, 1/2) = 2517/65536
    assert binomial_upper_tail(2, 50, 0.02) == pytest.approx(1 - 0.98 ** 50 - 50 * 0.02 * 0.98 ** 49, rel=1e-9)
    assert binomial_lower_tail(4, 16, 0.5) == pytest.approx(2517 / 65536, rel=1e-9)
    assert binomial_upper_tail(0, 5, 0.3) == 1.0 and binomial_upper_tail(6, 5, 0.3) == 0.0
    assert mcnemar_exact(600, 400) == pytest.approx(sum(math.comb(1000, k) for k in range(600, 1001)) / 2 ** 1000,
                                                    rel=1e-6)


def test_printed_bounds_round_outward_and_show_their_sign():
    assert interval_text(0.0123, 0.0456) == "[1.2, 4.6]"
    assert interval_text(-0.000024, 0.032) == "[-0.1, 3.2]"
    assert interval_text(0.00003, 0.02) == "[0.003, 2.0]"      # a positive lower bound never prints as 0.0
    assert interval_text(-0.02, -0.00004) == "[-2.0, -0.004]"
    assert interval_text(0.0, 0.0) == "[0.0, 0.0]" and bound_text(-0.0, False) == "0.0"
    assert number_text(0.0, sign=True) == "0.0" and number_text(0.04, sign=True) == "+0.04"
    assert number_text(-0.0001) == "-0.0001" and number_text(56.35) == "56.4"


# ---------------------------------------------------------------- hand-made results

def _attack(name, family, correct, in_worst=True, reference=False):
    return {"name": name, "family": family, "correct": correct, "accuracy": sum(correct) / len(correct),
            "reference": reference, "in_worst_case": in_worst}


def _results(clean, attacks, indices=None, device="cuda:0", flags=(), labels=None):
    over = [a["name"] for a in attacks if a["in_worst_case"] and not a["reference"]]
    worst = list(clean)
    for a in attacks:
        if a["name"] in over:
            worst = [w and c for w, c in zip(worst, a["correct"])]
    return {"meta": {"indices": indices or list(range(len(clean))), "device": device, "torch": "2.4.0",
                     "started": "2026-12-04T18:00:00", "seconds": 12.5, "n_examples": len(clean)},
            "labels": labels or [i % 10 for i in range(len(clean))],
            "clean": {"accuracy": sum(clean) / len(clean), "correct": list(clean)}, "attacks": attacks, "skipped": [],
            "worst_case": {"accuracy": sum(worst) / len(worst), "robust_count": sum(worst), "correct": worst,
                           "over": over},
            "sanity": [{"name": f, "status": "FLAG"} for f in flags] + [{"name": "fine", "status": "pass"}]}


def gated_row(times=1):
    """Six examples (``times`` over): the paper protocol leaves 0, 1, 2; joint breaks 1, straight-through 2."""
    def t(values):
        return list(values) * times
    return _results(t([1, 1, 1, 1, 1, 0]), [
        _attack("pgd40", "paper", t([1, 1, 1, 0, 1, 0])),
        _attack("autoattack", "paper", t([1, 1, 1, 1, 0, 0])),
        _attack("joint-pgd-ce-w2", "joint", t([1, 0, 1, 1, 1, 1])),
        _attack("st-pgd-ce-t1", "straight-through", t([1, 1, 0, 1, 1, 1])),
        _attack("square", "black-box", t([1, 1, 1, 1, 1, 1])),
        _attack("pgd40-eps1", "sanity", t([0, 0, 0, 0, 0, 0]), in_worst=False),
        _attack("ref-fgsm", "reference", t([0, 0, 0, 0, 0, 0]), reference=True)], flags=["aux/final agreement"])


def steady_row(times=1):
    """Six examples (``times`` over): the paper protocol leaves 0, 1, 2 and nothing else breaks them."""
    def t(values):
        return list(values) * times
    return _results(t([1, 1, 1, 1, 0, 0]), [
        _attack("pgd40", "paper", t([1, 1, 1, 0, 0, 0])),
        _attack("autoattack", "paper", t([1, 1, 1, 0, 0, 0])),
        _attack("square", "black-box", t([1, 1, 1, 1, 1, 1]))])


def test_families_count_what_the_paper_protocol_left():
    results = gated_row()
    assert verdict.paper_protocol_survivors(results) == [True, True, True, False, False, False]
    assert verdict.family_breaks(results) == {"joint": 1, "straight-through": 1, "black-box": 0}
    record = verdict.row_verdict(results)
    assert record["worst_case"]["count"] == 1 and record["paper_protocol"]["count"] == 3
    assert record["beyond_protocol"] == 2 and record["flags"] == ["aux/final agreement"]
    # AutoAttack right on 0-3 of 6, worst case on 0: the gap is 3/6, all discordant in AutoAttack's favour
    assert record["autoattack"]["accuracy"] == pytest.approx(4 / 6)
    assert record["autoattack_gap"]["difference"] == pytest.approx(0.5)
    assert record["autoattack_gap"]["only_first"] == 3 and record["autoattack_gap"]["only_second"] == 0
    assert not verdict.row_verdict(steady_row())["collapsed"]


def test_collapse_needs_evidence_beyond_noise():
    # 1 of the 4 examples AutoAttack left survives: below half, but P(X <= 1), X ~ Bin(4, 1/2), is 5/16: noise
    small = verdict.row_verdict(gated_row())
    assert small["collapse"] == {"reference": "AutoAttack", "left": 4, "kept": 1, "p": pytest.approx(5 / 16),
                                 "level": 0.05}
    assert not small["collapsed"]
    # four times the examples: 4 of 16 survive, P(X <= 4), X ~ Bin(16, 1/2) = 2517/65536 = 0.038, and the gap's
    # interval excludes 0: it collapses
    large = verdict.row_verdict(gated_row(times=4))
    assert large["collapse"]["p"] == pytest.approx(2517 / 65536) and large["autoattack_gap"]["low"] > 0
    assert large["collapsed"]
    # the issue's case: AutoAttack 2/1000, worst case 0/1000 (p = 1/4, and the gap's interval includes 0)
    clean = [1] * 1000
    row = _results(clean, [_attack("autoattack", "paper", [1, 1] + [0] * 998), _attack("joint", "joint", [0] * 1000)])
    record = verdict.row_verdict(row)
    assert record["collapse"]["p"] == pytest.approx(0.25) and record["autoattack_gap"]["low"] < 0
    assert not record["collapsed"]


def _labels():
    return {r.name: r.label for r in STUDIES["verdict"].rows}


def _settings(smoke=False, epochs=15, seeds=(0,)):
    return {"dataset": "synthetic" if smoke else "cifar10", "epochs": epochs, "milestones": [9, 11, 13],
            "seed": seeds[0], "seeds": list(seeds), "n_examples": 6, "budget": "full", "smoke": smoke,
            "commit": "abc123"}


def _sentences(text):
    return [s.strip() for s in text.replace("**", "").split(". ")]


def test_paragraph_on_small_rows_claims_nothing_the_intervals_do_not_show():
    built = verdict.build_verdict({"pgd-at": None, "trades": steady_row(), "trades-ancra": gated_row()},
                                  labels=_labels())
    text = verdict.verdict_paragraph(built, _labels(), _settings(), 120)
    ci = built["comparisons"][0]["interval"]
    # TRADES-ANCRA keeps example 0 only, TRADES keeps 0, 1, 2: difference -2/6
    assert ci["difference"] == pytest.approx(-2 / 6) and ci["only_second"] == 2
    assert ci["low"] < 0 < ci["high"]
    assert text.startswith("One trained model per method (seed 0):")
    assert "These 6 test images do not resolve a difference between TRADES-ANCRA and TRADES." in text
    assert "TRADES-ANCRA: worst case 16.7 % [3.0, 56.4] over 5 attacks." in text
    # AutoAttack 4/6 vs worst case 1/6: the paired interval [-4.1, 77.4] includes 0, so no "overstates"
    assert "overstates" not in text and "collapses" not in text
    assert ("These 6 test images do not resolve a gap between AutoAttack and its worst case (+50.0 points "
            "[-4.1, 77.4])") in text
    assert "(joint 1, straight-through 1)" in text and "Sanity FLAGs: aux/final agreement." in text
    assert "Not finished yet: PGD-AT." in text and "not the paper's 120" in text
    assert max(len(s) for s in _sentences(text)) < 330  # short sentences, one claim each


def test_paragraph_claims_what_the_intervals_resolve():
    big = verdict.build_verdict({"trades": steady_row(times=4), "trades-ancra": gated_row(times=4)}, labels=_labels())
    text = verdict.verdict_paragraph(big, _labels(), _settings(), 120)
    gap = big["rows"]["trades-ancra"]["autoattack_gap"]
    assert "AutoAttack overstates its worst case by +50.0 points " + verdict._interval(gap) + "." in text
    assert "**Its worst case collapses**: 4 of the 16 examples AutoAttack left survive" in text
    assert "exact one-sided binomial test at level 0.05, p = 0.038" in text
    assert "TRADES-ANCRA's worst case is below TRADES's." in text


def test_paragraph_says_which_side_a_resolved_gap_falls():
    n = 40
    above = _results([1] * n, [_attack("pgd40", "paper", [1] * n)])
    below = _results([1] * n, [_attack("pgd40", "paper", [0] * n)])
    up = verdict.build_verdict({"trades": below, "trades-ancra": above})
    down = verdict.build_verdict({"trades": above, "trades-ancra": below})
    assert "TRADES-ANCRA keeps its worst case above TRADES." in verdict.verdict_paragraph(up, _labels(), _settings(), 120)
    assert "TRADES-ANCRA's worst case is below TRADES's." in verdict.verdict_paragraph(down, _labels(), _settings(), 120)


def _paired_rows(a, b, c, d):
    """TRADES-ANCRA and TRADES results whose worst cases form the paired table (a, b, c, d)."""
    subject = [1] * a + [1] * b + [0] * c + [0] * d
    baseline = [1] * a + [0] * b + [1] * c + [0] * d
    clean = [1] * (a + b + c + d)
    return {"trades-ancra": _results(clean, [_attack("pgd40", "paper", subject)]),
            "trades": _results(clean, [_attack("pgd40", "paper", baseline)])}


def test_the_issue_table_is_not_called_above():
    # (300, 41, 25, 634): +1.6 points, method 10 interval [-0.0024, 3.2042] points: it includes 0
    built = verdict.build_verdict(_paired_rows(300, 41, 25, 634), labels=_labels())
    text = verdict.verdict_paragraph(built, _labels(), _settings(), 120)
    assert "above" not in text.split("TRADES-ANCRA:")[0]
    assert "is +1.6 points, 95 % interval [-0.1, 3.3], on the same 1000 test images" in text
    assert "These 1000 test images do not resolve a difference between TRADES-ANCRA and TRADES." in text
    # a row without masking: AutoAttack equals the worst case on every example, so no "overstates"
    row = verdict.row_verdict(_results([1] * 1000, [_attack("autoattack", "paper", [1] * 500 + [0] * 500)]))
    words = " ".join(verdict._row_sentences("TRADES", row))
    assert "overstates" not in words and "(0.0 points [-0.2, 0.2])" in words


def test_pairing_needs_the_same_recorded_images_and_labels():
    other = steady_row()
    other["meta"]["indices"] = [9, 8, 7, 6, 5, 4]
    built = verdict.build_verdict({"trades": other, "trades-ancra": gated_row()}, labels=_labels())
    assert built["comparisons"] == [{"seed": None, "subject": "trades-ancra", "baseline": "trades", "interval": None,
                                     "refusal": "TRADES was evaluated on other test images than TRADES-ANCRA"}]
    text = verdict.verdict_paragraph(built, _labels(), _settings(), 120)
    assert ("The TRADES-ANCRA − TRADES comparison is not made: TRADES was evaluated on other test images than "
            "TRADES-ANCRA.") in text
    # neither row records its indices: None == None is not "the same images"
    unrecorded = {"trades": steady_row(), "trades-ancra": gated_row()}
    for results in unrecorded.values():
        results["meta"]["indices"] = None
    refusal = verdict.build_verdict(unrecorded, labels=_labels())["comparisons"][0]["refusal"]
    assert refusal.startswith("TRADES-ANCRA's results.json records no test-image indices or labels (meta.indices)")
    relabelled = {"trades": steady_row(), "trades-ancra": gated_row()}
    relabelled["trades"]["labels"] = [9] * 6
    assert "other labels" in verdict.build_verdict(relabelled, labels=_labels())["comparisons"][0]["refusal"]


def _two_seed_table():
    """The verdict study's rows for seeds 0 and 1: seed 0 resolves TRADES-ANCRA above TRADES, seed 1 does not."""
    study = STUDIES["verdict"]
    plan = make_plan(reproduce.parse_args(["verdict", "--seeds", "0,1", "--out-dir", "/tmp/unused"]))
    n = 40
    results = {("trades-ancra", 0): _results([1] * n, [_attack("pgd40", "paper", [1] * 30 + [0] * 10)]),
               ("trades", 0): _results([1] * n, [_attack("pgd40", "paper", [1] * 10 + [0] * 30)]),
               ("trades-ancra", 1): _results([1] * n, [_attack("pgd40", "paper", [1] * 21 + [0] * 19)]),
               ("trades", 1): _results([1] * n, [_attack("pgd40", "paper", [1] * 20 + [0] * 20)]),
               ("pgd-at", 0): steady_row(), ("pgd-at", 1): None}
    items = [RowInput(row, "done" if results[(row.base, row.seed)] else "pending", f"/runs/{row.name}",
                      results[(row.base, row.seed)], commit="abc123") for row in plan.rows]
    assert [r.name for r in plan.rows][:3] == ["pgd-at-s0", "trades-s0", "trades-ancra-s0"] and study.verdict
    return build_table(plan.study, _settings(seeds=(0, 1)), items)


def test_two_seeds_each_get_their_numbers_and_the_paragraph_counts_only_resolved_seeds():
    table = _two_seed_table()
    built = table["verdict"]
    assert built["seeds"] == [0, 1] and [c["seed"] for c in built["comparisons"]] == [0, 1]
    assert built["agreement"] == {"seeds": 2, "paired": 2, "above": 1, "below": 0}
    text = table["verdict_paragraph"]
    assert text.startswith("Two trained models per method (seeds 0, 1):")
    assert "Seed 0: the worst-case gap TRADES-ANCRA − TRADES is +50.0 points, 95 % interval [31.5, 63.1]" in text
    assert "Seed 1: the worst-case gap TRADES-ANCRA − TRADES is +2.5 points, 95 % interval [-4.2, 9.1]" in text
    assert "In 1 of 2 seeds TRADES-ANCRA's worst case is above TRADES's with an interval excluding 0." in text
    assert "In 0 of 2 seeds it is below with an interval excluding 0." in text
    assert "In 1 of 2 seeds the test images do not resolve the gap." in text
    assert "TRADES (seed 1): worst case 50.0 %" in text and "Not finished yet: PGD-AT (seed 1)." in text
    markdown = render_markdown(json.loads(json.dumps(table, sort_keys=True)))  # as table.json stores it
    assert "| TRADES-ANCRA | 1 | 100.0 | not run | 52.5 | 52.5 [" in markdown
    verdict_rows = markdown.split("## Verdict")[1]
    assert verdict_rows.index("| TRADES | 0 |") < verdict_rows.index("| TRADES-ANCRA | 0 |") < \
        verdict_rows.index("| TRADES | 1 |")  # the table's order: seed by seed
    assert "| 0 | +50.0 | [" in markdown and "| above |" in markdown and "| not resolved |" in markdown
    # spread between seeds: TRADES-ANCRA 75 % and 52.5 %, mean 63.75 (a hair below in floating point), SD
    # |75 − 52.5|/√2 = 15.91; the gap 50 and 2.5 points: mean 26.25, SD 33.59
    assert "| TRADES-ANCRA | mean 63.7, range 52.5 to 75.0, SD 15.9 |" in markdown
    assert "| gap TRADES-ANCRA − TRADES | mean 26.2, range 2.5 to 50.0, SD 33.6 |" in markdown
    assert "| PGD-AT (seed 0) | paper Table 1 (cifar10) |" in markdown and "seeds 0, 1 (one row per seed)" in markdown
    assert verdict.record_problem(table) == "the verdict is not finished (rows pending or failed)"


def _verdict_table(smoke=False, device="cuda:0"):
    study = STUDIES["verdict"]
    rows = {"pgd-at": steady_row(), "trades": steady_row(), "trades-ancra": gated_row()}
    for results in rows.values():
        results["meta"]["device"] = device
    items = [RowInput(study.row(name), "done", f"/runs/{name}", results, commit="abc123")
             for name, results in rows.items()]
    return build_table(study, _settings(smoke), items)


def test_table_carries_the_verdict_and_the_paper_figures():
    table = _verdict_table()
    assert set(table["verdict"]["rows"]) == {"pgd-at", "trades", "trades-ancra"}
    markdown = render_markdown(table)
    assert markdown.index("## Verdict") < markdown.index("## Paper protocol")
    assert table["verdict_paragraph"] in markdown
    # Wilson of 1/6 by hand: centre (1/6 + z²/12) / (1 + z²/6) = 0.2968, half-width 0.2667 → [3.0, 56.4]
    assert "| TRADES-ANCRA | 0 | 83.3 | 66.7 | 50.0 | 16.7 [3.0, 56.4] | 5 | 50.0 [-4.1, 77.4] | no |" in markdown
    assert "| TRADES-ANCRA | 0 | not run | 1 | 1 | not run | not run | 0 | not run | 2 |" in markdown
    assert "| TRADES-ANCRA | paper Tables 1 and 2 (cifar10) | 81.70 |" in markdown  # the paper beside ours


# ---------------------------------------------------------------- the study and its options

def test_verdict_study_defaults(tmp_path):
    study = STUDIES["verdict"]
    assert [r.label for r in study.rows] == ["PGD-AT", "TRADES", "TRADES-ANCRA"]
    assert study.rows_per_device == 3 and study.verdict and study.evaluate
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))
    assert (plan.epochs, plan.milestones, plan.n_examples, plan.budget) == (15, (9, 11, 13), 1000, "full")
    assert plan.run_dir(study.row("trades")).name == "cifar10_resnet18_trades_s0_e15"
    assert make_plan(reproduce.parse_args(["verdict", "--epochs", "120", "--out-dir", str(tmp_path)])).epochs == 120
    assert make_plan(reproduce.parse_args(["table1", "--out-dir", str(tmp_path)])).epochs == 120


def test_seeds_make_one_row_per_seed_and_one_seed_keeps_the_old_folders(tmp_path):
    one = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))
    assert one.seed_list == (0,) and [r.name for r in one.rows] == ["pgd-at", "trades", "trades-ancra"]
    assert one.run_dir(one.rows[1]).name == "cifar10_resnet18_trades_s0_e15"  # as before --seeds existed
    assert make_plan(reproduce.parse_args(["verdict", "--seed", "3", "--out-dir", str(tmp_path)])).seed_list == (3,)
    plan = make_plan(reproduce.parse_args(["verdict", "--seeds", "0,1,2", "--out-dir", str(tmp_path)]))
    assert plan.seed_list == (0, 1, 2) and len(plan.rows) == 9
    assert [r.name for r in plan.rows[:4]] == ["pgd-at-s0", "trades-s0", "trades-ancra-s0", "pgd-at-s1"]
    trades = {r.seed: r for r in plan.rows if r.method_row == "trades"}
    # seed 0 of several seeds is the same run folder as the single-seed run: it resumes or is reused
    assert plan.run_dir(trades[0]) == one.run_dir(one.rows[1])
    assert plan.run_dir(trades[2]).name == "cifar10_resnet18_trades_s2_e15"
    assert plan.eval_dir(trades[2]).parent == plan.run_dir(trades[2])
    from utils.reproduce import commands
    train = commands.train_command(plan, trades[2], resume=False)
    assert train[train.index("--seed") + 1] == "2" and train[train.index("--run-name") + 1].endswith("_s2_e15")
    evaluate = commands.evaluate_command(plan, trades[2], commands.EvaluationTool(True, True), resume=False)
    assert evaluate[evaluate.index("--seed") + 1] == "2" and "--subset-seed" not in evaluate  # same test images
    assert len(plan.slots) == 3  # the study's rows per device, shared by the seeds' rows as by any rows


@pytest.mark.parametrize("argv, message", [
    (["verdict", "--seeds", "0,x"], "--seeds takes integers"),
    (["verdict", "--seeds", "1,1"], "distinct seeds"),
    (["verdict", "--seeds", "-1"], "distinct seeds of 0 or more"),
    (["figures", "--seeds", "0,1"], "give one seed"),
])
def test_bad_seeds_are_refused_before_anything_is_created(tmp_path, capsys, argv, message):
    assert main(reproduce.parse_args([*argv, "--out-dir", str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["table1", "--time-budget", "600"], "belong to the verdict study"),
    (["verdict", "--time-budget", "0"], "above 0"),
    (["verdict", "--time-budget", "nan"], "finite"),
    (["verdict", "--smoke", "--record", "R.md"], "a smoke or synthetic run is never recorded"),
])
def test_bad_verdict_options_are_refused_before_anything_is_created(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(reproduce.parse_args([*argv, "--out-dir", str(tmp_path / "out")]))
    except SystemExit as exit_:  # refused while parsing
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_record_refusals():
    assert "never recorded" in verdict.record_refusal(True, "synthetic", True)
    assert "no CUDA device" in verdict.record_refusal(False, "cifar10", False)
    assert verdict.record_refusal(False, "cifar10", True) is None
    assert "was not evaluated on a CUDA device" in verdict.record_problem(_verdict_table(device="cpu"))
    assert "never recorded" in verdict.record_problem(_verdict_table(smoke=True))


def test_record_appends_once_and_replaces_the_placeholder(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(verdict.RESULTS_HEADER + "\n" + verdict.NO_VERDICT_YET + "\n")
    table = _verdict_table()
    said = verdict.append_record(path, table, "NVIDIA H200", "python reproduce.py verdict --record RESULTS.md",
                                 "2026-12-04 20:00 UTC")
    assert said == f"recorded the verdict in {path}"
    text = path.read_text()
    assert verdict.NO_VERDICT_YET not in text and text.startswith(verdict.RESULTS_HEADER)
    assert "## Verdict of 2026-12-04 20:00 UTC, NVIDIA H200" in text
    assert "torch 2.4.0; commit abc123" in text and "(a short schedule, not the paper's 120 epochs)" in text
    assert "`python reproduce.py verdict --record RESULTS.md`" in text and table["verdict_paragraph"] in text
    assert verdict.append_record(path, table, "NVIDIA H200", "x", "y") == f"{path} already holds this verdict"
    assert path.read_text() == text
    with pytest.raises(ValueError, match="not recorded"):
        verdict.append_record(path, _verdict_table(device="cpu"), "-", "x", "y")


def test_results_md_holds_only_written_verdicts():
    text = (ROOT / "RESULTS.md").read_text()
    assert text.startswith(verdict.RESULTS_HEADER)
    sections = text.split("\n## ")[1:]
    if not sections:
        assert verdict.NO_VERDICT_YET in text
    for section in sections:
        assert section.startswith("Verdict of ") and "- GPU: " in section and "- command: `python reproduce.py verdict" \
            in section
    assert text.count("<!-- verdict ") == len(sections)


# ---------------------------------------------------------------- time budget

MEASURED = {"overhead_seconds": 10.0, "epoch_seconds": 20.0, "example_seconds": 0.125, "probe_seconds": 30.0}


def test_choose_schedule_by_hand():
    # cost = 10 + 20·epochs + 0.125·n
    assert verdict.choose_schedule(435, MEASURED, 15, 1000) == (15, 1000)   # 10 + 300 + 125 fits exactly
    assert verdict.choose_schedule(430, MEASURED, 15, 1000) == (14, 1000)   # 10 + 280 + 125 = 415
    assert verdict.choose_schedule(160, MEASURED, 15, 1000) == (5, 400)     # 5 epochs leave 50 s: 400 examples
    assert verdict.choose_schedule(60, MEASURED, 15, 1000) == (1, 200)      # 10 + 20 + 25 = 55
    with pytest.raises(verdict.BudgetError, match="need about 55 s"):
        verdict.choose_schedule(50, MEASURED, 15, 1000)


def _write_probe(probe, epoch_seconds, eval_seconds):
    for row in probe.rows:
        run = probe.run_dir(row)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": epoch_seconds}) + "\n")
        evaluation = probe.eval_dir(row)
        evaluation.mkdir(parents=True)
        (evaluation / "results.json").write_text(json.dumps(
            {"meta": {"seconds": eval_seconds}, "clean": {}, "attacks": [], "worst_case": {}}))


def test_time_budget_probes_once_then_keeps_its_plan(tmp_path):
    side_by_side = replace(make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)])), slots=(None,) * 3)
    plan = side_by_side
    ticks = iter(range(0, 1000, 5))
    clock = lambda: float(next(ticks))
    probes = []

    def run_study(probe):
        probes.append(probe)
        assert probe.epochs == 1 and probe.n_examples == 32
        assert probe.rows[2].options[-4:] == ("--train-size", "10000", "--eval-size", "200")  # a fifth of each
        assert str(probe.study_dir).startswith(str(plan.study_dir / "probe"))
        _write_probe(probe, epoch_seconds=8.0, eval_seconds=1.6)
        return 0

    started = clock()  # 0; the probe starts at 5 and is measured at 10 (5 s); planning at 15
    chosen, budget = verdict_run.plan_within_budget(plan, 600.0, started, run_study, clock, echo=lambda _: None)
    measured = budget["measured"]
    assert measured["waves"] == 1 and measured["epoch_seconds"] == 8.0 * verdict.PROBE_FRACTION
    assert measured["example_seconds"] == pytest.approx(verdict.EVAL_SAFETY * 1.6 / 32)
    assert measured["overhead_seconds"] == 0.0  # 5 s of probe wall, 9.6 s measured inside it
    usable = verdict.MARGIN * (600 - 15 - verdict.TABLE_RESERVE)
    assert (chosen.epochs, chosen.n_examples) == verdict.choose_schedule(usable, measured, 15, 1000)
    # 0.9 x 575 = 517.5 s: 40 s per epoch and 0.1 s per example leave 10 epochs for 1000 examples
    assert (chosen.epochs, chosen.n_examples, chosen.milestones) == (10, 1000, (6, 8, 9))
    assert "shortened epochs 15 →" in verdict.budget_text(budget)
    again, _ = verdict_run.plan_within_budget(plan, 600.0, 0.0, run_study, clock, echo=lambda _: None)
    assert len(probes) == 1 and (again.epochs, again.n_examples) == (chosen.epochs, chosen.n_examples)
    # a budget that shortens nothing keeps the request's schedule (here the smoke runs' milestones)
    smoke = make_plan(reproduce.parse_args(["verdict", "--smoke", "--out-dir", str(tmp_path / "smoke")]))
    kept, _ = verdict_run.plan_within_budget(smoke, 1e6, 0.0, lambda probe: _write_probe(probe, 1.0, 1.0) or 0, clock,
                                         echo=lambda _: None)
    assert (kept.epochs, kept.milestones, kept.n_examples) == (smoke.epochs, smoke.milestones, smoke.n_examples)
    # with one slot the rows run one after the other: three waves, and the probe's wall time holds all three
    one_slot = verdict_run.measure_probe(verdict_run.probe_plan(replace(plan, slots=(None,))), 30.0)
    assert one_slot["waves"] == 3 and one_slot["epoch_seconds"] == 3 * 8.0 * verdict.PROBE_FRACTION
    assert one_slot["example_seconds"] == pytest.approx(3 * 2 * 1.6 / 32)
    assert one_slot["overhead_seconds"] == pytest.approx(30 - 3 * 9.6)


def test_smoke_probe_trains_on_all_smoke_images(tmp_path):
    plan = make_plan(reproduce.parse_args(["verdict", "--smoke", "--out-dir", str(tmp_path)]))
    probe = verdict_run.probe_plan(plan)
    smoke = verdict_run.SMOKE_DEFAULTS  # the training commands' own smoke sizes
    assert probe.rows[0].options[-4:] == ("--train-size", str(smoke["train_size"]), "--eval-size",
                                          str(smoke["eval_size"])) and probe.n_examples == 4
    assert probe.dataset == "synthetic" and probe.smoke and not probe.study.verdict


def test_phase_times_from_the_rows_files(tmp_path):
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path), "--epochs", "2"]))
    for i, row in enumerate(plan.rows):
        run = plan.run_dir(row)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 10.0 * (i + 1)}) + "\n"
                                                   for e in (1, 2)))
    times = verdict_run.phase_times(plan)
    assert times["train_seconds"] == 60.0 and times["epoch_seconds"] == 30.0 and times["evaluate_seconds"] is None
    assert times["rows"]["pgd-at"] == {"train_seconds": 20.0, "epoch_seconds": 10.0, "epochs_timed": 2,
                                       "evaluate_seconds": None}


# ---------------------------------------------------------------- slow: the whole chain

@pytest.mark.slow
def test_verdict_smoke_chain_with_two_seeds(tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "verdict", "--smoke", "--seeds", "0,1",
                             "--n-examples", "8", "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=1500)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((out / "verdict" / "table.json").read_text())
    assert [r["status"] for r in table["rows"]] == ["done"] * 6 and [r["seed"] for r in table["rows"]] == [0] * 3 + [1] * 3
    built = table["verdict"]
    assert len(built["rows"]) == 6 and built["seeds"] == [0, 1]
    assert [c["seed"] for c in built["comparisons"]] == [0, 1] and all(c["interval"] for c in built["comparisons"])
    assert built["agreement"]["seeds"] == 2 and set(built["spread"]) == {"pgd-at", "trades", "trades-ancra", "gap"}
    runs = sorted(p.name for p in (out / "verdict" / "runs").iterdir() if p.is_dir())
    assert runs == sorted(f"smoke_synthetic_resnet18_{m}_s{s}" + ("" if table["settings"]["epochs"] == 120 else
                          f"_e{table['settings']['epochs']}") for m in ("pgd-at", "trades", "trades-ancra") for s in (0, 1))
    markdown = (out / "verdict" / "table.md").read_text()
    paragraph = table["verdict_paragraph"]
    assert paragraph.startswith("Two trained models per method (seeds 0, 1):") and "of 2 seeds" in paragraph
    assert "## Verdict" in markdown and "## Time per phase" in markdown and "Smoke run on synthetic data" in markdown
    assert "Spread between training seeds" in markdown
    assert "Training " in result.stdout and "evaluation " in result.stdout
    assert verdict.record_problem(table) == "a smoke or synthetic run is never recorded"
    # the smoke models learn and the attacks have something to break: some row well above the 10 %
    # of chance, and some row whose worst case is below its clean accuracy
    rows = built["rows"].values()
    assert max(r["clean"]["accuracy"] for r in rows) >= 0.25
    assert any(r["worst_case"]["accuracy"] < r["clean"]["accuracy"] for r in rows)
    print(f"verdict --smoke --seeds 0,1: {seconds:.0f} s")


def test_run_verdict_records_nothing_after_a_failed_study(tmp_path, capsys):
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))

    class Failing:
        def __init__(self, p):
            self.plan, self.echo = p, print

        def run(self):
            p = self.plan.study_dir
            p.mkdir(parents=True, exist_ok=True)
            self.write_table()
            return 1

        def write_table(self):
            items = [RowInput(row, "pending", f"/runs/{row.name}") for row in self.plan.rows]
            table = build_table(self.plan.study, _settings(), items)
            (self.plan.study_dir / "table.json").write_text(json.dumps(table))
            (self.plan.study_dir / "table.md").write_text(render_markdown(table))

    record = tmp_path / "RESULTS.md"
    args = SimpleNamespace(time_budget=None, record=str(record))
    assert verdict_run.run_verdict(plan, args, ["python", "reproduce.py"], make_run=Failing) == 1
    assert not record.exists() and "not recorded" in capsys.readouterr().out


def test_a_verdict_without_finished_rows_has_no_numbers():
    study = STUDIES["verdict"]
    items = [RowInput(row, "pending", f"/runs/{row.name}") for row in study.rows]
    table = build_table(study, _settings(), items)
    assert table["verdict"]["rows"] == {} and table["verdict"]["comparisons"][0]["interval"] is None
    assert table["verdict"]["pending"] == ["pgd-at", "trades", "trades-ancra"]
    paragraph = table["verdict_paragraph"]
    assert "waits for both rows" in paragraph and "%" not in paragraph.split("Intervals:")[0]


def test_a_row_without_a_robust_figure_is_refused_not_counted():
    """An evaluation whose worst case is null (no threat-model attack ran on every example) gives
    no verdict number: one sentence saying why, never the clean accuracy as a robust figure."""
    results = gated_row()
    results["worst_case"] = {"accuracy": None, "robust_count": None, "correct": None, "over": [],
                             "missing": "no attack of the threat model ran"}
    with pytest.raises(ValueError, match=r"^a verdict row's evaluation has no robust figure \(no attack of the "
                                         r"threat model ran\); evaluate it again"):
        verdict.row_verdict(results)


def test_the_verdict_reads_headline_then_one_bullet_per_row_then_caveats():
    built = verdict.build_verdict({"pgd-at": gated_row(), "trades": gated_row(), "trades-ancra": gated_row()})
    text = verdict.verdict_paragraph(built, _labels(), _settings(), 120)
    head, rows, tail = text.split("\n\n")
    assert head.startswith("One trained model per method") and "\n" not in head
    assert [line[:2] for line in rows.splitlines()] == ["- "] * 3
    assert tail.startswith("Trained ") and tail.endswith("other attacks.")
