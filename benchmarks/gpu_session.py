"""Everything a session with a lent GPU measures, in one time-boxed command (docs/reproduce.md#the-gpu-session).

Parts, each a subprocess with its own time box (a part that fails or runs out of time is
reported as such and the next one runs):

  (a) bench     benchmarks/train_step.py, eager and compiled, every method on ResNet-18 and WRN-34-10:
                images/s, ms per step, FLOPs of one step and the achieved fraction of the bf16 peak;
  (b) train     2 epochs of TRADES-ANCRA ResNet-18 on the real CIFAR-10, eager and compiled, same seed;
  (c) eval      test_white_attack.py --attacks all on 1,000 test images of the model trained in (b);
  (d) torchrun  one epoch of (b) as a one-process torchrun job.

Writes OUT_DIR/gpu_session.md (the tables, ready for BENCHMARKS.md), OUT_DIR/gpu_session.json,
one log per part under OUT_DIR/logs/ and the runs themselves; the markdown is rewritten after
every part, so a session cut short keeps what it measured.

    python benchmarks/gpu_session.py --data DATA/cifar10-jpeg.tar.gz --out-dir OUT
    python benchmarks/gpu_session.py --dry-run --out-dir /tmp/gpu-dry
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from utils.cli import (  # noqa: E402
    InertOptionError,
    OneLineArgumentParser,
    OnlyWith,
    explicit_options,
    finite_float,
    refuse_inert,
    run_cli,
)
from utils.evaluation.command import PARTIAL  # noqa: E402
from utils.evaluation.options import OutputError, check_output_dir  # noqa: E402

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PLAIN = ("pgd-at", "trades", "mart")
METHODS = PLAIN + tuple(f"{m}-ancra" for m in PLAIN)
ARCHS = ("resnet18", "wrn-34-10")
VARIANTS = ("eager", "compiled")
H100_H200_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM (NVIDIA's data sheets)
SESSION_FILE = "gpu_session.json"
PARTIAL_RESULTS = PARTIAL  # test_white_attack.py's record of the attacks finished so far
REPORT_FILE = "gpu_session.md"
# Shares of the time budget; a part that ends early leaves its time to the later ones.
SHARES = {"train-eager": 0.17, "eval": 0.18, "train-compiled": 0.20, "torchrun": 0.10, "bench": 0.30}
RESERVE_S = 15  # kept back for writing the report after the last part
GRACE_S = 10    # after SIGTERM, before SIGKILL


class SessionError(ValueError):
    """Bad input to the session script; the message says what to do."""


# ---------------------------------------------------------------- the plan: sizes of a real and a dry run

@dataclass
class Plan:
    """Every size the parts use: the real session's or the tiny CPU dry run's. (No string
    annotations: tests/test_docs.py loads this script without registering it as a module.)"""

    dry_run: bool
    device: str
    archs: tuple
    methods: tuple
    bench_batch: int
    bench_steps: int
    bench_warmup: int
    attack_steps: int
    bench_image_size: Optional[int]
    peak_tflops: Optional[float]
    train: list = field(default_factory=list)   # extra options of the training runs
    eval_attacks: str = "all"
    eval_budget: str = "full"
    eval_examples: int = 1000
    epochs: int = 2
    variants: tuple = VARIANTS


def make_plan(dry_run, variants=VARIANTS):
    """The real session's sizes, or the dry run's (CPU, tiny, every part still exercised)."""
    if dry_run:
        return Plan(True, "cpu", ("resnet18",), ("pgd-at", "trades-ancra"), bench_batch=2, bench_steps=1,
                    bench_warmup=0, attack_steps=1, bench_image_size=8, peak_tflops=None,
                    train=["--train-size", "8", "--batch-size", "8", "--eval-size", "4", "--eval-steps", "1",
                           "--attack-steps", "1"],
                    eval_attacks="fgsm,pgd10,aux1-pgd-ce", eval_budget="small", eval_examples=4,
                    variants=tuple(variants))
    return Plan(False, "cuda", ARCHS, METHODS, bench_batch=128, bench_steps=5, bench_warmup=2, attack_steps=10,
                bench_image_size=None, peak_tflops=H100_H200_BF16_TFLOPS, variants=tuple(variants))


def bench_groups(plan):
    """``[(arch, variant)]`` in run order: every eager group first (cheap), then the compiled ones."""
    return [(arch, variant) for variant in plan.variants for arch in plan.archs]


def bench_command(plan, arch, variant):
    """The train_step.py command of one (arch, variant) group: every method, one JSON line each."""
    command = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--device", plan.device, "--arch", arch,
               "--method", *plan.methods, "--batch-size", str(plan.bench_batch), "--steps", str(plan.bench_steps),
               "--warmup", str(plan.bench_warmup), "--attack-steps", str(plan.attack_steps), "--json",
               "--compile" if variant == "compiled" else "--no-compile"]
    if plan.bench_image_size:
        command += ["--image-size", str(plan.bench_image_size)]
    if plan.peak_tflops:
        command += ["--peak-tflops", f"{plan.peak_tflops:g}"]
    return command


def train_command(plan, data_dir, out_dir, run_name, variant, epochs=None, torchrun=False):
    """The TRADES-ANCRA ResNet-18 training on the real CIFAR-10 image folders at ``data_dir``."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return launcher + [str(ROOT / "train_CIFAR10_ResNet.py"), "--method", "trades", "--dataset", "cifar10",
                       "--data-dir", str(data_dir), "--epochs", str(epochs or plan.epochs), "--seed", "0",
                       "--device", plan.device, "--out-dir", str(out_dir), "--run-name", run_name, "--quiet",
                       "--compile" if variant == "compiled" else "--no-compile", *plan.train]


def eval_command(plan, ckpt, data_dir, out_dir):
    """test_white_attack.py on the trained model: the whole suite on ``plan.eval_examples`` test images."""
    return [sys.executable, str(ROOT / "test_white_attack.py"), "--ckpt", str(ckpt), "--attacks", plan.eval_attacks,
            "--budget", plan.eval_budget, "--n-examples", str(plan.eval_examples), "--dataset", "cifar10",
            "--data-dir", str(data_dir), "--device", plan.device, "--out-dir", str(out_dir), "--quiet"]


def part_order(variants):
    """The parts in run order: the first training, the evaluation of its model, the other
    training, torchrun, then the step benchmark."""
    trainings = [f"train-{v}" for v in variants]
    return trainings[:1] + ["eval"] + trainings[1:] + ["torchrun", "bench"]


def time_box(remaining, parts_left):
    """Seconds for the next part: its share of what is left, given the parts still to run."""
    shares = [SHARES[p] for p in parts_left]
    return max(1.0, (remaining - RESERVE_S) * shares[0] / sum(shares))


# ---------------------------------------------------------------- the data

def find_cifar_root(folder, depth=3):
    """The folder under ``folder`` (itself included, up to ``depth`` levels) holding ``train/`` and
    ``test/`` with the ten CIFAR-10 class folders; None when there is none."""
    folder = Path(folder)
    if all(sorted(p.name for p in (folder / split).glob("*") if p.is_dir()) == list(CLASSES)
           for split in ("train", "test")):
        return folder
    if depth == 0 or not folder.is_dir():
        return None
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = find_cifar_root(child, depth - 1)
        if found is not None:
            return found
    return None


def safe_members(archive):
    """The archive's members, refusing links, devices and paths that leave the folder."""
    members = archive.getmembers()
    for member in members:
        path = Path(member.name)
        if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
            raise SessionError(f"{archive.name}: refusing member {member.name!r} (absolute path, '..', link or "
                               f"device); pass a plain archive of image folders")
    return members


def unpack(archive_path, target):
    """Unpack ``archive_path`` under ``target`` (reused when it already holds the data); returns the CIFAR root."""
    found = find_cifar_root(target) if Path(target).is_dir() else None
    if found is not None:
        return found
    Path(target).mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path) as archive:
        members = safe_members(archive)
        if hasattr(tarfile, "data_filter"):
            archive.extractall(target, members=members, filter="data")
        else:  # Python < 3.11.4: the members were checked above
            archive.extractall(target, members=members)
    found = find_cifar_root(target)
    if found is None:
        raise SessionError(f"{archive_path} holds no train/<class>/ and test/<class>/ folders of the ten CIFAR-10 "
                           f"classes ({', '.join(CLASSES)})")
    return found


def check_data(path):
    """Refuse, before any work, a --data that is neither a CIFAR-10 image folder nor a .tar.gz."""
    path = Path(path)
    if not path.exists():
        raise SessionError(f"{path} not found; pass the folder where cifar10-jpeg.tar.gz was unpacked, or the archive")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise SessionError(f"{path} is not a tar archive; pass cifar10-jpeg.tar.gz or the unpacked folder")
        with tarfile.open(path) as archive:
            safe_members(archive)
        return path
    if find_cifar_root(path) is None:
        raise SessionError(f"{path} holds no train/<class>/ and test/<class>/ folders of the ten CIFAR-10 classes "
                           f"({', '.join(CLASSES)}); pass the unpacked cifar10-jpeg folder")
    return path


def write_dry_data(folder, per_class=(1, 1), size=32):
    """A tiny CIFAR-10 image folder of random JPEGs (``per_class`` train, test images per class)
    and its .tar.gz beside it, so the dry run goes through the archive path too."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tree = Path(folder) / "cifar10-jpeg"
    for split, count in zip(("train", "test"), per_class):
        for name in CLASSES:
            (tree / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(image).save(tree / split / name / f"{i:04d}.jpg")
    archive = Path(folder) / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpeg")
    return archive


# ---------------------------------------------------------------- running one part

@dataclass
class PartRun:
    """How one subprocess ended: ``status`` ok / failed (exit code) / timed out, its seconds and log."""

    name: str
    command: list
    status: str
    seconds: float
    log: str
    box_s: float


def run_part(name, command, box_s, log_path, env=None):
    """Run ``command`` with its output in ``log_path``, stopping its process group after ``box_s``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                   env=dict(os.environ, **(env or {})))
        try:
            code = process.wait(timeout=box_s)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {box_s:.0f} s"
            _stop(process)
        except BaseException:  # the session itself is stopped: stop the part too
            _stop(process)
            raise
    return PartRun(name, command, status, time.perf_counter() - start, str(log_path), box_s)


def _stop(process):
    """SIGTERM to the part's process group (the training scripts stop cleanly on it), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------- reading what the parts wrote

def read_json_lines(path):
    """JSON objects of the lines of ``path`` that hold one (other lines are skipped)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def checkpoint_of(run_dir):
    """best.pt of a training run, else last.pt (a run stopped by its time box), else None."""
    for name in ("best.pt", "last.pt"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


# ---------------------------------------------------------------- markdown

def _cell(value, fmt="{:.1f}"):
    return "—" if value is None else fmt.format(value)


def _percent(value):
    return "—" if value is None else f"{100 * value:.1f} %"


def bench_table(rows, runs, plan):
    """(a): one row per arch × method × variant, with the runs that produced no row named."""
    peak = next((r["bf16_peak_tflops"] for r in rows), plan.peak_tflops)
    source = next((r.get("peak_source") for r in rows), "nominal" if plan.peak_tflops else "measured")
    lines = [f"Batch {plan.bench_batch}, {plan.attack_steps}-step training attacks, synthetic data after "
             f"{plan.bench_warmup} warm-up steps, median of {plan.bench_steps} timed steps. Peak used: "
             f"{_cell(peak, '{:g}')} TFLOP/s bf16 ({source}). FLOPs: one eager training step, counted with torch's "
             f"formulas (benchmarks/train_step.py).", "",
             "| arch | method | variant | images/s | ms/step | GFLOP/step | TFLOP/s | of bf16 peak |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    found = {(r["arch"], r["method"], "compiled" if r["compile"] else "eager"): r for r in rows}
    status = {(run.name.split(":")[1], run.name.split(":")[2]): run.status for run in runs}
    for variant in plan.variants:
        for arch in plan.archs:
            for method in plan.methods:
                row = found.get((arch, method, variant))
                if row is None:
                    why = status.get((arch, variant), "not run (no time left)")
                    lines.append(f"| {arch} | {method} | {variant} | {why} | | | | |")
                    continue
                lines.append(f"| {arch} | {method} | {variant} | {row['images_per_s']:.1f} | {row['step_ms']:.1f} "
                             f"| {row['gflop_per_step']:.1f} | {row['tflops']:.1f} | {_percent(row['peak_fraction'])} |")
    return lines


def attack_label(records):
    """The per-epoch attack's name the runs recorded (``PGD-20`` for the recipe's check)."""
    return next((r["eval_attack"] for recs in records for r in recs if r.get("eval_attack")), "PGD-20")


def train_table(records, runs, variants=VARIANTS):
    """(b): per epoch, clean and PGD accuracy and seconds of the eager and the compiled run."""
    pgd = attack_label(records.values())
    lines = ["| epoch | " + " | ".join(f"{v} clean | {v} {pgd} | {v} s" for v in variants) + " |",
             "|---:|" + "---:|---:|---:|" * len(variants)]
    epochs = sorted({r["epoch"] for recs in records.values() for r in recs})
    by_epoch = {v: {r["epoch"]: r for r in records.get(v, [])} for v in variants}
    for epoch in epochs:
        cells = []
        for variant in variants:
            r = by_epoch[variant].get(epoch)
            test = (r or {}).get("test", {})
            cells += [_percent(test.get("nat")), _percent(test.get("pgd")), _cell((r or {}).get("seconds"))]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    if not epochs:
        lines.append("| — | no epoch finished |" + " |" * (3 * len(variants) - 1))
    lines += [""] + [f"- {run.name}: {run.status}, {run.seconds:.0f} s wall (time box {run.box_s:.0f} s)"
                     for run in runs]
    return lines


def stage_rows(attacks):
    """One table row per attack in run order: what it received, broke and took."""
    lines = ["| stage | attack | received | broke | seconds |", "|---:|---|---:|---:|---:|"]
    for order, attack in enumerate(attacks, 1):
        where = " (full set)" if attack.get("standalone") else ""
        lines.append(f"| {order} | {attack['name']}{where} | {attack.get('received_count')} "
                     f"| {attack.get('broken_count')} | {attack['seconds']:.1f} |")
    return lines


def eval_table(results, run, plan):
    """(c): the whole suite on the trained model: wall time and what each cascade stage received and broke."""
    if results is None:
        return [f"No results ({run.status if run else 'not run'})."]
    if results.get("status") == "partial":
        seconds = sum(a["seconds"] for a in results["attacks"])
        return [f"**Partial** ({run.status if run else 'stopped'}): the {len(results['attacks'])} attacks that "
                f"finished took {seconds:.1f} s (`{PARTIAL_RESULTS}`); no worst case.", ""] + stage_rows(results["attacks"])
    meta = results.get("meta", {})
    worst = results.get("worst_case", {})
    attack_s = results["clean"]["seconds"] + sum(a["seconds"] for a in results["attacks"])
    lines = [f"`--attacks {plan.eval_attacks} --budget {plan.eval_budget}` on {len(results['labels'])} test images; "
             f"batch {meta.get('batch_size')} ({meta.get('batch_size_note')}); attack dtype "
             f"{meta.get('attack_dtype')}. Process wall {run.seconds:.1f} s, clean pass and attacks {attack_s:.1f} s; "
             f"clean {_percent(results['clean']['accuracy'])}, worst case {_percent(worst.get('accuracy'))}.", ""]
    return lines + stage_rows(results["attacks"])


def torchrun_table(records, run):
    """(d): the one-process torchrun epoch."""
    if not records:
        return [f"No epoch finished ({run.status if run else 'not run'})."]
    r = records[-1]
    return [f"| epoch | clean | {attack_label([records])} | seconds | status |", "|---:|---:|---:|---:|---|",
            f"| {r['epoch']} | {_percent(r['test']['nat'])} | {_percent(r['test']['pgd'])} | {r['seconds']:.1f} "
            f"| {run.status} |"]


def header(session):
    """Who, what and when: the GPU, torch, date, commit and the command."""
    dry = " (dry run: tiny CPU sizes, synthetic data; not a measurement)" if session["dry_run"] else ""
    return [f"Device: {session['device_name']}; torch {session['torch']}; {session['date']}; commit "
            f"{session['commit']}.", f"Command: `{session['command']}`{dry}",
            f"Budget {session['budget_s']:.0f} s; the parts took {session.get('elapsed_s', 0):.0f} s."]


def render(session, plan):
    """The whole markdown page from the session record."""
    runs = {run.name: run for run in session["runs"]}
    bench_runs = [run for name, run in runs.items() if name.startswith("bench:")]
    lines = ["## GPU session", ""] + header(session) + [""]
    lines += ["### (a) Training step, eager against compiled", ""] + bench_table(session["bench"], bench_runs, plan)
    lines += ["", f"### (b) {plan.epochs}-epoch TRADES-ANCRA ResNet-18 on CIFAR-10, eager against compiled "
              "(seed 0)", ""]
    lines += train_table(session["train"], [runs[n] for n in ("train-eager", "train-compiled") if n in runs],
                         plan.variants)
    lines += ["", "### (c) Evaluation of the trained model", ""]
    if session.get("eval_ckpt"):
        lines += [f"Checkpoint: {session['eval_ckpt']}.", ""]
    lines += eval_table(session.get("eval"), runs.get("eval"), plan)
    lines += ["", "### (d) One-process torchrun", ""] + torchrun_table(session.get("torchrun"), runs.get("torchrun"))
    failed = [f"{run.name}: {run.status} (log: {run.log})" for run in session["runs"] if run.status != "ok"]
    if failed:
        lines += ["", "### Parts that did not finish", ""] + [f"- {line}" for line in failed]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the session

def describe_machine(device):
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return name, torch.__version__


def git_commit():
    """HEAD's commit, with ``+changes`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


class Session:
    """Runs the parts in order within the budget and keeps the record and the markdown current."""

    def __init__(self, args, plan, data_dir):
        self.args, self.plan, self.data_dir = args, plan, data_dir
        self.out = Path(args.out_dir)
        self.started = args.started
        self.deadline = self.started + args.budget_s
        name, version = describe_machine(plan.device)
        self.record = {"device_name": name, "torch": version, "date": datetime.now(timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"), "commit": git_commit(), "command": shlex.join([sys.executable, *sys.argv]),
            "dry_run": plan.dry_run, "budget_s": args.budget_s, "data_dir": str(data_dir), "runs": [], "bench": [],
            "train": {}, "eval": None, "eval_ckpt": None, "torchrun": None}

    def remaining(self):
        return self.deadline - time.monotonic()

    def run(self, name, command, parts_left, box=None):
        box = box or time_box(self.remaining(), parts_left)
        if self.remaining() - RESERVE_S < 1:
            run = PartRun(name, command, "not run (no time left)", 0.0, "", 0.0)
        else:
            print(f"[gpu_session] {name}: up to {box:.0f} s", flush=True)
            run = run_part(name, command, box, self.out / "logs" / f"{name.replace(':', '_')}.log")
            print(f"[gpu_session] {name}: {run.status} in {run.seconds:.0f} s", flush=True)
        self.record["runs"].append(run)
        self.save()
        return run

    def save(self):
        self.record["elapsed_s"] = time.monotonic() - self.started
        atomic_write_text(self.out / REPORT_FILE, render(self.record, self.plan))
        atomic_write_json(self.out / SESSION_FILE, dict(self.record, runs=[vars(r) for r in self.record["runs"]]))

    def train(self, variant, parts_left):
        command = train_command(self.plan, self.data_dir, self.out / "train", variant, variant)
        self.run(f"train-{variant}", command, parts_left)
        self.record["train"][variant] = read_json_lines(self.out / "train" / variant / "metrics.jsonl")

    def evaluate(self, parts_left):
        ckpt = next(filter(None, (checkpoint_of(self.out / "train" / v) for v in VARIANTS)), None)
        if ckpt is None:
            self.record["runs"].append(PartRun("eval", [], "not run (no trained checkpoint)", 0.0, "", 0.0))
            return self.save()
        self.record["eval_ckpt"] = str(ckpt.relative_to(self.out))
        run = self.run("eval", eval_command(self.plan, ckpt, self.data_dir, self.out / "eval"), parts_left)
        results, partial = self.out / "eval" / "results.json", self.out / "eval" / PARTIAL_RESULTS
        if run.status == "ok" and results.is_file():
            self.record["eval"] = json.loads(results.read_text())
        elif partial.is_file():  # stopped by its time box: the attacks that finished
            self.record["eval"] = json.loads(partial.read_text())

    def torchrun(self, parts_left):
        command = train_command(self.plan, self.data_dir, self.out / "torchrun", "one-process", "eager", epochs=1,
                                torchrun=True)
        self.run("torchrun", command, parts_left)
        self.record["torchrun"] = read_json_lines(self.out / "torchrun" / "one-process" / "metrics.jsonl")

    def bench(self):
        groups = bench_groups(self.plan)
        for i, (arch, variant) in enumerate(groups):
            box = time_box(self.remaining(), ["bench"]) / (len(groups) - i)
            name = f"bench:{arch}:{variant}"
            run = self.run(name, bench_command(self.plan, arch, variant), ["bench"], box=box)
            if run.log:
                self.record["bench"] += read_json_lines(run.log)
            self.save()

    def all(self):
        order = part_order(self.plan.variants)
        for part in order:
            left = order[order.index(part):]
            if part.startswith("train-"):
                self.train(part[6:], left)
            elif part == "eval":
                self.evaluate(left)
            elif part == "torchrun":
                self.torchrun(left)
            else:
                self.bench()
        self.save()
        return self.record


# ---------------------------------------------------------------- command line

def build_parser():
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 image folders: the folder cifar10-jpeg.tar.gz was unpacked into, or the archive "
                             "itself (unpacked under --unpack-dir); not with --dry-run")
    parser.add_argument("--out-dir", required=True, help="where the tables, logs and runs go (a new folder)")
    parser.add_argument("--budget-s", type=finite_float, default=540.0,
                        help="seconds for all parts together; each part gets a share of what is left")
    parser.add_argument("--unpack-dir", default="/tmp/gpu_session_data",
                        help="where an archive given to --data is unpacked (reused when it already holds the data)")
    parser.add_argument("--variants", default="eager,compiled",
                        help="training variants of parts (a) and (b): eager and/or compiled (torch.compile)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes, a synthetic image folder: exercises every part in a few minutes")
    return parser


# Options that would change nothing (utils.cli.refuse_inert), kept as data.
INERT_RULES = (
    OnlyWith(("unpack_dir",), lambda a: a.data is not None and Path(a.data).is_file(),
             lambda a: "--dry-run unpacks its synthetic archive inside --out-dir" if a.dry_run else
             "--unpack-dir is where an archive given to --data is unpacked, and --data is a folder"),
)


def parse_args(argv=None):
    """Parse and check everything before any work: data, output folder, budget, device."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        refuse_inert(INERT_RULES, args, explicit_options(parser, argv))
        validate(args)
    except (SessionError, OutputError, InertOptionError) as err:
        parser.error(str(err))
    return args


def validate(args):
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or set(variants) - set(VARIANTS):
        raise SessionError(f"--variants takes eager and/or compiled (comma-separated), got {args.variants!r}")
    args.variants = tuple(v for v in VARIANTS if v in variants)
    if args.budget_s < 2 * RESERVE_S:
        raise SessionError(f"--budget-s must be at least {2 * RESERVE_S} s, got {args.budget_s:g}")
    if args.dry_run == (args.data is not None):
        raise SessionError("pass --data PATH (the CIFAR-10 image folders or cifar10-jpeg.tar.gz) or --dry-run, "
                           "not both and not neither")
    check_output_dir(args.out_dir)
    if args.data is not None:
        check_data(args.data)
        if Path(args.data).is_file():
            check_output_dir(args.unpack_dir)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SessionError("no CUDA device here; run on a GPU machine, or pass --dry-run for the CPU rehearsal")


def prepare_data(args, out_dir):
    """The CIFAR-10 root the training and evaluation read: found in --data, unpacked from it, or
    (dry run) a synthetic JPEG folder packed and unpacked the same way."""
    source = write_dry_data(out_dir / "dry-data") if args.dry_run else Path(args.data)
    if source.is_file():
        target = out_dir / "dry-data" / "unpacked" if args.dry_run else Path(args.unpack_dir)
        return unpack(source, target)
    return find_cifar_root(source)


def _stop_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run(args):
    args.started = time.monotonic()  # the budget covers unpacking the data too
    out_dir = Path(args.out_dir)
    if (out_dir / SESSION_FILE).exists():  # checked before anything is written, as parse_args' checks
        raise SessionError(f"{out_dir} already holds a GPU session ({SESSION_FILE}); pass a new --out-dir")
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # so the running part's process group stops too
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = make_plan(args.dry_run, args.variants)
        record = Session(args, plan, prepare_data(args, out_dir)).all()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(render(record, plan))
    print(f"[gpu_session] wrote {out_dir / REPORT_FILE} and {out_dir / SESSION_FILE}")
    return 0


def main(argv=None):
    return run_cli(run, parse_args, (SessionError, OutputError), argv)


if __name__ == "__main__":
    sys.exit(main())
