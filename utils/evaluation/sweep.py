"""Robust accuracy against ε (Carlini et al. 2019, "On Evaluating Adversarial Robustness", §5.4:
accuracy must fall as ε grows and reach chance or zero at large ε; a curve that does not suggests
the attacks fail, not that the model is robust). docs/evaluation.md#robust-accuracy-against-ε.

At every ε of the sweep the same examples are attacked by the run's attacks of the threat model
rescaled to that ε (the final-logit PGD-40 and, for an RA model, the head-aware PGD-40+p and the
main run's head-aware attack that broke the most examples always among them, those two on every
example), as a cascade; each ε's evaluation is saved to ``eps_sweep/eps_K-255.json`` as soon as
it finishes, so an interrupted sweep resumes at the next ε. The curves — the best final-logit PGD,
the best head-aware attack, the cascade's worst case — go to ``eps_sweep.json`` and
``eps_sweep.png``. Nothing here enters the headline of report.md, which counts only the run's ε.
"""
from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import eps_type  # noqa: E402
from utils.evaluation.catalogue import EvaluationError  # noqa: E402
from utils.evaluation.report import eps_text  # noqa: E402
from utils.evaluation.stats import BINOMIAL_TEST, MCNEMAR_TEST, above_rate, beyond_noise, mcnemar_exact  # noqa: E402

DEFAULT_SWEEP = tuple(k / 255 for k in (0, 1, 2, 4, 8, 16, 32, 64))
LARGEST_EPS_MAX_ACCURACY = 0.01
LARGE_EPS = 64 / 255  # the default sweep's largest radius: from here on a working attack reaches ~0 %
FINAL, HEADS, WORST = "final-logit PGD", "head-aware (best)", "worst case (cascade)"
FOLDER = "eps_sweep"


def parse_eps_sweep(text):
    """argparse type: ``default`` (0,1,2,4,8,16,32,64/255), or comma-separated radii where a
    trailing ``/255`` puts every value in pixel units (``0,2,8/255``); otherwise each value is
    ``k/255``, a fraction below 1 or pixel units ≥ 1 (each non-zero value read by
    ``utils.cli.eps_type``). Sorted, at least two distinct values in [0, 1]."""
    if text.strip() == "default":
        return DEFAULT_SWEEP
    body, pixels = (text.strip()[:-4], True) if text.strip().endswith("/255") else (text, False)
    items = [item for item in (t.strip() for t in body.split(",")) if item]
    values = [_sweep_radius(item, pixels) for item in items]
    for value in values:  # a repeated radius is a typo, and would leave fewer radii than the list shows
        twice = [item for item, other in zip(items, values) if abs(other - value) <= 1e-12]
        if len(twice) > 1:
            raise argparse.ArgumentTypeError(f"--eps-sweep names one radius {len(twice)} times ({', '.join(twice)}); "
                                             f"give each radius once, got {text!r}")
    if len(values) < 2:
        raise argparse.ArgumentTypeError(f"--eps-sweep needs at least two radii, got {text!r}")
    return tuple(sorted(values))


def _sweep_radius(item, pixels):
    """One radius of ``--eps-sweep``: 0 (the clean point) or any ε that ``--eps`` accepts."""
    try:
        if Fraction(item) == 0:
            return 0.0
    except (ValueError, ZeroDivisionError):
        pass  # eps_type explains the accepted spellings
    return eps_type(item, pixel_units=pixels)


def sweep_file(out_dir, eps):
    return Path(out_dir) / FOLDER / f"eps_{eps_text(eps).replace('/', '-')}.json"


def sweep_attacks(specs, threat_eps, reverse_attention):
    """Names of the run's attacks of the threat model, plus pgd40 (and pgd40+p for an RA model)."""
    names = [s.name for s in specs if s.in_threat_model(threat_eps)]
    for name in ("pgd40", "pgd40+p") if reverse_attention else ("pgd40",):
        if name not in names:
            names.append(name)
    return names


# ---------------------------------------------------------------- curves and checks (pure)

def _standalone_attacks(report, sees):
    return [a for a in report["attacks"] if a.get("in_worst_case", True) and a.get("standalone", True)
            and a.get("sees") == sees and a["accuracy"] is not None
            and (sees != "final" or "steps" in a.get("params", {}))]


def _standalone(report, sees):
    accs = [a["accuracy"] for a in _standalone_attacks(report, sees)]
    return min(accs) if accs else None


def curve_examples(eps_values, reports, clean_correct, reverse_attention):
    """``{curve: [per-example correctness at each ε, or None]}`` behind :func:`curves_from_reports`:
    the clean results at ε = 0, the worst case's, or the per-example results of the standalone attack
    that gave the curve's point (the rises are tested on these, paired by example)."""
    names = [FINAL, HEADS, WORST] if reverse_attention else [FINAL, WORST]
    out = {name: [] for name in names}
    for eps, report in zip(eps_values, reports):
        for name in names:
            if eps == 0 or report is None:
                value = list(clean_correct)
            elif name == WORST:
                value = report["worst_case"].get("correct")
            else:
                attacks = _standalone_attacks(report, "final" if name == FINAL else "heads")
                value = min(attacks, key=lambda a: a["accuracy"]).get("correct") if attacks else None
            out[name].append(None if value is None else [bool(v) for v in value])
    return out


def curves_from_reports(eps_values, reports, clean_accuracy, reverse_attention):
    """``{curve: [accuracy at each ε]}`` from each ε's results.json dict (None at ε = 0: no attack
    runs there, every curve is the clean accuracy)."""
    names = [FINAL, HEADS, WORST] if reverse_attention else [FINAL, WORST]
    curves = {name: [] for name in names}
    for eps, report in zip(eps_values, reports):
        for name in names:
            if eps == 0 or report is None:
                value = clean_accuracy
            elif name == WORST:
                value = report["worst_case"]["accuracy"]
            else:
                value = _standalone(report, "final" if name == FINAL else "heads")
            curves[name].append(value)
    return curves


def _check(name, status, numbers, message):
    return {"name": name, "status": status, "numbers": numbers, "message": message}


def _rise(smaller, larger):
    """``(more, fewer)``: examples right at the larger ε and wrong at the smaller one, and the reverse."""
    more = sum(1 for a, b in zip(smaller, larger) if b and not a)
    fewer = sum(1 for a, b in zip(smaller, larger) if a and not b)
    return more, fewer


def curve_checks(eps_values, curves, examples, n):
    """Per curve: FLAG when accuracy rises with ε beyond noise (paired by example, ``examples`` from
    :func:`curve_examples`: an exact one-sided McNemar test at level 0.05), or when it stays above
    1 % at the largest ε beyond noise (exact one-sided binomial test) if that ε is at least
    :data:`LARGE_EPS` (n/a below: a smaller ball need not hold an image of another class)."""
    checks = []
    for name, values in curves.items():
        known = [(e, v, ex) for e, v, ex in zip(eps_values, values, examples[name]) if v is not None]
        rises, tests = [], []
        for (ea, va, xa), (eb, vb, xb) in zip(known, known[1:]):
            if vb <= va or xa is None or xb is None:
                continue
            more, fewer = _rise(xa, xb)
            if beyond_noise(more, fewer):
                rises.append((eps_text(ea), eps_text(eb)))
                tests.append(f"{more} examples right only at {eps_text(eb)} against {fewer} right only at "
                             f"{eps_text(ea)}, p = {mcnemar_exact(more, fewer):.2g}")
        text = ", ".join(f"{a} → {b}" for a, b in rises)
        checks.append(_check(f"{name} falls with ε", "FLAG" if rises else "pass", {"rises": rises},
                             f"accuracy rises with ε beyond noise ({text}; {MCNEMAR_TEST}: {'; '.join(tests)}): a "
                             "larger ball contains every point of a smaller one, so the attack is failing (gradient "
                             "masking or too few steps)." if rises else
                             f"accuracy never rises with ε beyond noise ({MCNEMAR_TEST})."))
        if known:
            last_eps, last, _ = known[-1]
            low = not above_rate(round(last * n), n, LARGEST_EPS_MAX_ACCURACY)
            numbers = {"eps": last_eps, "accuracy": last}
            name_high = f"{name} reaches ≤ 1 % at the largest ε"
            if last_eps < LARGE_EPS - 1e-12:  # too small a ball to expect ~0 %: nothing to judge
                checks.append(_check(name_high, "n/a", numbers,
                                     f"{100 * last:.2f} % at ε = {eps_text(last_eps)}; the largest ε of the sweep is "
                                     f"below {eps_text(LARGE_EPS)}, where a working attack is expected to reach "
                                     f"~0 %: add {eps_text(LARGE_EPS)} to --eps-sweep to check it."))
                continue
            checks.append(_check(name_high, "pass" if low else "FLAG", numbers,
                                 f"{100 * last:.2f} % at ε = {eps_text(last_eps)}"
                                 + ("." if low else f", above 1 % beyond noise ({BINOMIAL_TEST}): at a radius this "
                                    "large an image of another class fits in the ball, so a working attack reaches "
                                    "~0 %; the attack is failing (or the output barely depends on the input).")))
    return checks


# ---------------------------------------------------------------- running

def _key(base, eps, names):
    return dict(base, eps=eps, attacks=names)


def _load_done(path, key):
    saved = json.loads(path.read_text())
    if saved.get("meta", {}).get("sweep_key") != key:
        raise EvaluationError(f"{path} was written with other settings; move it away or use another --out-dir")
    return saved


def strongest_head_aware(results):
    """The main run's head-aware attack of the threat model that broke the most examples (None for a
    plain model or when none ran)."""
    heads = [r for r in results if r.sees == "heads" and r.in_worst_case]
    return max(heads, key=lambda r: r.n_broken).name if heads else None


def _reusable(main_report, names, full_set):
    """The main run ran every sweep attack, those in ``full_set`` on every example."""
    ran = {a["name"]: a.get("standalone", True) for a in main_report["attacks"]}
    return set(names) <= set(ran) and all(ran.get(name) for name in full_set)


def run_sweep(evaluate, eps_values, *, threat_eps, main_report, names, out_dir, base_key, full_set=()):
    """Every ε of the sweep: reuse a saved ε (``--resume``) or the main run's report when it is the
    threat model's ε and ran every sweep attack (those in ``full_set`` standalone), else
    ``evaluate(eps, names)`` → Evaluation, saved at once. Returns the results.json dict of each ε
    (None at ε = 0)."""
    reports = []
    for eps in eps_values:
        if eps == 0:
            reports.append(None)
            continue
        path, key = sweep_file(out_dir, eps), _key(base_key, eps, names)
        if path.exists():
            report = _load_done(path, key)
        elif abs(eps - threat_eps) <= 1e-9 and _reusable(main_report, names, full_set):
            report = main_report
        else:
            evaluation = evaluate(eps, names)
            evaluation.meta["sweep_key"] = key
            report = evaluation.to_json()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, report)
        reports.append(report)
    return reports


def summarise(eps_values, reports, *, clean_correct, n, threat_eps, reverse_attention, model_name):
    """The eps_sweep.json content: radii, curves, checks, where each ε's evaluation lies."""
    clean_accuracy = sum(bool(v) for v in clean_correct) / n if n else 0.0
    curves = curves_from_reports(eps_values, reports, clean_accuracy, reverse_attention)
    examples = curve_examples(eps_values, reports, clean_correct, reverse_attention)
    return {"model": model_name, "n_examples": n, "threat_eps": threat_eps, "threat_eps_text": eps_text(threat_eps),
            "eps": list(eps_values), "eps_text": [eps_text(e) if e else "0" for e in eps_values],
            "eps_255": [round(e * 255, 4) for e in eps_values], "curves": curves,
            "checks": curve_checks(eps_values, curves, examples, n),
            "note": "not part of the headline: report.md's worst case counts only the attacks at the threat "
                    "model's ε"}


def plot_sweep(summary, path):
    """Accuracy (%) against ε (in /255, evenly spaced ticks), one line per curve, the threat
    model's ε marked; title with the model and n."""

    positions = list(range(len(summary["eps"])))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {FINAL: ("tab:blue", "o", "-", 9), HEADS: ("tab:orange", "s", "-", 7), WORST: ("black", "D", "--", 4)}
    for name, values in summary["curves"].items():
        points = [(p, 100 * v) for p, v in zip(positions, values) if v is not None]
        color, marker, line, size = styles.get(name, ("tab:gray", "^", "-", 6))
        ax.plot([p for p, _ in points], [v for _, v in points], marker=marker, markersize=size, linestyle=line,
                color=color, label=name)  # larger markers below, so curves that coincide stay visible
    threat = summary["threat_eps"] * 255
    scale = summary["eps_255"]
    if scale[0] <= threat <= scale[-1]:
        ax.axvline(_position(scale, threat), color="tab:red", linestyle=":",
                   label=f"threat model ε = {summary['threat_eps_text']}")
    ax.set_xticks(positions, [f"{v:g}" for v in scale])
    ax.set_xlabel("ε (L∞ radius, in /255 pixel units; ticks evenly spaced)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.axhline(100 * LARGEST_EPS_MAX_ACCURACY, color="tab:gray", linewidth=0.8, linestyle="-.",
               label="1 % (expected at the largest ε)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Robust accuracy against ε: {summary['model']} (n = {summary['n_examples']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _position(scale, value):
    """Where ``value`` lies on evenly spaced ticks of ``scale`` (linear between neighbours)."""
    for i in range(len(scale) - 1):
        if scale[i] <= value <= scale[i + 1]:
            span = scale[i + 1] - scale[i]
            return i + ((value - scale[i]) / span if span else 0.0)
    return float(len(scale) - 1)
