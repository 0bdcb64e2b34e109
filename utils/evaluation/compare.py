"""Several checkpoints evaluated on the same fixed subset in one command
(``test_white_attack.py --ckpt a.pt b.pt ...``, docs/evaluation.md#comparing-models): each model's
evaluation in its own sub-folder of --out-dir (a finished one is reused, an interrupted one resumed),
then one table — clean, the paper protocol, the worst case with a 95 % Wilson interval, FLAGs — and,
when every model was evaluated on the same recorded test images with the same labels, each model's
paired worst-case difference to the first (Newcombe's method 10, utils/evaluation/stats.py), as
comparison.md and comparison.json."""
from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.evaluation.catalogue import EvaluationError
from utils.evaluation.options import check_output_dir
from utils.evaluation.report import SMOKE_LABEL, is_smoke
from utils.evaluation.stats import interval_text, paired_difference_interval, wilson_interval


def folder_names(paths):
    """A distinct sub-folder per checkpoint: its file stem, with its parent folder's name (and then
    its position) added where stems collide."""
    stems = [Path(p).stem for p in paths]
    names = []
    for i, path in enumerate(paths):
        name = stems[i] if stems.count(stems[i]) == 1 else f"{Path(path).parent.name}_{stems[i]}"
        names.append(name if name not in names else f"{name}_{i + 1}")
    return names


def paper_protocol(report):
    """Per example: clean-correct and unbroken by every standalone paper attack of the threat model
    (the paper's attacks, each on every example). Returns ``(accuracy, attack names)``."""
    attacks = [a for a in report["attacks"] if a["family"] == "paper" and a.get("in_worst_case", True)
               and a.get("standalone", True)]
    if not attacks:  # none ran: no robust figure, never the clean accuracy in its place
        return None, []
    correct = np.array(report["clean"]["correct"], bool)
    for attack in attacks:
        correct &= np.array(attack["correct"], bool)
    return (float(correct.mean()) if correct.size else 0.0), [a["name"] for a in attacks]


def flags_of(report, out_dir):
    """Names of everything that FLAGged: sanity checks, indicators of attack failure, ε-sweep checks."""
    flags = [c["name"] for c in report.get("sanity", []) if c["status"] == "FLAG"]
    flags += [f"{c['name']} ({c['attack']})" for c in report.get("attack_failure", []) if c["status"] == "FLAG"]
    sweep = Path(out_dir) / "eps_sweep.json"
    if sweep.is_file():
        flags += [c["name"] for c in json.loads(sweep.read_text())["checks"] if c["status"] == "FLAG"]
    return flags


def row(name, report, out_dir):
    n = len(report["labels"])
    k = report["worst_case"]["robust_count"]
    low, high = (None, None) if k is None else wilson_interval(k, n) if n else (0.0, 1.0)  # no figure: no interval
    paper, paper_attacks = paper_protocol(report)
    return {"model": name, "checkpoint": report["meta"].get("checkpoint"), "n": n,
            "clean": report["clean"]["accuracy"], "paper_protocol": paper, "paper_attacks": paper_attacks,
            "worst_case": report["worst_case"]["accuracy"], "worst_case_count": k, "worst_case_ci95": [low, high],
            "flags": flags_of(report, out_dir), "folder": str(out_dir)}


def _pct(v):
    return "—" if v is None else f"{100 * v:.2f} %"


def markdown_table(rows, meta, pairs=(), refusal=None):
    lines = [f"# Comparison on one fixed subset ({meta['dataset']} test, n = {meta['n']}, subset seed "
             f"{meta['subset_seed']}, ε = {meta['eps_text']})", "",
             "Paper protocol: per example, the worst of the paper's attacks that ran on every example; worst case: "
             "every attack of the threat model (the headline of each report.md), with its 95 % Wilson interval.", "",
             "| model | clean | paper protocol | worst case | 95 % interval | FLAGs |", "|---|---|---|---|---|---|"]
    if meta.get("smoke"):
        lines[1:1] = ["", SMOKE_LABEL]
    for r in rows:
        low, high = r["worst_case_ci95"]
        flags = ", ".join(r["flags"]) if r["flags"] else "none"
        count = "" if r["worst_case_count"] is None else f" ({r['worst_case_count']}/{r['n']})"
        interval = "—" if low is None else f"{_pct(low)} – {_pct(high)}"
        lines.append(f"| {r['model']} | {_pct(r['clean'])} | {_pct(r['paper_protocol'])} | {_pct(r['worst_case'])}"
                     f"{count} | {interval} | {flags} |")
    lines += paired_markdown(list(pairs), refusal)
    lines += ["", "Each model's own report: its sub-folder's report.md (docs/evaluation.md#comparing-models)."]
    return "\n".join(lines) + "\n"


def pairing_refusal(names, reports):
    """Why the results.json ``reports`` (of ``names``) cannot be paired, as a clause, or None: pairing
    needs every one to record its test images (meta.indices) and labels, all the same (two missing
    records are not "the same")."""
    for name, report in zip(names, reports):
        if (report.get("meta") or {}).get("indices") is None or report.get("labels") is None:
            return (f"{name}'s results.json records no test-image indices or labels (meta.indices); evaluate it "
                    "again with this version to pair it")
        if report["worst_case"].get("correct") is None:
            return f"{name} has no robust figure ({report['worst_case'].get('missing', 'no worst case')})"
    first = reports[0]
    for name, report in zip(names[1:], reports[1:]):
        if list(report["meta"]["indices"]) != list(first["meta"]["indices"]):
            return f"{name} was evaluated on other test images than {names[0]}"
        if list(report["labels"]) != list(first["labels"]):
            return f"{name}'s test images carry other labels than {names[0]}'s"
    return None


def paired_rows(names, reports):
    """Each model's worst case minus the first model's, paired on the same examples (method 10)."""
    base = reports[0]["worst_case"]["correct"]
    rows = []
    for name, report in zip(names[1:], reports[1:]):
        ci = paired_difference_interval(report["worst_case"]["correct"], base)
        rows.append(dict(ci, model=name, baseline=names[0], claim=difference_claim(ci, name, names[0])))
    return rows


def difference_claim(ci, name, baseline):
    """The words a paired interval allows: above/below only when it excludes 0."""
    if ci["low"] > 0:
        return f"{name} above {baseline}"
    if ci["high"] < 0:
        return f"{name} below {baseline}"
    return f"not resolved by these {ci['n']} examples"


def paired_markdown(pairs, refusal):
    """The paired-difference section of comparison.md."""
    if refusal:
        return ["", f"No paired worst-case differences: {refusal}."]
    if not pairs:
        return []
    lines = ["", f"Paired worst-case differences to {pairs[0]['baseline']} (percentage points, same examples; "
             f"{pairs[0]['method']}; the interval covers which test images were drawn, not training seeds, other "
             "test sets or other attacks):", "",
             "| model | difference | 95 % interval | survived only this model | only the first | reading |",
             "|---|---|---|---|---|---|"]
    for p in pairs:
        lines.append(f"| {p['model']} | {100 * p['difference']:+.2f} | {interval_text(p['low'], p['high'], decimals=2)} "
                     f"| {p['only_first']} | {p['only_second']} | {p['claim']} |")
    return lines


def _finished(sub):
    path = sub / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_same_run(saved, sub, args):
    key = saved["meta"].get("resume_key", {})
    wanted = {"eps": args.eps, "seed": args.seed, "budget": args.budget, "attacks_requested": args.attacks,
              "aux_weight": args.aux_weight, "cascade": args.cascade}
    for name, value in wanted.items():
        if key.get(name) != value:
            raise EvaluationError(f"{sub} holds an evaluation with another {name.replace('_', ' ')} "
                                  f"({key.get(name)!r}); use the same settings or another --out-dir")


def check_inputs(args):
    """Refuse, before any work, a missing checkpoint, a duplicate, options that apply to one model."""
    missing = [p for p in args.compare if not Path(p).is_file()]
    if missing:
        raise EvaluationError(f"checkpoint {missing[0]} does not exist; give existing files to --ckpt")
    if len({str(Path(p).resolve()) for p in args.compare}) != len(args.compare):
        raise EvaluationError("--ckpt names the same checkpoint twice; give each model once")
    if args.export_robustbench:
        raise EvaluationError("--export-robustbench takes one model; export each model's folder separately")


def preflight(args, load):
    """Load every checkpoint once with ``load(path) -> (model, config, saved)`` before any work, so a
    broken file or a model of another dataset is refused before the first evaluation starts."""
    found, sizes = {}, {}
    for path in args.compare:
        _, config, saved = load(path)
        found[path] = args.dataset or saved.get("dataset")
        sizes[path] = (config or {}).get("image_size") or saved.get("image_size")
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{Path(p).name}: {d}" for p, d in found.items())
        raise EvaluationError(f"the checkpoints were trained on different datasets ({listed}); compare models of "
                              "one dataset, or pass --dataset")
    if len({size for size in sizes.values() if size is not None}) > 1:
        listed = ", ".join(f"{Path(p).parent.name}/{Path(p).name}: {s}×{s}" for p, s in sizes.items() if s)
        raise EvaluationError(f"the checkpoints take images of different sizes ({listed}), so they cannot be "
                              "evaluated on the same test images; compare models of one image size")


def run_compare(args, evaluate_one, load=None, started=None):
    """Evaluate every checkpoint of ``args.compare`` with ``evaluate_one(args_for_one)`` (the
    single-model run) into OUT_DIR/NAME, then write the comparison; returns the rows. ``load``
    (path → model, config, saved) checks every checkpoint first."""
    check_inputs(args)
    if load is not None:
        preflight(args, load)
    started = started or datetime.now()
    out_dir = Path(args.out_dir or f"compare_{started:%Y%m%d_%H%M%S}")
    check_output_dir(out_dir)
    names = folder_names(args.compare)
    for path, name in zip(args.compare, names):
        sub = out_dir / name
        saved = _finished(sub)
        if saved is not None:
            _check_same_run(saved, sub, args)
            continue
        one = copy.copy(args)
        one.ckpt, one.compare, one.out_dir = path, None, str(sub)
        one.resume = sub.is_dir() and any(sub.glob("results*.json"))
        evaluate_one(one)
    reports = [json.loads((out_dir / name / "results.json").read_text()) for name in names]
    first = reports[0]
    for name, report in zip(names[1:], reports[1:]):
        for key in ("dataset", "indices"):
            if report["meta"].get(key) != first["meta"].get(key):
                raise EvaluationError(f"{name} was evaluated on other test images than {names[0]} (its {key} "
                                      "differs); compare only models evaluated on one dataset and subset")
        if list(report.get("labels") or []) != list(first.get("labels") or []):
            raise EvaluationError(f"{name}'s test images carry other labels than {names[0]}'s; compare only "
                                  "models evaluated on the same labelled images")
    meta = {key: reports[0]["meta"].get(key) for key in ("dataset", "subset_seed", "eps", "eps_text", "seed",
                                                         "budget", "attacks_requested", "indices")}
    meta["n"] = len(reports[0]["labels"])
    meta["smoke"] = any(is_smoke(r["meta"]) for r in reports)  # a smoke budget: labelled, never a figure
    rows = [row(name, report, out_dir / name) for name, report in zip(names, reports)]
    refusal = pairing_refusal(names, reports)
    pairs = [] if refusal else paired_rows(names, reports)
    text = markdown_table(rows, meta, pairs, refusal)
    atomic_write_text(out_dir / "comparison.md", text)
    atomic_write_json(out_dir / "comparison.json", {"meta": meta, "models": rows, "paired": pairs,
                                                    "paired_refusal": refusal})
    print(text)
    print(f"saved {out_dir / 'comparison.md'} and {out_dir / 'comparison.json'}")
    return rows
