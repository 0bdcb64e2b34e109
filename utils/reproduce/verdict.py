"""The verdict study's answer (docs/reproduce.md, "The verdict"): does TRADES-ANCRA keep robustness
above TRADES once the evaluation sees through RA's argmax gate?

From each row's results.json (per-example correctness of every attack): the worst case with a 95 %
Wilson interval, which attack families broke examples the paper's protocol (docs/protocol.md §2)
left, the paired TRADES-ANCRA − TRADES worst-case gap of every training seed (Newcombe's method 10,
only on the same recorded test images with the same labels), the paper-protocol AutoAttack −
worst-case gap of every row, the seeds' spread, and a paragraph generated from these numbers in
short sentences. A sentence claims a direction only when its interval excludes 0, and "collapses"
only when an exact test says so (utils/evaluation/stats.py). Nothing here is typed by hand.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from utils.checkpoint import atomic_write_text
from utils.evaluation.compare import pairing_refusal
from utils.evaluation.stats import (
    BINOMIAL_TEST,
    LEVEL,
    binomial_lower_tail,
    interval_text,
    number_text,
    paired_counts,
    paired_difference_interval,
    wilson_interval,
)

# Families beyond the paper's protocol, in the order the verdict lists them (catalogue names → words).
FAMILIES = {"aux-head": "aux heads", "joint": "joint", "straight-through": "straight-through",
            "enumeration": "enumeration", "transfer": "transfer", "black-box": "Square",
            "sanity": "more PGD steps/restarts"}
SUBJECT, BASELINE = "trades-ancra", "trades"
# A worst case below this fraction of the row's paper-protocol figure "collapses" (tested exactly).
COLLAPSE_FRACTION = 0.5
PAIRED_NAME = "Newcombe's paired method 10 (Statistics in Medicine 1998, 17(22):2635-2650)"
COUNT_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four", 5: "Five"}


def _threat_model(results):
    """Attack records of the threat model (the worst case's), reference reproductions left out."""
    over = set(results["worst_case"].get("over", []))
    return [a for a in results["attacks"] if a.get("name") in over and not a.get("reference")]


def _and(masks, n):
    out = [True] * n
    for mask in masks:
        out = [x and bool(y) for x, y in zip(out, mask)]
    return out


def paper_protocol_survivors(results):
    """Per example: correct clean and under every paper-protocol attack of the threat model."""
    clean = [bool(v) for v in results["clean"]["correct"]]
    paper = [a["correct"] for a in _threat_model(results) if a.get("family") == "paper"]
    return _and([clean] + paper, len(clean))


def family_breaks(results):
    """``{family: examples it broke that the paper protocol left}`` for every family beyond the paper's
    that ran (a cascade sends an example on only while no attack has broken it, so there an example
    is counted once, by the first family that broke it; without the cascade by every family that did)."""
    survivors = paper_protocol_survivors(results)
    counts = {}
    for family in FAMILIES:
        attacks = [a for a in _threat_model(results) if a.get("family") == family]
        if attacks:
            robust = _and([a["correct"] for a in attacks], len(survivors))
            counts[family] = sum(1 for s, r in zip(survivors, robust) if s and not r)
    return counts


def _proportion(count, n):
    low, high = wilson_interval(count, n)
    return {"accuracy": count / n, "count": count, "n": n, "low": low, "high": high}


def _attack(results, name):
    return next((a for a in results["attacks"] if a.get("name") == name), None)


def row_verdict(results):
    """The verdict's numbers for one row's results.json (ValueError, one sentence, for a row whose
    evaluation has no robust figure: no attack of the threat model ran on every example it counts)."""
    if (results.get("worst_case") or {}).get("correct") is None:
        why = (results.get("worst_case") or {}).get("missing") or "no attack of the threat model ran"
        raise ValueError(f"a verdict row's evaluation has no robust figure ({why}); evaluate it again with the "
                         "study's attacks (rerun the study)")
    n = len(results["clean"]["correct"])
    worst = [bool(v) for v in results["worst_case"]["correct"]]
    protocol = paper_protocol_survivors(results)
    aa = _attack(results, "autoattack")
    record = {"n": n, "clean": _proportion(sum(bool(v) for v in results["clean"]["correct"]), n),
              "worst_case": _proportion(sum(worst), n), "attacks": len(results["worst_case"].get("over", [])),
              "paper_protocol": _proportion(sum(protocol), n), "families": family_breaks(results),
              "beyond_protocol": sum(1 for p, w in zip(protocol, worst) if p and not w),
              "flags": [c["name"] for c in results.get("sanity", []) if c.get("status") == "FLAG"],
              "autoattack": None, "autoattack_gap": None, "device": results.get("meta", {}).get("device"),
              "torch": results.get("meta", {}).get("torch"), "started": results.get("meta", {}).get("started"),
              "protocol_gap": paired_difference_interval(protocol, worst)}
    reference = protocol
    if aa is not None and aa.get("accuracy") is not None:
        aa_correct = [bool(c) and bool(r) for c, r in zip(results["clean"]["correct"], aa["correct"])]
        record["autoattack"] = _proportion(sum(aa_correct), n)
        record["autoattack_gap"] = paired_difference_interval(aa_correct, worst)
        reference = aa_correct
    record["collapse"] = collapse_test(reference, worst, "AutoAttack" if record["autoattack"] else "the paper protocol")
    record["collapsed"] = collapsed(record)
    return record


def collapse_test(reference, worst, name):
    """Of the ``left`` examples the reference (AutoAttack, else the paper protocol) left, ``kept``
    survive the worst case; the exact one-sided binomial test of "fewer than COLLAPSE_FRACTION of them
    survive": p = P(X <= kept), X ~ Binomial(left, COLLAPSE_FRACTION)."""
    a, b, _, _ = paired_counts(reference, worst)
    left, kept = a + b, a
    p = binomial_lower_tail(kept, left, COLLAPSE_FRACTION) if left else 1.0
    return {"reference": name, "left": left, "kept": kept, "p": p, "level": LEVEL}


def collapsed(record):
    """The worst case keeps fewer than COLLAPSE_FRACTION of the examples the paper-protocol figure
    (AutoAttack when run) left, beyond noise: the exact one-sided binomial test rejects at LEVEL and
    the paired gap's interval excludes 0."""
    test = record["collapse"]
    gap = record["autoattack_gap"] or record["protocol_gap"]
    return (test["left"] > 0 and test["kept"] < COLLAPSE_FRACTION * test["left"] and test["p"] <= test["level"]
            and gap["low"] > 0)


def _comparison(seed, subject, baseline, labels):
    """The paired TRADES-ANCRA − TRADES worst-case gap of one seed, or why there is none."""
    record = {"seed": seed, "subject": SUBJECT, "baseline": BASELINE, "refusal": None, "interval": None}
    if subject is None or baseline is None:
        record["refusal"] = "pending"
        return record
    refusal = pairing_refusal([labels.get(SUBJECT, SUBJECT), labels.get(BASELINE, BASELINE)], [subject, baseline])
    if refusal:
        record["refusal"] = refusal
    else:
        record["interval"] = paired_difference_interval(subject["worst_case"]["correct"],
                                                        baseline["worst_case"]["correct"])
    return record


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"values": values, "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None}


def build_verdict(rows, seeds=None, labels=None):
    """``rows``: ``{row name: results.json or None}``; ``seeds``: ``{row name: (study row, seed)}``
    when the rows are one per training seed (default: every row its own study row, one seed, None).
    The verdict dict of table.json: each row's numbers, the pending rows, each seed's paired
    comparison, how many seeds resolve the gap in each direction, and the seeds' spread."""
    seeds = seeds or {name: (name, None) for name in rows}
    labels = labels or {}
    done = {name: results for name, results in rows.items() if results is not None}
    verdict = {"rows": {}, "pending": [name for name, results in rows.items() if results is None],
               "seeds": [], "comparisons": [], "level": LEVEL,
               "collapse_rule": (f"the worst case keeps fewer than {COLLAPSE_FRACTION:g} of the examples the "
                                 f"paper-protocol figure left ({BINOMIAL_TEST}) and the paired gap excludes 0")}
    for name, results in done.items():
        verdict["rows"][name] = dict(row_verdict(results), row=seeds[name][0], seed=seeds[name][1])
    by_seed = {}
    for name, (row, seed) in seeds.items():
        by_seed.setdefault(seed, {})[row] = rows.get(name)
    verdict["seeds"] = list(by_seed)
    for seed, members in by_seed.items():
        if SUBJECT in members and BASELINE in members:
            verdict["comparisons"].append(_comparison(seed, members[SUBJECT], members[BASELINE], labels))
    intervals = [c["interval"] for c in verdict["comparisons"] if c["interval"]]
    verdict["agreement"] = {"seeds": len(verdict["comparisons"]), "paired": len(intervals),
                            "above": sum(1 for ci in intervals if ci["low"] > 0),
                            "below": sum(1 for ci in intervals if ci["high"] < 0)}
    verdict["spread"] = {}
    if len(by_seed) > 1:
        for row in dict.fromkeys(r for r, _ in seeds.values()):
            worst = [verdict["rows"][n]["worst_case"]["accuracy"] for n, (r, _) in seeds.items()
                     if r == row and n in verdict["rows"]]
            verdict["spread"][row] = _spread(worst)
        verdict["spread"]["gap"] = _spread([ci["difference"] for ci in intervals])
    return verdict


# ---------------------------------------------------------------- words

def _pct(value):
    return f"{number_text(100 * value)} %"


def _points(value):
    return f"{number_text(100 * value, sign=True)} points"


def _interval(record):
    return interval_text(record["low"], record["high"])


def _seed_label(label, seed):
    return label if seed is None else f"{label} (seed {seed})"


def _gap_sentences(comparison, labels, several):
    """One seed's paired gap: the numbers, then the one claim they allow."""
    subject, baseline = labels.get(SUBJECT, SUBJECT), labels.get(BASELINE, BASELINE)
    where = f"Seed {comparison['seed']}: the" if several else "The"
    if comparison["refusal"] == "pending":
        return [f"{where} {subject} − {baseline} comparison waits for both rows."]
    if comparison["refusal"]:
        return [f"{where} {subject} − {baseline} comparison is not made: {comparison['refusal']}."]
    ci = comparison["interval"]
    lines = [f"{where} worst-case gap {subject} − {baseline} is {_points(ci['difference'])}, 95 % interval "
             f"{_interval(ci)}, on the same {ci['n']} test images ({ci['only_first']} survived only {subject}, "
             f"{ci['only_second']} only {baseline})."]
    if ci["low"] > 0:
        lines.append(f"{subject} keeps its worst case above {baseline}.")
    elif ci["high"] < 0:
        lines.append(f"{subject}'s worst case is below {baseline}'s.")
    else:
        lines.append(f"These {ci['n']} test images do not resolve a difference between {subject} and {baseline}.")
    return lines


def _agreement_sentences(verdict, labels):
    """How many seeds resolve the gap in each direction (never more than the intervals show)."""
    agree = verdict["agreement"]
    total = agree["seeds"]
    if total < 2:
        return []
    subject, baseline = labels.get(SUBJECT, SUBJECT), labels.get(BASELINE, BASELINE)
    lines = [f"In {agree['above']} of {total} seeds {subject}'s worst case is above {baseline}'s with an interval "
             "excluding 0.",
             f"In {agree['below']} of {total} seeds it is below with an interval excluding 0."]
    unresolved = agree["paired"] - agree["above"] - agree["below"]
    if unresolved:
        lines.append(f"In {unresolved} of {total} seeds the test images do not resolve the gap.")
    if agree["paired"] < total:
        lines.append(f"{total - agree['paired']} of {total} seeds have no paired comparison yet.")
    return lines


def _models_sentence(settings):
    seeds = settings.get("seeds") or [settings.get("seed", 0)]
    if len(seeds) == 1:
        return (f"One trained model per method (seed {seeds[0]}): each interval covers which test images were drawn, "
                "not the variation between training seeds.")
    count = COUNT_WORDS.get(len(seeds), str(len(seeds)))
    return (f"{count} trained models per method (seeds {', '.join(map(str, seeds))}): each interval covers one "
            "seed's test images; the table shows the spread between seeds.")


def _row_sentences(label, r):
    """One row's short sentences: worst case, AutoAttack (or the paper protocol) and their gap, the
    families beyond the protocol, a collapse, FLAGs."""
    worst = r["worst_case"]
    lines = [f"{label}: worst case {_pct(worst['accuracy'])} {_interval(worst)} over {r['attacks']} attacks."]
    if r["autoattack"] is not None:
        gap, name = r["autoattack_gap"], "AutoAttack"
        lines.append(f"Its paper-protocol AutoAttack figure is {_pct(r['autoattack']['accuracy'])}.")
        claim = f"AutoAttack overstates its worst case by {_points(gap['difference'])} {_interval(gap)}."
    else:
        gap, name = r["protocol_gap"], "the paper protocol's attacks together"
        lines.append(f"AutoAttack was not run; the paper protocol's attacks together leave "
                     f"{_pct(r['paper_protocol']['accuracy'])}.")
        claim = f"The paper protocol overstates its worst case by {_points(gap['difference'])} {_interval(gap)}."
    if gap["low"] > 0:
        lines.append(claim)
    else:
        lines.append(f"These {gap['n']} test images do not resolve a gap between {name} and its worst case "
                     f"({_points(gap['difference'])} {_interval(gap)}).")
    broke = [f"{FAMILIES[f]} {k}" for f, k in r["families"].items() if k]
    lines.append(f"Attacks beyond the paper protocol broke {r['beyond_protocol']} examples it left"
                 + (f" ({', '.join(broke)})." if broke else "."))
    if r["collapsed"]:
        test = r["collapse"]
        lines.append(f"**Its worst case collapses**: {test['kept']} of the {test['left']} examples {test['reference']} "
                     f"left survive, fewer than half ({BINOMIAL_TEST}, p = {test['p']:.2g}).")
    if r["flags"]:
        lines.append(f"Sanity FLAGs: {', '.join(r['flags'])}.")
    return lines


def verdict_paragraph(verdict, labels, settings, paper_epochs):
    """The generated verdict in short sentences, one claim each (``labels``: row name → the paper's name):
    the models and the gap first, one bullet per row, then what the figures are and are not."""
    several = len(verdict["comparisons"]) > 1
    lines = [_models_sentence(settings)]
    if not verdict["comparisons"]:
        lines.append("The TRADES-ANCRA − TRADES comparison waits for both rows.")
    for comparison in verdict["comparisons"]:
        lines += _gap_sentences(comparison, labels, several)
    lines += _agreement_sentences(verdict, labels)
    rows = []  # one bullet per row
    for r in verdict["rows"].values():
        seed = r["seed"] if len(verdict["seeds"]) > 1 else None
        rows.append("- " + " ".join(_row_sentences(_seed_label(labels.get(r["row"], r["row"]), seed), r)))
    head, lines = " ".join(lines), []
    if verdict["pending"]:
        lines.append(f"Not finished yet: {', '.join(labels.get(n, n) for n in verdict['pending'])}.")
    schedule = f"Trained {settings['epochs']} epochs"
    if settings["epochs"] != paper_epochs:
        schedule += f", not the paper's {paper_epochs}: a short schedule, not a reproduction of its figures"
    lines.append(schedule + ".")
    if settings.get("smoke"):
        lines.append("Smoke run on synthetic data: the numbers mean nothing about CIFAR-10.")
    lines.append(f"Intervals: 95 %, Wilson's for one row, {PAIRED_NAME} for differences.")
    lines.append("They cover the draw of test images, not training seeds, other test sets or other attacks.")
    return "\n\n".join(part for part in (head, "\n".join(rows), " ".join(lines)) if part)


def _line(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _spread_text(spread, scale=100):
    if spread is None:
        return "—"
    text = f"mean {number_text(scale * spread['mean'])}, range {number_text(scale * spread['min'])} to " \
           f"{number_text(scale * spread['max'])}"
    return text + (f", SD {number_text(scale * spread['sd'])}" if spread["sd"] is not None else "")


def render_verdict(table):
    """The verdict's markdown sections (appended to table.md)."""
    verdict = table["verdict"]
    labels = {r["row"]: r.get("method_label", r["label"]) for r in table["rows"]}  # the seed has its own column
    # in the table's row order (table.json may hold the verdict's rows with sorted keys)
    ordered = [(r["row"], verdict["rows"][r["row"]]) for r in table["rows"] if r["row"] in verdict["rows"]]
    lines = ["## Verdict", "", table["verdict_paragraph"], "",
             _line(["row", "seed", "clean %", "paper-protocol AA %", "paper protocol (all its attacks) %",
                    "worst case % [95 % Wilson]", "attacks", "AA − worst (points) [95 %]", "collapsed", "FLAGs"]),
             _line(["---"] * 10)]
    for name, r in ordered:
        aa = "not run" if r["autoattack"] is None else number_text(100 * r["autoattack"]["accuracy"])
        gap = "—" if r["autoattack_gap"] is None else \
            f"{number_text(100 * r['autoattack_gap']['difference'])} {_interval(r['autoattack_gap'])}"
        lines.append(_line([labels.get(name, name), "—" if r["seed"] is None else r["seed"],
                            number_text(100 * r["clean"]["accuracy"]), aa,
                            number_text(100 * r["paper_protocol"]["accuracy"]),
                            f"{number_text(100 * r['worst_case']['accuracy'])} {_interval(r['worst_case'])}",
                            r["attacks"], gap, "yes" if r["collapsed"] else "no", ", ".join(r["flags"]) or "none"]))
    paired = [c for c in verdict["comparisons"] if c["interval"]]
    if paired:
        lines += ["", "Paired worst-case gap TRADES-ANCRA − TRADES per seed (percentage points, 95 % Newcombe "
                  "method 10 interval on the same test images):", "",
                  _line(["seed", "gap", "95 % interval", "survived only TRADES-ANCRA", "only TRADES", "reading"]),
                  _line(["---"] * 6)]
        for c in paired:
            ci = c["interval"]
            reading = "above" if ci["low"] > 0 else "below" if ci["high"] < 0 else "not resolved"
            lines.append(_line(["—" if c["seed"] is None else c["seed"], number_text(100 * ci["difference"], sign=True),
                                _interval(ci), ci["only_first"], ci["only_second"], reading]))
    if verdict["spread"]:
        lines += ["", "Spread between training seeds (percentage points; each seed's numbers above):", "",
                  _line(["row", "worst case %"]), _line(["---"] * 2)]
        method_labels = {r.get("method_row", r["row"]): r.get("method_label", r["label"]) for r in table["rows"]}
        for row, spread in verdict["spread"].items():
            if row == "gap":
                continue
            lines.append(_line([method_labels.get(row, row), _spread_text(spread)]))
        lines.append(_line(["gap TRADES-ANCRA − TRADES", _spread_text(verdict["spread"]["gap"])]))
    families = list(FAMILIES)
    lines += ["", "Examples the paper protocol left that each family broke (in a cascade each example is counted once, "
              "by the first family that broke it):", "",
              _line(["row", "seed"] + [FAMILIES[f] for f in families] + ["all beyond the protocol"]),
              _line(["---"] * (len(families) + 3))]
    for name, r in ordered:
        lines.append(_line([labels.get(name, name), "—" if r["seed"] is None else r["seed"]]
                           + [r["families"].get(f, "not run") for f in families] + [r["beyond_protocol"]]))
    return lines


# ---------------------------------------------------------------- time per phase


def _seconds(value):
    return "—" if value is None else f"{value:.0f} s"


def timing_lines(timing):
    """The time-per-phase section of table.md."""
    lines = ["## Time per phase", "",
             (f"Training {_seconds(timing['train_seconds'])} (slowest row; its mean epoch "
              f"{_seconds(timing['epoch_seconds'])}), evaluation {_seconds(timing['evaluate_seconds'])} (slowest row), table "
              f"{timing['table_seconds']:.1f} s; this invocation {timing['invocation_seconds']:.0f} s from start to "
              f"end. Expected wall time for E epochs: about E x epoch + evaluation + start-up "
              "(docs/reproduce.md, \"The verdict\").")]
    budget = timing.get("budget")
    if budget:
        lines += ["", budget_text(budget)]
    return lines


# ---------------------------------------------------------------- --time-budget

TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000}
PROBE_FRACTION = 5          # the probe epoch trains on 1/5 of the training set (and checks on 1/5 of eval-size)
SMOKE_PROBE_FRACTION = 1    # smoke runs' 32 training images are too few to split
PROBE_EXAMPLES = {False: 32, True: 4}   # test examples the probe evaluation attacks (by smoke)
EVAL_SAFETY = 2.0           # a 1-epoch model loses examples early, so the cascade does less work than later
MARGIN = 0.9                # plan for 90 % of what is left
TABLE_RESERVE = 10.0        # seconds kept for the table
FLOORS = {"epochs": 5, "n_examples": 200}


class BudgetError(RuntimeError):
    """The time budget cannot hold even the smallest verdict; the message says what it would need."""


def choose_schedule(usable, measured, epochs, n_examples):
    """The largest ``(epochs, n)`` whose estimate ``overhead + epochs x epoch + n x example`` fits in
    ``usable`` seconds: the requested ones if they fit, else fewer epochs down to FLOORS["epochs"]
    (or the request, if smaller), then fewer examples down to FLOORS["n_examples"], then fewer epochs
    down to 1. Raises BudgetError when one epoch and the smallest evaluation do not fit."""
    def cost(e, n):
        return measured["overhead_seconds"] + e * measured["epoch_seconds"] + n * measured["example_seconds"]

    def most_epochs(n, low):
        fitting = [e for e in range(epochs, low - 1, -1) if cost(e, n) <= usable]
        return fitting[0] if fitting else None

    floor_e, floor_n = min(epochs, FLOORS["epochs"]), min(n_examples, FLOORS["n_examples"])
    chosen = most_epochs(n_examples, floor_e)
    if chosen is not None:
        return chosen, n_examples
    spare = usable - measured["overhead_seconds"] - floor_e * measured["epoch_seconds"]
    n = min(n_examples, int(spare // measured["example_seconds"])) if spare > 0 else 0
    if n >= floor_n:
        return floor_e, n
    chosen = most_epochs(floor_n, 1)
    if chosen is None:
        raise BudgetError(f"the time budget leaves {usable:.0f} s but one epoch and {floor_n} test examples need about "
                          f"{cost(1, floor_n):.0f} s (measured: epoch {measured['epoch_seconds']:.0f} s, "
                          f"{measured['example_seconds']:.2f} s per example); give a larger --time-budget")
    return chosen, floor_n


def budget_text(budget):
    """What the time budget changed, in one sentence for the table."""
    requested, chosen = budget["requested"], budget["chosen"]
    changed = [f"{k.replace('_', ' ')} {requested[k]} → {chosen[k]}" for k in ("epochs", "n_examples")
               if requested[k] != chosen[k]]
    measured = budget["measured"]
    return (f"Time budget {budget['seconds']:.0f} s: " + ("shortened " + ", ".join(changed) if changed else
                                                         "nothing shortened") +
            f" (planned from a probe epoch of {measured['epoch_seconds']:.0f} s on the whole training set, "
            f"{measured['example_seconds']:.2f} s per evaluated example, start-up {measured['overhead_seconds']:.0f} s; "
            f"the probe took {measured['probe_seconds']:.0f} s).")


# ---------------------------------------------------------------- RESULTS.md

RESULTS_HEADER = """# Measured verdicts

This file holds only verdict tables that `python reproduce.py verdict --record RESULTS.md` wrote
after a finished run on a CUDA GPU with real CIFAR-10 data: never a smoke, synthetic or CPU run,
never a number typed by hand. Each section names its GPU, torch version, commit, date, schedule
and the exact command. A short schedule (the verdict's default is 15 epochs) is not the paper's
120 epochs: its numbers answer whether the evaluation sees through RA's gate at that schedule,
not what the paper's models would reach. How to run it and read it: docs/reproduce.md.
"""
NO_VERDICT_YET = "No GPU verdict has been recorded yet."


def record_refusal(smoke, dataset, cuda_available):
    """Why ``--record`` is refused before anything runs (one sentence), or None."""
    if smoke or dataset == "synthetic":
        return ("--record keeps only real-data GPU verdicts; a smoke or synthetic run is never recorded "
                "(drop --record)")
    if not cuda_available:
        return "--record keeps only verdicts measured on a GPU and this machine has no CUDA device (drop --record)"
    return None


def record_problem(table):
    """Why a finished table cannot go into RESULTS.md, or None."""
    s = table["settings"]
    verdict = table.get("verdict")
    if s.get("smoke") or s.get("dataset") == "synthetic":
        return "a smoke or synthetic run is never recorded"
    if not verdict or verdict["pending"] or not verdict["comparisons"] or \
            any(c["interval"] is None for c in verdict["comparisons"]):
        return "the verdict is not finished (rows pending or failed)"
    devices = {name: r.get("device") for name, r in verdict["rows"].items()}
    off_gpu = [name for name, device in devices.items() if not str(device).startswith("cuda")]
    if off_gpu:
        return f"{', '.join(off_gpu)} was not evaluated on a CUDA device"
    return None


def _record_key(table):
    rows = table["verdict"]["rows"]
    return f"{table['settings'].get('commit')}|" + "|".join(f"{n}@{r.get('started')}" for n, r in sorted(rows.items()))


def results_section(table, gpu_name, command, date):
    """The RESULTS.md section of a finished GPU verdict."""
    s = table["settings"]
    seeds = ", ".join(map(str, s.get("seeds") or [s["seed"]]))
    torches = sorted({str(r.get("torch")) for r in table["verdict"]["rows"].values()})
    schedule = f"{s['epochs']} epochs, lr x0.1 after epochs {' '.join(map(str, s['milestones']))}"
    if s["epochs"] != table["paper_schedule"]["epochs"]:
        schedule += f" (a short schedule, not the paper's {table['paper_schedule']['epochs']} epochs)"
    lines = [f"<!-- verdict {_record_key(table)} -->", f"## Verdict of {date}, {gpu_name}", "",
             f"- GPU: {gpu_name}; torch {', '.join(torches)}; commit {s.get('commit')}; date {date}",
             f"- schedule: {schedule}; {s['n_examples']} test examples, seeds {seeds}, attack budget {s['budget']}",
             f"- command: `{command}`", ""]
    lines += render_verdict(table)
    if table.get("timing"):
        lines += [""] + timing_lines(table["timing"])[2:]
    return "\n".join(lines) + "\n"


def append_record(path, table, gpu_name, command, date):
    """Append the verdict to ``path`` (created with its header when missing); a verdict already there
    is not added twice. Returns a sentence saying what happened. Raises ValueError when the table
    cannot be recorded."""
    problem = record_problem(table)
    if problem:
        raise ValueError(f"not recorded in {path}: {problem}")
    path = Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    if f"<!-- verdict {_record_key(table)} -->" in text:
        return f"{path} already holds this verdict"
    text = text.replace(f"\n{NO_VERDICT_YET}\n", "\n")
    atomic_write_text(path, text.rstrip("\n") + "\n\n" + results_section(table, gpu_name, command, date))
    return f"recorded the verdict in {path}"



