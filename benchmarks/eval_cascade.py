"""Time ``test_white_attack.py`` on one checkpoint with and without the cascade, check that both
give the same per-example worst case, and print what each cascade stage received and broke.

Each mode runs as its own ``test_white_attack.py`` process writing to ``OUT_DIR/cascade`` and
``OUT_DIR/no-cascade``; a mode whose folder already holds a finished run is read back, an
interrupted one is resumed (``--resume``), so the benchmark can be stopped and restarted.
``--parallel`` runs both modes at once with one thread each, so that they see the same load.
"wall" is the time of the process that finished a mode (an earlier, interrupted try is not in
it); "attack time" sums the clean pass and the per-attack seconds of ``results.json``, which a
resume keeps, so it covers every try.

    python benchmarks/eval_cascade.py --ckpt RUN/best.pt --n-examples 200 --budget small --out-dir /tmp/cascade
    python benchmarks/eval_cascade.py --ckpt RUN/best.pt --out-dir /tmp/cascade --parallel -- --device cuda
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.checkpoint import atomic_write_json  # noqa: E402
from utils.cli import (  # noqa: E402
    InertOptionError,
    OneLineArgumentParser,
    OnlyWith,
    explicit_options,
    positive_int,
    refuse_inert,
)
from utils.evaluation.options import OutputError, check_output_dir  # noqa: E402

MODES = {"cascade": "--cascade", "no-cascade": "--no-cascade"}
TIMING = "benchmark_timing.json"


class RunFailed(RuntimeError):
    """A mode's test_white_attack.py process exited with an error."""


# Options that would change nothing (utils.cli.refuse_inert), kept as data.
INERT_RULES = (
    OnlyWith(("parallel",), lambda a: len(a.modes) > 1, "--parallel runs the modes side by side and --modes names one"),
)


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint to evaluate")
    parser.add_argument("--out-dir", required=True, help="benchmark folder (one sub-folder per mode)")
    parser.add_argument("--attacks", default="all", help="--attacks of test_white_attack.py")
    parser.add_argument("--n-examples", type=positive_int, default=200)
    parser.add_argument("--budget", choices=("full", "small"), default="small")
    parser.add_argument("--modes", default="cascade,no-cascade", help="comma-separated: cascade, no-cascade")
    parser.add_argument("--parallel", action="store_true",
                        help="run the modes at the same time, OMP_NUM_THREADS=1 each (same load for both)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("extra", nargs="*", help="after --: more test_white_attack.py options (same for both modes)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes takes cascade and/or no-cascade, got {args.modes!r}")
    args.modes = modes
    try:
        refuse_inert(INERT_RULES, args, explicit_options(parser, argv))
    except InertOptionError as err:
        parser.error(str(err))
    if not Path(args.ckpt).is_file():
        parser.error(f"checkpoint {args.ckpt} not found; pass the .pt file of a training run")
    try:
        check_output_dir(args.out_dir)
    except OutputError as err:
        parser.error(str(err))
    for mode in modes:
        saved = Path(args.out_dir) / mode / TIMING
        if saved.exists() and json.loads(saved.read_text()).get("settings") != settings(args):
            parser.error(f"{saved.parent} holds a benchmark with other settings; pass another --out-dir")
    return args


def settings(args):
    """What a mode's run depends on: a finished run is reused only with the same settings."""
    return {"ckpt": str(Path(args.ckpt).resolve()), "attacks": args.attacks, "n_examples": args.n_examples,
            "budget": args.budget, "extra": list(args.extra)}


def mode_command(args, mode, out_dir):
    """The ``test_white_attack.py`` command of one mode (``--resume`` when its folder has a run)."""
    command = [sys.executable, str(ROOT / "test_white_attack.py"), "--ckpt", args.ckpt, "--attacks", args.attacks,
               "--n-examples", str(args.n_examples), "--budget", args.budget, MODES[mode],
               "--out-dir", str(out_dir), "--quiet", *args.extra]
    if (out_dir / "results.json").exists() or (out_dir / "results.partial.json").exists():
        command.append("--resume")
    return command


def start_mode(args, mode):
    """Start one mode's process, or return None when its run is already finished."""
    out_dir = Path(args.out_dir) / mode
    if (out_dir / "results.json").exists() and (out_dir / TIMING).exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1") if args.parallel else None
    log = open(Path(args.out_dir) / f"{mode}.log", "a")  # noqa: SIM115 — closed in wait_mode
    command = mode_command(args, mode, out_dir)
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.perf_counter(), out_dir


PROGRESS_EVERY = 30  # seconds between progress lines while a mode runs


def saved_attacks(out_dir):
    """Attacks a mode's run has saved so far (its partial results; the children run --quiet)."""
    for name in ("results.json", "results.partial.json"):
        try:
            return len(json.loads((out_dir / name).read_text()).get("attacks", []))
        except (OSError, ValueError):
            continue
    return 0


def wait_mode(args, started):
    """Wait for one mode's process and record its wall time."""
    process, log, start, out_dir = started
    while True:
        try:
            code = process.wait(timeout=PROGRESS_EVERY)
            break
        except subprocess.TimeoutExpired:
            print(f"[eval_cascade] {out_dir.name}: {saved_attacks(out_dir)} attacks finished "
                  f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    log.close()
    if code != 0:
        raise RunFailed(f"{out_dir.name} run failed (exit {code}); see {out_dir.parent / (out_dir.name + '.log')}")
    atomic_write_json(out_dir / TIMING, {"wall_seconds": time.perf_counter() - start, "settings": settings(args),
                                         "measured": machine(args)})


def machine(args):
    """Where and how a mode was timed (kept with its wall time)."""
    import torch
    return {"date": date.today().isoformat(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "parallel": args.parallel, "command": " ".join(sys.argv)}


def read_mode(out_dir):
    results = json.loads((out_dir / "results.json").read_text())
    return results, json.loads((out_dir / TIMING).read_text())


def summary(name, results, timing):
    attacks = results["attacks"]
    return {"mode": name, "wall_seconds": round(timing["wall_seconds"], 1), "measured": timing.get("measured", {}),
            "attack_seconds": round(results["clean"]["seconds"] + sum(a["seconds"] for a in attacks), 1),
            "attacks": len(attacks), "examples_attacked": sum(a["received_count"] for a in attacks),
            "clean_correct": results["clean"]["robust_count"], "worst_case": results["worst_case"]["robust_count"],
            "n": len(results["labels"]), "stages": [{k: a[k] for k in ("name", "standalone", "received_count",
                                                                        "broken_count", "seconds")} for a in attacks]}


def same_worst_case(runs):
    """Number of examples where the modes' per-example worst cases differ (0: identical)."""
    worst = [results["worst_case"]["correct"] or [None] * len(results["labels"]) for results, _ in runs.values()]
    return sum(len(set(column)) > 1 for column in zip(*worst))


def minutes(seconds):
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def print_tables(rows, differ):
    for row in rows:
        m = row["measured"]
        how = "in parallel with the other mode, 1 thread" if m.get("parallel") else "alone"
        print(f"{row['mode']}: measured {m.get('date', '?')} · torch {m.get('torch', '?')} · {m.get('cpus', '?')} CPUs "
              f"· {how}")
    print()
    print("| mode | wall (m:s) | attack time (m:s) | attacks | examples attacked | clean-correct | worst case |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {minutes(row['wall_seconds'])} | {minutes(row['attack_seconds'])} | {row['attacks']} "
              f"| {row['examples_attacked']} | {row['clean_correct']}/{row['n']} | {row['worst_case']}/{row['n']} |")
    if differ is not None:
        print(f"\nper-example worst case: {'identical' if differ == 0 else f'DIFFERS on {differ} examples'}")
    by_mode = {row["mode"]: {s["name"]: s for s in row["stages"]} for row in rows}
    if "cascade" not in by_mode:
        return
    full = by_mode.get("no-cascade", {})
    print("\n| stage | attack | received | broke | seconds | seconds without cascade |")
    print("|---|---|---|---|---|---|")
    for order, stage in enumerate(by_mode["cascade"].values(), 1):
        other = full.get(stage["name"])
        where = "" if not stage["standalone"] else " (full set)"
        print(f"| {order} | {stage['name']}{where} | {stage['received_count']} | {stage['broken_count']} "
              f"| {stage['seconds']:.1f} | {'' if other is None else format(other['seconds'], '.1f')} |")


def run_modes(args):
    """Run every unfinished mode (all at once with --parallel); if one fails or the benchmark is
    stopped, the others are stopped too (their finished attacks are kept for the next try)."""
    started = {}
    try:
        for mode in args.modes:
            started[mode] = start_mode(args, mode)
            if not args.parallel and started[mode] is not None:
                wait_mode(args, started[mode])
        for mode in args.modes if args.parallel else ():
            if started[mode] is not None:
                wait_mode(args, started[mode])
    finally:
        for item in started.values():
            if item is not None and item[0].poll() is None:
                item[0].terminate()
                item[0].wait()


def run(args):
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    run_modes(args)
    runs = {mode: read_mode(Path(args.out_dir) / mode) for mode in args.modes}
    rows = [summary(mode, *runs[mode]) for mode in args.modes]
    differ = same_worst_case(runs) if len(runs) > 1 else None
    if args.json:
        print(json.dumps({"modes": rows, "worst_case_differs_on": differ}, indent=1))
    else:
        print_tables(rows, differ)
    return 0 if not differ else 1


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
