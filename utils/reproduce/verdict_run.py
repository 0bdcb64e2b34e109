"""Running the verdict study (docs/reproduce.md, "The verdict"): the time budget's probe and plan,
the rows through the study runner, the time per phase from the rows' files, and --record."""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

import torch

from utils.checkpoint import atomic_write_json, atomic_write_text, read_metrics
from utils.reproduce.runner import StudyRun
from utils.reproduce.state import finished_results, read_json
from utils.reproduce.studies import scale_milestones
from utils.reproduce.table import render_markdown
from utils.reproduce.verdict import (
    EVAL_SAFETY,
    MARGIN,
    PROBE_EXAMPLES,
    PROBE_FRACTION,
    SMOKE_PROBE_FRACTION,
    TABLE_RESERVE,
    TRAIN_IMAGES,
    BudgetError,
    append_record,
    budget_text,
    choose_schedule,
    timing_lines,
)
from utils.training.cli import SMOKE_DEFAULTS


def phase_times(plan):
    """Seconds per phase from the rows' own files: training (the sum of metrics.jsonl's epoch seconds),
    evaluation (results.json's), the mean epoch; rows run side by side, so a phase's wall time is
    about its slowest row's."""
    rows = {}
    for row in plan.rows:
        epochs = [r.get("seconds") for r in read_metrics(plan.run_dir(row), plan.epochs) if r.get("seconds")]
        results = finished_results(plan.eval_dir(row))
        rows[row.name] = {"train_seconds": sum(epochs) if epochs else None,
                          "epoch_seconds": sum(epochs) / len(epochs) if epochs else None, "epochs_timed": len(epochs),
                          "evaluate_seconds": (results or {}).get("meta", {}).get("seconds")}

    def slowest(key):
        values = [r[key] for r in rows.values() if r[key] is not None]
        return max(values) if values else None
    return {"rows": rows, "train_seconds": slowest("train_seconds"), "epoch_seconds": slowest("epoch_seconds"),
            "evaluate_seconds": slowest("evaluate_seconds")}


def finish(plan, study_run, started, budget=None, clock=None):
    """After the study: measure the table phase, add the time per phase (and the time budget's
    decisions) to table.json and table.md, print them; returns the timing dict."""
    clock = clock or time.perf_counter
    table_started = clock()
    study_run.write_table()
    timing = dict(phase_times(plan), table_seconds=clock() - table_started, invocation_seconds=clock() - started,
                  budget=budget)
    table_file = plan.study_dir / "table.json"
    table = json.loads(table_file.read_text())
    table["timing"] = timing
    atomic_write_json(table_file, table)
    atomic_write_text(plan.study_dir / "table.md", render_markdown(table))
    for line in timing_lines(timing)[2:]:
        if line:
            study_run.echo(line)
    return timing


def probe_fraction(plan):
    """The probe trains on 1/this of the training set."""
    return SMOKE_PROBE_FRACTION if plan.smoke else PROBE_FRACTION


def probe_plan(plan):
    """One epoch of every row on 1/probe_fraction of the training set, side by side like the real
    rows, then a small evaluation, in OUT/verdict/probe/ (never mixed with the real runs)."""
    full = SMOKE_DEFAULTS["train_size"] if plan.smoke else TRAIN_IMAGES[plan.dataset]
    eval_size = SMOKE_DEFAULTS["eval_size"] if plan.smoke else 1000
    fraction = probe_fraction(plan)
    extra = ("--train-size", str(max(1, full // fraction)), "--eval-size", str(max(1, eval_size // fraction)))
    rows = tuple(replace(row, options=row.options + extra) for row in plan.rows)
    study = replace(plan.study, rows=rows, verdict=False)
    return replace(plan, study=study, rows=rows, out_dir=plan.study_dir / "probe", epochs=1,
                   milestones=scale_milestones(1), n_examples=PROBE_EXAMPLES[plan.smoke])


def measure_probe(probe, wall_seconds, fraction=PROBE_FRACTION):
    """``{"epoch_seconds", "example_seconds", "overhead_seconds"}`` of a finished probe: the slowest
    row's epoch scaled to the whole training set, its evaluation per example (times EVAL_SAFETY),
    both times the waves of rows the device slots need (one when every row has its own slot), and
    what the probe's wall time spent outside them (process start, data loading)."""
    times = phase_times(probe)
    if times["epoch_seconds"] is None or times["evaluate_seconds"] is None:
        raise BudgetError(f"the probe in {probe.study_dir} did not finish; see its table.md")
    waves = math.ceil(len(probe.rows) / len(probe.slots))
    overhead = max(0.0, wall_seconds - waves * (times["epoch_seconds"] + times["evaluate_seconds"]))
    return {"epoch_seconds": waves * times["epoch_seconds"] * fraction,
            "example_seconds": waves * EVAL_SAFETY * times["evaluate_seconds"] / probe.n_examples,
            "overhead_seconds": overhead, "probe_seconds": wall_seconds, "waves": waves}


def plan_within_budget(plan, seconds, started, run_study, clock, echo=print):
    """The plan the time budget allows: read from OUT/verdict/budget.json when an earlier invocation
    decided it for the same request (a rerun continues, it does not replan), else measured by a probe
    (``run_study(plan) -> exit code``) and saved. Returns ``(plan, budget record)``."""
    requested = {"epochs": plan.epochs, "n_examples": plan.n_examples}
    key = {"seconds": seconds, "requested": requested, "dataset": plan.dataset, "seed": plan.seed, "smoke": plan.smoke,
           "rows": [r.name for r in plan.rows]}
    path = plan.study_dir / "budget.json"
    saved = read_json(path)
    if not (isinstance(saved, dict) and all(saved.get(k) == v for k, v in key.items())):
        probe = probe_plan(plan)
        echo(f"time budget {seconds:.0f} s: probing one epoch on 1/{probe_fraction(plan)} of the training data and "
             f"{probe.n_examples} test examples (in {probe.study_dir})")
        probe_started = clock()
        code = run_study(probe)
        if code != 0:
            raise BudgetError(f"the probe stopped or failed (exit code {code}); rerun the same command to continue it")
        measured = measure_probe(probe, clock() - probe_started, probe_fraction(plan))
        usable = MARGIN * (seconds - (clock() - started) - TABLE_RESERVE)
        epochs, n = choose_schedule(usable, measured, plan.epochs, plan.n_examples)
        saved = dict(key, measured=measured, chosen={"epochs": epochs, "n_examples": n})
        plan.study_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, saved)
    chosen = saved["chosen"]
    echo(budget_text(saved))
    milestones = plan.milestones if chosen["epochs"] == plan.epochs else scale_milestones(chosen["epochs"])
    return replace(plan, epochs=chosen["epochs"], milestones=milestones, n_examples=chosen["n_examples"]), saved


def run_verdict(plan, args, command, clock=None, echo=print, make_run=None):
    """``reproduce.py verdict``: (with --time-budget) probe and plan, train and evaluate the rows side by
    side, write the table with the verdict and the time per phase, (with --record) append it to
    RESULTS.md. Returns the exit code."""
    clock = clock or time.perf_counter
    make_run = make_run or StudyRun
    started = clock()
    budget = None
    if getattr(args, "time_budget", None):
        try:
            plan, budget = plan_within_budget(plan, args.time_budget, started, lambda p: make_run(p).run(), clock, echo)
        except BudgetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    echo(f"{plan.study.name}: {len(plan.rows)} rows, {len(plan.slots)} at a time, {plan.dataset}, "
         f"{plan.schedule_text()}, {plan.n_examples} test examples ({plan.budget} budget), out {plan.study_dir}")
    run = make_run(plan)
    code = run.run()
    finish(plan, run, started, budget, clock)
    if code != 0 or not getattr(args, "record", None):
        if getattr(args, "record", None):
            echo(f"not recorded in {args.record}: the verdict did not finish (exit code {code})")
        return code
    table = json.loads((plan.study_dir / "table.json").read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        echo(append_record(args.record, table, gpu, shlex.join(command), date))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # checked writable up front; a disk filled or a mode changed since: one line
        print(f"error: cannot write {args.record} ({err.strerror or err}); the verdict is in "
              f"{plan.study_dir / 'table.md'}: rerun the same command to record it", file=sys.stderr)
        return 2
    return 0

