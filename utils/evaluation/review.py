"""What ``test_white_attack.py`` does around the main evaluation so a reviewer can trust it at a glance
(docs/evaluation.md#for-reviewers): the indicators of attack failure, the ε-sweep after the run into the same
out-dir, RobustBench models by name and RobustBench's model-info export. The options live here;
``utils/evaluation/command.py`` calls these functions at fixed points of its run."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.evaluation import indicators, robustbench, sweep
from utils.evaluation.catalogue import BUDGETS, Settings
from utils.evaluation.options import OutputError, check_output_dir, check_output_file, write_json
from utils.evaluation.report import sweep_section
from utils.evaluation.suite import choose_attacks, evaluate_model


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def add_model_source(source):
    """``--robustbench NAME`` beside --ckpt / --model-factory."""
    source.add_argument("--robustbench", metavar="NAME",
                        help="a RobustBench model by name, weights from MODEL_DIR/DATASET/THREAT/NAME.pt (no download; "
                             "needs requirements-robustbench.txt)")


def add_arguments(parser):
    group = parser.add_argument_group("review (docs/evaluation.md#for-reviewers)")
    group.add_argument("--eps-sweep", type=sweep.parse_eps_sweep, default=None, metavar="LIST|default",
                       help="after the run, the same attacks at every ε of LIST (e.g. 0,1,2,4,8,16,32,64/255 or "
                            "default) into OUT_DIR/eps_sweep.json and .png; outside the headline; resumable per ε")
    group.add_argument("--indicators", type=non_negative_int, default=100, metavar="N",
                       help="indicators of attack failure on the first N clean-correct examples (default 100; 0: off)")
    group.add_argument("--model-dir", default=None,
                       help="with --robustbench: RobustBench's weight folder (its DIR/DATASET/THREAT/NAME.pt layout) "
                            f"(default {robustbench.DEFAULT_MODEL_DIR})")
    group.add_argument("--threat-model", choices=robustbench.THREAT_MODELS, default=None,
                       help="with --robustbench: which weights (default Linf); our attacks are always L∞")
    group.add_argument("--rb-dataset", choices=robustbench.RB_DATASETS, default=None,
                       help="with --robustbench: the zoo's dataset (default cifar10; --dataset still picks the test "
                            "data, e.g. synthetic for a smoke run)")
    group.add_argument("--export-robustbench", metavar="FILE.json", default=None,
                       help="write the result in RobustBench's model-info JSON (clean, AutoAttack, worst case as "
                            "the external evaluation)")


def check_args(parser, args):
    """The RobustBench options' defaults; called by ``parse_args`` (which refuses them without
    --robustbench: ``command.PARSE_RULES``). A smoke budget is never exported."""
    if args.export_robustbench and not BUDGETS[args.budget].evaluation:
        parser.error(f"--budget {args.budget} is a smoke check, not an evaluation: it is never exported; drop "
                     "--export-robustbench or use --budget full")
    args.model_dir = args.model_dir or robustbench.DEFAULT_MODEL_DIR
    args.threat_model = args.threat_model or "Linf"
    args.rb_dataset = args.rb_dataset or "cifar10"


# What an evaluation writes into its --out-dir (no other output may take these names).
OUTPUT_FILES = ("report.md", "results.json", "results.partial.json", "eps_sweep.json", "eps_sweep.png", ".lock")


def robustbench_inputs(args):
    """The RobustBench weight file ``--robustbench NAME`` reads (``[]`` without it)."""
    if not getattr(args, "robustbench", None):
        return []
    return [robustbench.weight_path(args.model_dir, args.rb_dataset, args.threat_model, args.robustbench)]


def check_export_path(path, out_dir, inputs=()):
    """Refuse an --export-robustbench path that would overwrite an input (the checkpoint, the
    weights, the factory file), an output of the same evaluation (results.json, report.md, ... in
    ``out_dir``, or anything under its eps_sweep/), or an existing file that is not an earlier
    RobustBench export. A symlink is judged by its target (the export is written through it)."""
    target = Path(path).resolve()
    for source in inputs:
        if Path(source).resolve() == target:
            raise OutputError(f"--export-robustbench {path} is the input {source} of this evaluation; write the "
                              "export to a new .json file")
    own = Path(out_dir).resolve()
    if (target.parent == own and target.name in OUTPUT_FILES) or own / sweep.FOLDER in target.parents:
        raise OutputError(f"--export-robustbench {path} is {target.name}, an output of this evaluation in {out_dir}; "
                          "write the export to another file")
    if target.exists() and not target.is_dir() and not robustbench.is_model_info(target):
        raise OutputError(f"--export-robustbench {path} exists and is not an earlier RobustBench export; give a new "
                          "file name (nothing was written)")


def check_outputs(args, out_dir, inputs=()):
    """Refuse unwritable or clashing review outputs before any work (creates nothing); ``inputs``:
    the files the evaluation reads."""
    if args.export_robustbench:
        check_output_file(args.export_robustbench)
        check_export_path(args.export_robustbench, out_dir, inputs)
        if args.robustbench:
            robustbench.check_export({"threat_model": args.threat_model})
    if args.eps_sweep:
        check_output_dir(Path(out_dir) / sweep.FOLDER)


def load_model(args):
    """``(model, config, saved)`` of ``--robustbench NAME``."""
    return robustbench.load_robustbench(args.robustbench, model_dir=args.model_dir, dataset=args.rb_dataset,
                                        threat_model=args.threat_model, device=args.device)


def _settings(args):
    return Settings(eps=args.eps, aux_weight=args.aux_weight, budget=BUDGETS[args.budget],
                    joint_weights=tuple(args.joint_weights), taus=tuple(args.taus))


def run_indicators(args, model, x, y, evaluation):
    """The indicators of attack failure for the run's own PGDs and the model; [] with --indicators 0."""
    if not args.indicators:
        return []
    specs, _ = choose_attacks(model, x, args.attacks, _settings(args), args.device, args.full_set)
    return indicators.run_indicators(model, x, y, specs, clean=evaluation.clean, eps=args.eps, seed=args.seed,
                                     n_examples=args.indicators, batch_size=evaluation.meta["batch_size"],
                                     device=args.device)


def run_eps_sweep(args, model, x, y, evaluation, out_dir):
    """The ε-sweep after the main run (same examples, seed and attacks, rescaled); returns the
    eps_sweep.json summary."""
    ra = bool(evaluation.meta.get("reverse_attention"))
    specs, _ = choose_attacks(model, x, args.attacks, _settings(args), args.device, args.full_set)
    names = sweep.sweep_attacks(specs, args.eps, ra)
    strongest = sweep.strongest_head_aware(evaluation.results)
    if strongest and strongest not in names:
        names.append(strongest)
    # the head-aware attacks the curve compares run on every example (their own figure), not in the cascade
    full_set = tuple(dict.fromkeys([*args.full_set, *(n for n in ("pgd40+p", strongest) if ra and n)]))

    def evaluate(eps, attack_names):
        if not args.quiet:
            print(f"ε-sweep: ε = {sweep.eps_text(eps)}", file=sys.stderr)
        return evaluate_model(model, x, y, ",".join(attack_names), eps, aux_weight=args.aux_weight,
                              budget=args.budget, batch_size=args.batch_size, seed=args.seed, device=args.device,
                              cascade=args.cascade, attack_dtype=evaluation.meta["attack_dtype"],
                              joint_weights=args.joint_weights, taus=args.taus, progress=False, full_set=full_set,
                              meta={"checkpoint": evaluation.meta.get("checkpoint"), "indices": evaluation.meta.get("indices")})

    key = {k: evaluation.meta["resume_key"][k] for k in ("model", "indices", "seed", "budget", "aux_weight",
                                                         "joint_weights", "taus", "cascade", "attack_dtype")}
    reports = sweep.run_sweep(evaluate, args.eps_sweep, threat_eps=args.eps, main_report=evaluation.to_json(),
                              names=names, out_dir=out_dir, base_key=dict(key, full_set=list(full_set)),
                              full_set=full_set)
    summary = sweep.summarise(args.eps_sweep, reports, clean_correct=evaluation.clean.tolist(), n=evaluation.n,
                              threat_eps=args.eps, reverse_attention=ra,
                              model_name=run_label(evaluation.meta.get("checkpoint")))
    summary["attacks"], summary["full_set"], summary["strongest_head_aware"] = names, list(full_set), strongest
    atomic_write_json(Path(out_dir) / "eps_sweep.json", summary)
    sweep.plot_sweep(summary, Path(out_dir) / "eps_sweep.png")
    return summary


def run_label(checkpoint):
    """The model as figure titles name it: a checkpoint by its run folder and file
    (``cifar10_resnet18_trades-ancra_s0/best.pt``, never only ``best.pt``); anything else as given."""
    text = str(checkpoint)
    path = Path(text)
    if text.startswith("robustbench:") or ".py:" in text or not path.parent.name:
        return text
    return f"{path.parent.name}/{path.name}"


def after_report(args, model, x, y, evaluation, out_dir, report):
    """The ε-sweep (its section appended to report.md) and the RobustBench export, after the
    main results are safely on disk. Returns the final report text."""
    if args.eps_sweep:
        summary = run_eps_sweep(args, model, x, y, evaluation, out_dir)
        report = report + "\n".join(sweep_section(summary)) + "\n"
        atomic_write_text(Path(out_dir) / "report.md", report)
    if args.export_robustbench:
        info = robustbench.model_info(evaluation.to_json())
        export = Path(args.export_robustbench)
        try:
            export.parent.mkdir(parents=True, exist_ok=True)  # checked creatable before the evaluation
        except OSError as err:
            raise OutputError(f"cannot create the folder of --export-robustbench {export} ({err.strerror}); "
                              f"the evaluation is saved in {out_dir}") from None
        write_json(export, info)
    return report
