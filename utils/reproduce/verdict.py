"""The verdict study's answer (docs/reproduce.md, "The verdict"): does TRADES-ANCRA keep robustness
above TRADES once the evaluation sees through RA's argmax gate?

From each row's results.json (per-example correctness of every attack): the worst case with a 95 %
Wilson interval, which attack families broke examples the paper's protocol (docs/protocol.md §2)
left, the paired TRADES-ANCRA − TRADES worst-case gap, the paper-protocol AutoAttack − worst-case
gap of every row, and a paragraph generated from these numbers. Nothing here is typed by hand.
"""
from __future__ import annotations

from pathlib import Path

from utils.checkpoint import atomic_write_text
from utils.reproduce.stats import paired_difference_interval, wilson_interval

# Families beyond the paper's protocol, in the order the verdict lists them (catalogue names → words).
FAMILIES = {"aux-head": "aux heads", "joint": "joint", "straight-through": "straight-through",
            "enumeration": "enumeration", "transfer": "transfer", "black-box": "Square",
            "sanity": "more PGD steps/restarts"}
SUBJECT, BASELINE = "trades-ancra", "trades"
# A worst case below this fraction of the row's paper-protocol figure "collapses".
COLLAPSE_FRACTION = 0.5


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
    """The verdict's numbers for one row's results.json."""
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
    if aa is not None and aa.get("accuracy") is not None:
        aa_correct = [bool(c) and bool(r) for c, r in zip(results["clean"]["correct"], aa["correct"])]
        record["autoattack"] = _proportion(sum(aa_correct), n)
        record["autoattack_gap"] = paired_difference_interval(aa_correct, worst)
    record["collapsed"] = collapsed(record)
    return record


def collapsed(record):
    """The worst case fell below COLLAPSE_FRACTION of the paper-protocol figure (AutoAttack when run)."""
    reference = (record["autoattack"] or record["paper_protocol"])["accuracy"]
    return reference > 0 and record["worst_case"]["accuracy"] < COLLAPSE_FRACTION * reference


def build_verdict(rows):
    """``rows``: ``{row name: results.json or None}``. The verdict dict of table.json (rows not
    finished are listed as pending; the comparison needs both TRADES rows on the same examples)."""
    done = {name: results for name, results in rows.items() if results is not None}
    verdict = {"rows": {name: row_verdict(results) for name, results in done.items()},
               "pending": [name for name, results in rows.items() if results is None], "comparison": None,
               "collapse_rule": f"worst case below {COLLAPSE_FRACTION:g} x the paper-protocol figure"}
    if SUBJECT in done and BASELINE in done:
        same = done[SUBJECT]["meta"].get("indices") == done[BASELINE]["meta"].get("indices")
        verdict["comparison"] = {"same_examples": same, "subject": SUBJECT, "baseline": BASELINE, "interval": (
            paired_difference_interval(done[SUBJECT]["worst_case"]["correct"], done[BASELINE]["worst_case"]["correct"])
            if same else None)}
    return verdict


# ---------------------------------------------------------------- words

def _pct(value):
    return f"{100 * value:.1f} %"


def _points(value):
    return f"{100 * value:+.1f} points"


def _interval(record):
    return f"[{100 * record['low']:.1f}, {100 * record['high']:.1f}]"


def _comparison_sentence(verdict, labels):
    comparison = verdict["comparison"]
    if comparison is None:
        return f"The TRADES-ANCRA − TRADES comparison waits for both rows ({', '.join(verdict['pending'])} pending)."
    if not comparison["same_examples"]:
        return ("TRADES-ANCRA and TRADES were evaluated on different test examples, so no paired comparison is "
                "made; rerun both with the same --n-examples and --seed.")
    ci = comparison["interval"]
    subject, baseline = labels.get(SUBJECT, SUBJECT), labels.get(BASELINE, BASELINE)
    if ci["low"] > 0:
        answer = f"{subject} keeps its worst case above {baseline}"
    elif ci["high"] < 0:
        answer = f"{subject}'s worst case is below {baseline}'s"
    else:
        answer = f"these {ci['n']} examples do not resolve a difference between {subject} and {baseline}"
    return (f"Worst-case gap {subject} − {baseline}: {_points(ci['difference'])}, 95 % interval "
            f"{_interval(ci)} points ({ci['method']}, from per-example correctness on the same {ci['n']} "
            f"examples; {ci['only_first']} survived only {subject}, {ci['only_second']} only {baseline}): {answer}.")


def _row_sentence(label, r):
    worst = r["worst_case"]
    text = f"{label}: worst case {_pct(worst['accuracy'])} {_interval(worst)} over {r['attacks']} attacks"
    if r["autoattack"] is not None:
        gap = r["autoattack_gap"]
        text += (f"; paper-protocol AutoAttack {_pct(r['autoattack']['accuracy'])}, so AutoAttack overstates it by "
                 f"{_points(gap['difference'])} {_interval(gap)}")
    else:
        gap = r["protocol_gap"]
        text += (f"; AutoAttack not run, the paper protocol's attacks together leave "
                 f"{_pct(r['paper_protocol']['accuracy'])}, {_points(gap['difference'])} {_interval(gap)} above it")
    broke = [f"{FAMILIES[f]} {k}" for f, k in r["families"].items() if k]
    text += (f"; attacks beyond the paper protocol broke {r['beyond_protocol']} examples it left"
             + (f" ({', '.join(broke)})" if broke else ""))
    if r["collapsed"]:
        text += ". **Its worst case collapses** (below half of the paper-protocol figure)"
    if r["flags"]:
        text += f"; sanity FLAGs: {', '.join(r['flags'])}"
    return text + "."


def verdict_paragraph(verdict, labels, settings, paper_epochs):
    """The generated paragraph: what the numbers show (``labels``: row name → the paper's name)."""
    lines = [_comparison_sentence(verdict, labels)]
    lines += [_row_sentence(labels.get(name, name), r) for name, r in verdict["rows"].items()]
    if verdict["pending"]:
        lines.append(f"Not finished yet: {', '.join(labels.get(n, n) for n in verdict['pending'])}.")
    schedule = f"Trained {settings['epochs']} epochs"
    if settings["epochs"] != paper_epochs:
        schedule += f", not the paper's {paper_epochs}: a short schedule, not a reproduction of its figures"
    if settings.get("smoke"):
        schedule += "; smoke run on synthetic data, the numbers mean nothing about CIFAR-10"
    lines.append(schedule + ". Intervals: 95 %, Wilson for one row, paired (Newcombe) for differences.")
    return " ".join(lines)


def _line(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render_verdict(table):
    """The verdict's markdown sections (appended to table.md)."""
    verdict, labels = table["verdict"], {r["row"]: r["label"] for r in table["rows"]}
    lines = ["## Verdict", "", table["verdict_paragraph"], "",
             _line(["row", "clean %", "paper-protocol AA %", "paper protocol (all its attacks) %",
                    "worst case % [95 % Wilson]", "attacks", "AA − worst (points) [95 %]", "collapsed", "FLAGs"]),
             _line(["---"] * 9)]
    for name, r in verdict["rows"].items():
        aa = "not run" if r["autoattack"] is None else f"{100 * r['autoattack']['accuracy']:.1f}"
        gap = "—" if r["autoattack_gap"] is None else \
            f"{100 * r['autoattack_gap']['difference']:.1f} {_interval(r['autoattack_gap'])}"
        lines.append(_line([labels.get(name, name), f"{100 * r['clean']['accuracy']:.1f}", aa,
                            f"{100 * r['paper_protocol']['accuracy']:.1f}",
                            f"{100 * r['worst_case']['accuracy']:.1f} {_interval(r['worst_case'])}", r["attacks"], gap,
                            "yes" if r["collapsed"] else "no", ", ".join(r["flags"]) or "none"]))
    families = list(FAMILIES)
    lines += ["", "Examples the paper protocol left that each family broke (in a cascade each example is counted once, "
              "by the first family that broke it):", "",
              _line(["row"] + [FAMILIES[f] for f in families] + ["all beyond the protocol"]),
              _line(["---"] * (len(families) + 2))]
    for name, r in verdict["rows"].items():
        lines.append(_line([labels.get(name, name)] + [r["families"].get(f, "not run") for f in families]
                           + [r["beyond_protocol"]]))
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
    if not verdict or verdict["pending"] or verdict["comparison"] is None:
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
    torches = sorted({str(r.get("torch")) for r in table["verdict"]["rows"].values()})
    schedule = f"{s['epochs']} epochs, lr x0.1 after epochs {' '.join(map(str, s['milestones']))}"
    if s["epochs"] != table["paper_schedule"]["epochs"]:
        schedule += f" (a short schedule, not the paper's {table['paper_schedule']['epochs']} epochs)"
    lines = [f"<!-- verdict {_record_key(table)} -->", f"## Verdict of {date}, {gpu_name}", "",
             f"- GPU: {gpu_name}; torch {', '.join(torches)}; commit {s.get('commit')}; date {date}",
             f"- schedule: {schedule}; {s['n_examples']} test examples, seed {s['seed']}, attack budget {s['budget']}",
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



