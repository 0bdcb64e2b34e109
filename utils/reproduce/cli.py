"""reproduce.py's library side: check the options, build the plan, run the study."""
import os
import sys
from pathlib import Path

import torch

from utils import data, recipe
from utils.cli import OnlyWith, refuse_inert
from utils.evaluation.options import check_output_dir
from utils.reproduce.plan import SMOKE_EXAMPLES, Plan
from utils.reproduce.runner import StudyRun
from utils.reproduce.schedule import device_slots
from utils.reproduce.studies import (
    STUDIES,
    describe_studies,
    parse_seeds,
    scale_milestones,
    seeded_rows,
    select_rows,
)
from utils.reproduce.verdict import RESULTS_HEADER, record_refusal
from utils.reproduce.verdict_run import run_verdict
from utils.training.cli import SMOKE_DEFAULTS


def schedule(args):
    """``(epochs, milestones)``: the paper's, the study's own shortened default, the smoke runs', or
    ``--epochs`` with scaled milestones."""
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError("--epochs must be at least 1")
        return args.epochs, scale_milestones(args.epochs)
    default = None if args.smoke else getattr(STUDIES.get(args.study), "default_epochs", None)
    if default is not None:
        return default, scale_milestones(default)
    if args.smoke:
        return SMOKE_DEFAULTS["epochs"], tuple(SMOKE_DEFAULTS["milestones"])
    return recipe.EPOCHS, tuple(recipe.MILESTONES)


def _dataset(args):
    study = STUDIES.get(args.study)
    return args.dataset or ("synthetic" if args.smoke else getattr(study, "dataset", None))


def _gpus_named(args):
    return bool([g for g in (args.gpus or "").split(",") if g.strip()])


# Options that would change nothing in this invocation (utils.cli.refuse_inert): rules kept as data.
# With --list every other option is idle: that rule is made from the options given (check_inert_options).
LIST_ONLY = "--list only prints the studies and their rows"
INERT_RULES = (
    OnlyWith(("time_budget", "record"), lambda a: getattr(STUDIES.get(a.study), "verdict", False),
             "--time-budget and --record belong to the verdict study (python reproduce.py verdict)"),
    OnlyWith(("gpus",), _gpus_named, "it names no GPU; leave out --gpus to run on the default device"),
    OnlyWith(("data_dir",), lambda a: _dataset(a) != "synthetic",
             "synthetic data are generated in memory, never read from a folder"),
)


def check_inert_options(args):
    """Refuse, in one sentence, an option written on the command line that would change nothing."""
    given = set(getattr(args, "given_options", ()))
    listing = OnlyWith(tuple(sorted(given - {"list"})), lambda a: not a.list, LIST_ONLY)
    refuse_inert((listing, *INERT_RULES), args, given)


def is_record_file(path):
    """Whether ``path`` is a file of recorded verdicts (--record's own earlier output): it starts
    with RESULTS.md's heading."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\n") == RESULTS_HEADER.splitlines()[0]
    except (OSError, UnicodeDecodeError):
        return False


def check_record_path(record):
    """Refuse, before the study runs, a ``--record`` path that could not take the verdict: a folder,
    a missing or unwritable folder, or an existing file that is not an earlier --record file. A
    symlink is judged by its target (the verdict is written through it)."""
    target = Path(os.path.realpath(record))
    if target.is_dir():
        raise ValueError(f"--record {record} is a folder; give a file such as RESULTS.md")
    if not target.parent.is_dir():
        raise ValueError(f"--record {record} must be a file in an existing folder")
    if target.exists() and not is_record_file(target):
        raise ValueError(f"--record {record} exists and is not a file of recorded verdicts (its first line is not "
                         f"{RESULTS_HEADER.splitlines()[0]!r}); give a new file or an earlier --record file")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise ValueError(f"--record {record}: the folder {target.parent} is not writable; make it writable or record "
                         f"into another folder")


def check_verdict_options(args, plan):
    """Refuse ``--time-budget`` and ``--record`` values that cannot apply (nothing is created yet)."""
    time_budget, record = getattr(args, "time_budget", None), getattr(args, "record", None)
    if (time_budget is not None or record) and not plan.study.verdict:
        raise ValueError("--time-budget and --record belong to the verdict study (python reproduce.py verdict)")
    if time_budget is not None and time_budget <= 0:
        raise ValueError("--time-budget takes a number of seconds above 0")
    if record:
        refusal = record_refusal(plan.smoke, plan.dataset, torch.cuda.is_available())
        if refusal:
            raise ValueError(refusal)
        check_record_path(record)


def check_dataset(dataset):
    """Refuse a dataset that is not registered (every training script takes every registered one)."""
    if dataset not in data.DATASETS:
        raise ValueError(f"--dataset {dataset} is not a registered dataset; use one of {', '.join(data.DATASETS)}")


def check_gpus(slots):
    """Refuse GPU indices this machine does not have."""
    if None in slots:
        return
    highest = max(int(g) for slot in slots for g in slot.split(","))
    if highest >= torch.cuda.device_count():
        raise ValueError(f"--gpus names GPU {highest} but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s); leave out --gpus to run on the default device")


def make_plan(args):
    """The :class:`Plan` for parsed arguments; a bad option raises ValueError before anything is created."""
    if args.study is None:
        raise ValueError("name a study (or pass --list to see them)")
    study = STUDIES[args.study]
    seeds = parse_seeds(args.seeds)
    if len(seeds) > 1 and not study.evaluate:
        raise ValueError(f"the {study.name} study draws its figures from one trained model per row; give one seed")
    rows = seeded_rows(select_rows(study, args.only), seeds)
    if args.smoke and args.dataset not in (None, "synthetic"):
        raise ValueError("--smoke trains and evaluates on synthetic data; drop --dataset, or drop --smoke to use "
                         f"{args.dataset}")
    dataset = args.dataset or ("synthetic" if args.smoke else study.dataset)
    check_dataset(dataset)
    epochs, milestones = schedule(args)
    n_examples = args.n_examples if args.n_examples is not None else (SMOKE_EXAMPLES if args.smoke else 1000)
    if n_examples < 1:
        raise ValueError("--n-examples must be at least 1")
    # a study's default concurrency applies to the default device; with --gpus each GPU takes one row
    # unless --rows-per-gpu says otherwise
    default_rows = study.rows_per_device if args.gpus is None else 1
    rows_per_gpu = args.rows_per_gpu if args.rows_per_gpu is not None else default_rows
    slots = device_slots(args.gpus, args.nproc_per_row, rows_per_gpu)
    check_gpus(slots)
    out_dir = Path(args.out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a folder")
    check_output_dir(out_dir / study.name)  # a folder that cannot be created or written: refused before any work
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    return Plan(study, rows, out_dir, dataset, epochs, milestones, n_examples, seeds[0], args.smoke, data_dir,
                slots, args.nproc_per_row, seeds if len(seeds) > 1 else ())


def main(args, command=None):
    """Run reproduce.py's parsed ``args`` (``command``: the command line, for --record); returns the exit code."""
    try:
        check_inert_options(args)
        if args.list:
            print(describe_studies())
            return 0
        plan = make_plan(args)
        check_verdict_options(args, plan)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.study.verdict:
        return run_verdict(plan, args, command or ["python", "reproduce.py"])
    print(f"{plan.study.name}: {len(plan.rows)} rows, {plan.dataset}, {plan.schedule_text()}, "
          f"{plan.n_examples} test examples ({plan.budget} budget), out {plan.study_dir}", flush=True)
    return StudyRun(plan).run()
