"""table.json and table.md of a study: per row the paper's figures beside ours (our strict count and
the paper's last-iterate count), the reference code's FGSM/C&W, the worst case, the sanity FLAGs,
the BatchNorm check and where every number came from. A row not done shows its status, never a number."""
from __future__ import annotations

from dataclasses import dataclass

from utils import recipe
from utils.reproduce.paper import COLUMNS, HEADINGS, reported
from utils.reproduce.studies import Row
from utils.reproduce.verdict import build_verdict, render_verdict, timing_lines, verdict_paragraph

SMOKE_SKIPPED = ("autoattack", "autoattack+p")
REFERENCE_LABEL = "reference code's FGSM/C&W, not robustness"


@dataclass
class RowInput:
    """What the files say about one row."""

    row: Row
    status: str                      # "done", "pending", "failed: ...", "training (epoch 3/15 done)", ...
    run_dir: str
    results: dict | None = None   # results.json of a finished evaluation
    batchnorm: dict | None = None
    commit: str | None = None


def _pct(value):
    return "—" if value is None else f"{100 * value:.2f}"


def _attack(results, name):
    return next((a for a in results.get("attacks", []) if a.get("name") == name), None)


def our_cell(results, name, smoke):
    """``{"robust", "last_iterate", "text"}`` of column ``name`` in a finished evaluation."""
    if name == "natural":
        clean = results["clean"]["accuracy"]
        return {"robust": clean, "last_iterate": clean, "text": _pct(clean)}
    attack = _attack(results, name)
    if attack is None:
        if name in results.get("skipped", []):
            text = "n/a (plain model)"
        elif smoke and name in SMOKE_SKIPPED:
            text = "not run (smoke)"
        else:
            text = "not run"
        return {"robust": None, "last_iterate": None, "text": text}
    robust, last = attack.get("accuracy"), attack.get("paper_last_iterate")
    return {"robust": robust, "last_iterate": last, "text": _pct(robust) if robust is not None else "— (cascade)"}


def reference_cells(results):
    """The reference-protocol attacks (``ref-*``) of an evaluation: name → accuracy figures."""
    cells = {}
    for attack in results.get("attacks", []):
        if attack.get("name", "").startswith("ref-") or attack.get("family") == "reference":
            figure = attack.get("paper_last_iterate")
            cells[attack["name"]] = {"accuracy": attack.get("accuracy"), "last_iterate": figure,
                                     "text": _pct(figure if figure is not None else attack.get("accuracy"))}
    return cells


def row_record(item, settings):
    """The table.json record of one row."""
    row, results = item.row, item.results
    paper = reported(row.paper)
    record = {
        "row": row.name, "label": row.seed_label,
        "method_row": row.method_row, "method_label": row.label, "status": item.status, "run_dir": item.run_dir,
        "commit": item.commit, "epochs": settings["epochs"], "milestones": list(settings["milestones"]),
        "seed": settings["seed"] if row.seed is None else row.seed, "n_examples": settings["n_examples"],
        "paper": None if paper is None else {"source": paper.source, "dataset": paper.dataset, "note": paper.note,
                                             "figures": dict(paper.figures)},
        "ours": None, "reference": None, "worst_case": None, "flags": None,
        "batchnorm": "n/a" if not row.shares_final_bn else (item.batchnorm or None),
    }
    if results is not None:
        smoke = settings["smoke"]
        worst = results["worst_case"]
        record.update(
            ours={name: our_cell(results, name, smoke) for name in COLUMNS},
            reference=reference_cells(results),
            worst_case={"accuracy": worst.get("accuracy"), "robust_count": worst.get("robust_count"),
                        "attacks": len(worst.get("over", []))},
            flags=[c["name"] for c in results.get("sanity", []) if c.get("status") == "FLAG"],
            n_examples=(results.get("meta") or {}).get("n_examples", settings["n_examples"]))
    return record


def build_table(study, settings, items):
    """The whole table as a JSON-ready dict (``settings``: dataset, epochs, milestones, seed,
    n_examples, budget, smoke, commit)."""
    table = {"study": study.name, "title": study.title, "settings": dict(settings, milestones=list(settings["milestones"])),
             "paper_schedule": {"epochs": recipe.EPOCHS, "milestones": list(recipe.MILESTONES)},
             "checkpoint": "best.pt", "reference_label": REFERENCE_LABEL,
             "rows": [row_record(item, settings) for item in items]}
    if getattr(study, "verdict", False):
        labels = {item.row.method_row: item.row.label for item in items}
        labels.update({item.row.name: item.row.seed_label for item in items})
        seeds = {item.row.name: (item.row.method_row, item.row.seed if item.row.seed is not None else settings["seed"])
                 for item in items}
        table["verdict"] = build_verdict({item.row.name: item.results for item in items}, seeds, labels)
        table["verdict_paragraph"] = verdict_paragraph(table["verdict"], labels, settings, recipe.EPOCHS)
    return table


def _line(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _paper_cells(record):
    paper = record["paper"]
    if paper is None:
        return ["not reported"] * len(COLUMNS)
    return [_pct_plain(paper["figures"].get(name)) for name in COLUMNS]


def _waiting(record, width):
    """Cells of a row without numbers: a short status once (a failure's reason is in the summary's
    status column), then dashes."""
    status = record["status"]
    short = "failed (reason below)" if status.startswith("failed") else status
    return [short] + ["—"] * (width - 1)


def _pct_plain(value):
    return "—" if value is None else f"{value:.2f}"


def _protocol_section(table):
    lines = ["## Paper protocol (accuracy %, ε = 8/255)", "",
             ("*ours* counts an example only if it is correct clean and at every point the attack queried; "
             "*ours, paper's count* is the paper's own count (the last iterate, over all examples). "
             "\"+p\": the attack also ascends the RA heads' loss (paper's \"with p\")."), "",
             _line(["row", "figures"] + [HEADINGS[c] for c in COLUMNS]), _line(["---"] * (len(COLUMNS) + 2))]
    for r in table["rows"]:
        source = f"{r['paper']['source']} ({r['paper']['dataset']})" if r["paper"] else "paper"
        lines.append(_line([r["label"], source] + _paper_cells(r)))
        if r["ours"] is None:
            lines.append(_line(["", "ours"] + _waiting(r, len(COLUMNS))))
            continue
        lines.append(_line(["", "ours"] + [r["ours"][c]["text"] for c in COLUMNS]))
        lines.append(_line(["", "ours, paper's count"] + [
            _pct(r["ours"][c]["last_iterate"]) if r["ours"][c]["last_iterate"] is not None else "—"
            for c in COLUMNS]))
    notes = sorted({r["paper"]["note"] for r in table["rows"] if r["paper"] and r["paper"]["note"]})
    return lines + ([""] + [f"Note: {n}." for n in notes] if notes else [])


def _reference_section(table):
    names = sorted({name for r in table["rows"] if r["reference"] for name in r["reference"]})
    lines = [f"## Reference protocol ({REFERENCE_LABEL})", ""]
    if not names:
        done = any(r["ours"] is not None for r in table["rows"])
        return lines + ["not run: this version of test_white_attack.py has no `reference` preset" if done
                        else "pending"]
    lines += [("The reference evaluation script's FGSM (random start) and C&W (margin summed over the batch) "
              "show how the paper's FGSM/C&W columns arose; they are not robustness figures."), "",
              _line(["row"] + names), _line(["---"] * (len(names) + 1))]
    for r in table["rows"]:
        if r["reference"] is None:
            lines.append(_line([r["label"]] + _waiting(r, len(names))))
        else:
            lines.append(_line([r["label"]] + [r["reference"].get(n, {}).get("text", "not run") for n in names]))
    return lines


def _batchnorm_cells(record):
    bn = record["batchnorm"]
    if bn == "n/a":
        return ["n/a", "n/a"]
    if bn is None:
        return ["—" if record["status"] != "done" else "pending"] * 2
    return [_pct(bn.get("eval")), _pct(bn.get("batch_stats"))]


def _summary_section(table):
    lines = ["## Worst case, checks and provenance", "",
             _line(["row", "status", "worst case % (attacks)", "sanity FLAGs", "BN eval-mode clean %",
                    "BN batch-stats clean %", "n", "epochs (milestones)", "seed", "run folder", "commit"]),
             _line(["---"] * 11)]
    for r in table["rows"]:
        worst = r["worst_case"]
        worst_text = "—" if worst is None else f"{_pct(worst['accuracy'])} ({worst['attacks']})"
        flags = "—" if r["flags"] is None else (", ".join(r["flags"]) or "none")
        schedule = f"{r['epochs']} ({' '.join(map(str, r['milestones']))})"
        lines.append(_line([r["label"], r["status"], worst_text, flags, *_batchnorm_cells(r), r["n_examples"],
                            schedule, r["seed"], f"`{r['run_dir']}`", (r["commit"] or "—")[:12]]))
    return lines


def _seeds_text(settings):
    seeds = settings.get("seeds") or [settings["seed"]]
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (one row per seed)"


def render_markdown(table):
    """table.md from :func:`build_table`'s dict."""
    s = table["settings"]
    paper = table["paper_schedule"]
    header = [f"# {table['study']}: {table['title']}", "",
              f"Ours: dataset {s['dataset']}, {s['epochs']} epochs with lr x0.1 after epochs "
              f"{' '.join(map(str, s['milestones']))} (the paper: {paper['epochs']} epochs, "
              f"{' '.join(map(str, paper['milestones']))}), {_seeds_text(s)}, {s['n_examples']} test examples, "
              f"attack budget {s['budget']}, checkpoint {table['checkpoint']}, code {s.get('commit', 'unknown')}."
              + (" Smoke run: synthetic data, tiny sizes; AutoAttack, APGD and Square not run." if s["smoke"] else ""),
              "", ("The BatchNorm columns (RA WideResNet / PreActResNet only) give clean accuracy with the running "
              "statistics (eval mode) and with each batch's own statistics: one final BatchNorm serves both RA "
              "blocks and the network's end."), ""]
    body = _protocol_section(table) + [""] + _reference_section(table) + [""] + _summary_section(table)
    if "verdict" in table:
        body = render_verdict(table) + [""] + body
    if table.get("timing"):
        body += [""] + timing_lines(table["timing"])
    return "\n".join(header + body) + "\n"


def render_figures_markdown(table):
    """table.md of the figures study: the models' status and which figures are drawn where."""
    s = table["settings"]
    lines = [f"# {table['study']}: feature figures", "",
             (f"Models of table1: dataset {s['dataset']}, {s['epochs']} epochs (milestones "
             f"{' '.join(map(str, s['milestones']))}), seed {s['seed']}, checkpoint best.pt, code {s['commit']}. "
             f"Figures in `{table['figures_dir']}`."), "", _line(["model", "status", "run folder"]),
             _line(["---"] * 3)]
    lines += [_line([r["row"], r["status"], f"`{r['run_dir']}`"]) for r in table["rows"]]
    lines += ["", _line(["figure", "status"]), _line(["---"] * 2)]
    lines += [_line([name, "done" if done else "pending"]) for name, done in table["figures"].items()]
    return "\n".join(lines) + "\n"
