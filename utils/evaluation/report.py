"""The markdown and JSON reports of an :class:`~utils.evaluation.results.Evaluation`, and merging
the per-example worst cases of several runs of the same examples."""
import math

import numpy as np

from utils.evaluation.errors import REFERENCE_LABEL, EvaluationError

SANITY_DOC = "docs/evaluation.md#reading-the-sanity-checks"
SMOKE_LABEL = ("**Smoke budget: not a robustness evaluation.** Every attack family ran at reduced strength (PGD/C&W "
               "capped in steps, APGD/Square/AutoAttack with the AutoAttack package's own settings lowered) to check "
               "that the suite runs; the figures below are no robustness figures and are never a headline or an "
               "exported result. Drop --budget smoke for an evaluation.")
ADAPTIVE_WARNINGS_NOTE = ("warnings of the adaptive APGD/Square runs come from surrogate views (one head, an ensemble, "
                          "straight-through masks) whose losses may legitimately be flat; they are listed for the "
                          "record and do not turn a check into a FLAG")


def _pct(value):
    return "—" if value is None else f"{100 * value:.2f} %"


def eps_text(eps):
    """ε as ``k/255`` when it is one (below 1)."""
    k = eps * 255
    if eps >= 1:
        return f"{eps:g}"
    return f"{round(k)}/255" if math.isclose(k, round(k), abs_tol=1e-6) else f"{eps:g}"


def excluded_from_worst_case(evaluation):
    """``{name: reason}`` for the attacks that ran but are not part of the threat model."""
    reasons = {}
    for r in evaluation.results:
        if r.reference:
            reasons[r.name] = REFERENCE_LABEL
        elif not r.in_worst_case:
            reasons[r.name] = f"sanity check at ε = {eps_text(r.eps)}, outside the threat model"
    return reasons


def _model_line(meta, n):
    kind = "RA" if meta.get("reverse_attention") else "plain"
    return (f"model {meta.get('arch')} ({kind}, evaluated as {kind}; {meta.get('weights', 'raw')} weights), dataset "
            f"{meta.get('dataset')} test, n = {n} (subset seed {meta.get('subset_seed')}), ε = {meta.get('eps_text')}, "
            f"λ = {meta.get('aux_weight')}, budget {meta.get('budget')}, seed {meta.get('seed')}, device "
            f"{meta.get('device')}, attacks in {meta.get('attack_dtype', 'fp32')} (judged in fp32), batch size "
            f"{meta.get('batch_size')}")


def is_smoke(meta):
    """The run used a budget that is no robustness evaluation (``--budget smoke``)."""
    return bool(meta.get("smoke")) or (meta.get("budget_params") or {}).get("evaluation") is False


def _headline(evaluation, smoke=False):
    n, covered = evaluation.n, evaluation.worst_case_results()
    worst = evaluation.worst_case()
    missing = evaluation.missing_robust_figure()
    if missing:
        return [(f"**There is no robust-accuracy figure: {missing}.** Clean accuracy "
                f"{_pct(evaluation.clean_accuracy)}.")]
    if smoke:
        return [(f"Smoke check, no headline: worst case over the weakened attacks {_pct(worst.mean() if n else 0.0)} "
                 f"({int(worst.sum())}/{n}) over {len(covered)} attacks; clean accuracy "
                 f"{_pct(evaluation.clean_accuracy)}.")]
    return [(f"**Headline: worst-case robust accuracy {_pct(worst.mean() if n else 0.0)} ({int(worst.sum())}/{n}) "
            f"over {len(covered)} attacks.** Clean accuracy {_pct(evaluation.clean_accuracy)}."), "",
            f"The worst case covers: {', '.join(r.name for r in covered)}."]


def _where(check):
    """Where a check is explained: its docs/ anchor, else the sanity checks' section."""
    return check.get("doc") or SANITY_DOC


def _label(check):
    attack = check.get("attack")
    return f"{check['name']} ({attack})" if attack else check["name"]


def flag_summary(checks, indicators):
    """Every FLAG of the sanity checks and the indicators of attack failure, right under the
    headline: what fired, what it measured and where it is explained."""
    flags = [c for c in list(checks) + list(indicators) if c["status"] == "FLAG"]
    total = len(checks) + len(indicators)
    if not flags:
        return [f"No check raised a FLAG ({total} checks; table below)."]
    lines = [f"**{len(flags)} FLAG{'s' if len(flags) > 1 else ''}** of {total} checks (each explained where named):", ""]
    lines += [f"- **FLAG** {_label(c)}: {c['message']} Read: {_where(c)}." for c in flags]
    return lines


def checks_table(checks, indicators):
    """Every check that did not fire, condensed: one row per check and status, the attacks it ran
    on listed together; "n/a" where there was nothing to check. What each indicator means is said
    once (in ``MEANINGS`` order) instead of per attack."""
    rows, meanings = {}, {}
    for check in list(checks) + list(indicators):
        if check["status"] == "FLAG":
            continue
        key = (check["name"], check["status"], check["message"] if check["status"] == "n/a" else None)
        rows.setdefault(key, []).append(check)
        if check.get("meaning"):
            meanings[check["name"]] = (check["meaning"], _where(check))
    if not rows:
        return []
    lines = ["| check | status | on | result |", "|---|---|---|---|"]
    for (name, status, _), group in rows.items():
        attacks = [c["attack"] for c in group if c.get("attack")]
        on = ", ".join(attacks) if attacks else "—"
        same = len({c["message"] for c in group}) == 1
        result = group[0]["message"] if same else f"{len(group)} attacks; per-attack numbers in results.json"
        lines.append(f"| {name} | {status} | {on} | {result} |")
    if meanings:
        lines += ["", "What each indicator of attack failure checks (Pintor et al., NeurIPS 2022; "
                  "docs/evaluation.md#indicators-of-attack-failure):"]
        lines += [f"- {name}: {meaning} ({doc})." for name, (meaning, doc) in meanings.items()]
    return lines


def _row(r, n, mark):
    if r.standalone:
        figure, count = _pct(r.accuracy), f"{int(r.robust.sum())}/{n}"
    else:
        figure, count = "— (cascade)", f"broke {r.n_broken} of {r.n_received} received"
    return (f"| {r.name}{mark} | {r.family} | {'yes' if r.with_p else 'no'} | {figure} | {count} | "
            f"{_pct(r.paper_accuracy)} | {r.seconds:.1f} |")


def _table(evaluation):
    n = evaluation.n
    lines = ["| attack | family | with p | accuracy | robust count | paper (last iterate) | seconds |",
             "|---|---|---|---|---|---|---|",
             (f"| natural | paper | no | {_pct(evaluation.clean_accuracy)} | {int(evaluation.clean.sum())}/{n} | "
             f"{_pct(evaluation.clean_accuracy)} | {evaluation.clean_seconds:.1f} |")]
    for r in evaluation.results:
        mark = " †" if r.reference else " ‡" if r.upper_bound else "" if r.in_worst_case else " *"
        lines.append(_row(r, n, mark))
    worst = evaluation.worst_case()
    total = evaluation.clean_seconds + sum(r.seconds for r in evaluation.results)
    if evaluation.missing_robust_figure():  # no robust figure: never the clean accuracy in its place
        lines.append(f"| **worst case (threat model)** | — | — | — (none: see above) | — | — | {total:.1f} |")
        return lines
    lines.append(f"| **worst case (threat model)** | — | — | **{_pct(worst.mean() if n else 0.0)}** | "
                 f"{int(worst.sum())}/{n} | — | {total:.1f} |")
    return lines


def _notes(evaluation):
    lines, idle = [], []
    for name, reason in excluded_from_worst_case(evaluation).items():
        mark = "†" if evaluation.result(name).reference else "*"
        lines.append(f"- {mark} {name}: not in the worst case ({reason}).")
    for r in evaluation.results:
        if r.upper_bound:
            skipped = r.counts.get("skipped")
            extra = f" ({skipped} of {r.n_received} skipped)" if skipped is not None else ""
            lines.append(f"- ‡ {r.name}: {r.upper_bound}{extra}.")
        if r.n_received == 0:
            idle.append(r.name)
        elif r.counts.get("skipped") == r.n_received:
            lines.append(f"- {r.name}: AutoAttack attacked nothing (its target misclassified every point); "
                         "the row is the clean accuracy of those points, not a robustness figure.")
        lines += [f"- {r.name}: {note}." for note in r.notes if not r.reference]
    if idle:
        lines.append(f"- Attacked no clean-correct example (none was left; these rows measure nothing): "
                     f"{', '.join(idle)}.")
    return lines


def _cascade_section(evaluation):
    if not evaluation.cascade:
        return ["", "Every attack ran on every clean-correct example (--no-cascade): each row is a standalone figure."]
    lines = ["", "## Cascade", "",
             ("Standalone attacks ran first on the full set; the others ran in this order, each only on the "
             "examples every earlier attack of the threat model failed to break (the per-example worst case is "
             "the same as running everything on everything):"), ""]
    idle = []
    for r in evaluation.results:
        if not r.standalone and r.n_received == 0:
            idle.append(r)
            continue
        kind = "standalone" if r.standalone else "cascade"
        lines.append(f"{r.order + 1}. {r.name} ({kind}): received {r.n_received}, broke {r.n_broken}")
    if idle:
        lines += ["", f"Received nothing (every example was broken before them): "
                      f"{', '.join(f'{r.order + 1}. {r.name}' for r in idle)}."]
    return lines


def _warnings_section(evaluation, checks):
    aa = [(r, w) for r in evaluation.results for w in r.warnings]
    if not aa:
        return []
    lines = ["", "## Warnings from the AutoAttack package", ""]
    if any(r.params.get("reduced") for r, _ in aa):
        lines += ["AutoAttack ran with its settings lowered (smoke budget): its warnings say little here.", ""]
    lines += [f"- {r.name}: {w}" for r, w in aa]
    package_check = next((c for c in checks if c["name"] == "AutoAttack's own checks"), None)
    if any(not r.package_checks for r, _ in aa):
        lines += ["", f"Why a check can still read pass: {ADAPTIVE_WARNINGS_NOTE}."]
    if package_check is not None and package_check["status"] == "FLAG":
        lines += ["", "Warnings of the AutoAttack runs themselves are a FLAG (summary under the headline)."]
    return lines


def markdown_report(evaluation, checks, meta):
    """The run as markdown: headline (or the smoke label), a summary of every FLAG, attack table,
    cascade stages, the checks that passed or had nothing to check in one table, AutoAttack's
    warnings (explained)."""
    smoke = is_smoke(meta)
    indicators = list(getattr(evaluation, "indicators", []))
    lines = [f"# Robustness evaluation: {meta.get('checkpoint', '')}", ""]
    if smoke:
        lines += [SMOKE_LABEL, ""]
    lines += _headline(evaluation, smoke) + [""] + flag_summary(checks, indicators)
    lines += ["", _model_line(meta, evaluation.n), "", "## Attacks", ""] + _table(evaluation)
    notes = _notes(evaluation)
    if notes:
        lines += [""] + notes
    if evaluation.skipped:
        lines += ["", f"Not applicable to a model without RA heads (skipped): {', '.join(evaluation.skipped)}."]
    lines += _cascade_section(evaluation)
    table = checks_table(checks, indicators)
    if table:
        lines += ["", "## Checks that passed or had nothing to check", "",
                  f"Sanity checks ({SANITY_DOC}) and indicators of attack failure (per attack on its own first run "
                  "re-traced in fp32, and per model); the FLAGs are listed under the headline.", ""] + table
    lines += _warnings_section(evaluation, checks)
    if meta.get("status") == "partial":
        lines += ["", "**Partial: the run stopped before every attack finished; rerun with --resume.**"]
    return "\n".join(lines) + "\n"


def _worst_case_json(evaluation, worst):
    """The worst case of results.json; accuracy, count and per-example values are null, and
    ``missing`` says why, when the run has no robust figure."""
    record = {"over": [r.name for r in evaluation.worst_case_results()],
              "excluded": excluded_from_worst_case(evaluation)}
    missing = evaluation.missing_robust_figure()
    if missing:
        return dict(record, accuracy=None, robust_count=None, correct=None, missing=missing)
    return dict(record, accuracy=float(worst.mean()) if evaluation.n else 0.0, robust_count=int(worst.sum()),
                correct=[int(v) for v in worst])


def json_report(evaluation, checks, meta):
    """Every number of the run, with per-example 0/1 arrays so runs can be merged."""
    worst = evaluation.worst_case()
    smoke = is_smoke(meta)
    worst_case = dict(_worst_case_json(evaluation, worst), headline=not smoke)
    if smoke:
        worst_case["not_a_robustness_figure"] = "smoke budget: every attack at reduced strength"
    return {
        "meta": meta,
        "status": meta.get("status", "complete"),
        "evaluation": "smoke check, not a robustness evaluation" if smoke else "robustness evaluation",
        "labels": [int(v) for v in evaluation.labels],
        "clean": {"accuracy": evaluation.clean_accuracy, "robust_count": int(evaluation.clean.sum()),
                  "seconds": evaluation.clean_seconds, "correct": [int(v) for v in evaluation.clean]},
        "aux_agreement": {str(k): v for k, v in evaluation.agreement.items()},
        "attacks": [r.to_json() for r in evaluation.results],
        "skipped": evaluation.skipped,
        "worst_case": worst_case,
        "cascade": {"enabled": evaluation.cascade,
                    "order": [{"name": r.name, "standalone": r.standalone, "received": r.n_received,
                               "broken": r.n_broken} for r in evaluation.results]},
        "sanity": checks,
        "attack_failure": list(getattr(evaluation, "indicators", [])),
    }


def sweep_section(sweep):
    """The ε-sweep (utils/evaluation/sweep.py) summarised for report.md: outside the headline."""
    if not sweep:
        return []
    lines = ["", "## Robust accuracy against ε (not part of the headline)", "",
             f"Accuracy on the same {sweep['n_examples']} examples at each ε "
             f"(docs/evaluation.md#robust-accuracy-against-ε); the headline counts only ε = {sweep['threat_eps_text']}. "
             "Figure: eps_sweep.png.", "",
             "| ε | " + " | ".join(sweep["curves"]) + " |", "|---|" + "---|" * len(sweep["curves"])]
    for i, eps in enumerate(sweep["eps_text"]):
        row = [_pct(sweep["curves"][name][i]) for name in sweep["curves"]]
        lines.append(f"| {eps} | " + " | ".join(row) + " |")
    lines += [""] + [f"- **{c['status']}** {c['name']}: {c['message']}" for c in sweep["checks"]]
    return lines


def merge_runs(runs):
    """Per-example worst case over several ``results.json`` dicts of the same examples (attacks
    marked ``in_worst_case: false`` — other ε, reference reproductions — are left out)."""
    if not runs:
        raise EvaluationError("no runs to merge")
    indices = runs[0]["meta"].get("indices")
    if any(run["meta"].get("indices") != indices for run in runs):
        raise EvaluationError("runs evaluated different examples; merge only runs with the same subset and seed")
    worst = np.array(runs[0]["clean"]["correct"], bool)
    for run in runs:
        worst &= np.array(run["clean"]["correct"], bool)
        for attack in run["attacks"]:
            if attack.get("in_worst_case", attack["name"] != "pgd40-eps1"):
                worst &= np.array(attack["correct"], bool)
    return {"accuracy": float(worst.mean()) if worst.size else 0.0, "robust_count": int(worst.sum()),
            "correct": [int(v) for v in worst]}
