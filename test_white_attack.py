"""Robust accuracy of a checkpoint: the paper's white-box protocol (SPEC §2) and an adaptive
evaluation that sees through reverse attention (SPEC §8), with sanity checks for gradient masking.

Writes report.md and results.json (every attack's accuracy, parameters, seed, time and
per-example correctness) to --out-dir and prints the markdown table.
"""
import argparse
import dataclasses
import json
import sys
from datetime import datetime
from pathlib import Path

import torch

from models import CheckpointError, load_model, read_checkpoint
from utils import data as datasets
from utils.cli import eps_type, run_cli
from utils.evaluation.autoattack_adapter import AutoAttackUnavailable, import_autoattack
from utils.evaluation.suite import (BUDGETS, EvaluationError, Settings, attack_catalogue, eps_text, evaluate, json_report,
                              markdown_report, select_attacks)
from utils.evaluation.sanity import run_checks


def number_list(text):
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint in this project's format, or a reference state dict")
    model = parser.add_argument_group("model (default: from the checkpoint)")
    model.add_argument("--arch", default=None, help="resnet18, preact-resnet18, wrn-D-K")
    model.add_argument("--num-classes", type=int, default=None)
    model.add_argument("--reverse-attention", choices=("on", "off"), default=None,
                       help="RA or plain (reference state dicts do not record it; default on)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(datasets.DATASETS), default=None,
                      help="default: the dataset in the checkpoint's saved args")
    data.add_argument("--data-dir", default=None, help="dataset folder (default ./data)")
    data.add_argument("--n-examples", type=int, default=1000, help="size of the fixed test subset (default 1000)")
    data.add_argument("--subset-seed", type=int, default=0, help="seed of the fixed test subset (default 0)")
    attack = parser.add_argument_group("attacks")
    attack.add_argument("--attacks", default="all",
                        help="comma-separated attack names and/or presets paper, adaptive, sanity, all (default all)")
    attack.add_argument("--eps", type=eps_type, default=8 / 255, help="L∞ budget: 8/255 (default), 0.031 or 8 (pixel units)")
    attack.add_argument("--aux-weight", type=float, default=2.0, help="λ of the 'with p' attacks (default 2.0)")
    attack.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="strength of the adaptive/sanity attacks: full (default) or small (CPU smoke runs)")
    attack.add_argument("--joint-weights", type=number_list, default=(0.5, 2.0, 8.0),
                        help="aux weights of the joint attacks (default 0.5,2,8)")
    attack.add_argument("--taus", type=number_list, default=(0.1, 1.0, 10.0),
                        help="temperatures of the straight-through attacks (default 0.1,1,10)")
    attack.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default 0)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=200)
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--out-dir", default=None, help="default: CKPT_FOLDER/eval_TIMESTAMP")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-attack lines on stderr")
    return parser.parse_args(argv)


def load_checkpoint(args):
    """Model, its config and the checkpoint's saved training args."""
    payload = read_checkpoint(args.ckpt)
    ra = None if args.reverse_attention is None else args.reverse_attention == "on"
    model, config = load_model(payload, args.arch, args.num_classes, ra, device=args.device)
    saved = (payload.get("args") or {}) if isinstance(payload, dict) else {}
    return model, config, saved


def load_test_subset(args, config, saved):
    """Dataset name, the fixed test subset as float images and labels, and its indices."""
    dataset = args.dataset or saved.get("dataset")
    if not dataset:
        raise EvaluationError(f"checkpoint {args.ckpt} does not record its dataset; pass --dataset")
    if datasets.num_classes(dataset) != config["num_classes"]:
        raise EvaluationError(f"the model has {config['num_classes']} classes but {dataset} has "
                              f"{datasets.num_classes(dataset)}; pass the --dataset it was trained on")
    size = config.get("image_size") or saved.get("image_size") or datasets.image_size(dataset)
    test = datasets.load_dataset(dataset, args.data_dir, "test", synthetic_image_size=size,
                                 synthetic_size=max(args.n_examples, datasets.SYNTHETIC_SIZES["test"]),
                                 seed=int(saved.get("data_seed") or 0))
    if test.x.shape[-1] != size:
        raise EvaluationError(f"the model expects {size}×{size} images but {dataset} has "
                              f"{test.x.shape[-1]}×{test.x.shape[-1]}; pass the --dataset it was trained on")
    # fixed_subset picks examples by a seeded permutation; labelling each example by its own
    # index recovers which ones, so results.json can name them.
    order = datasets.fixed_subset(datasets.TensorPair(test.x, torch.arange(len(test)), test.classes),
                                  args.n_examples, seed=args.subset_seed).y
    subset = test.subset(order)
    return dataset, subset.float(), subset.y, order.tolist()


def run(args):
    if args.n_examples < 1 or args.batch_size < 1:
        raise EvaluationError("--n-examples and --batch-size must be at least 1")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"--device {args.device} asked for but no CUDA device is available; pass --device cpu")
    started = datetime.now()
    model, config, saved = load_checkpoint(args)
    settings = Settings(eps=args.eps, aux_weight=args.aux_weight, budget=BUDGETS[args.budget],
                        joint_weights=args.joint_weights, taus=args.taus)
    catalogue = attack_catalogue(settings, config["num_classes"])
    specs, skipped = select_attacks(args.attacks, catalogue, config["reverse_attention"])
    package = import_autoattack().name if any(s.needs_autoattack for s in specs) else None
    dataset, x, y, indices = load_test_subset(args, config, saved)

    def log(result):
        print(f"{result.name}: {100 * result.accuracy:.2f} % ({result.seconds:.1f} s)", file=sys.stderr)

    evaluation = evaluate(model, x, y, specs, batch_size=args.batch_size, seed=args.seed, device=args.device,
                          progress=not args.quiet and sys.stderr.isatty(), skipped=skipped,
                          on_result=None if args.quiet else log)
    checks = run_checks(evaluation)
    meta = {
        "checkpoint": str(args.ckpt), **config, "dataset": dataset, "n_examples": len(indices),
        "indices": indices, "subset_seed": args.subset_seed, "eps": args.eps, "eps_text": eps_text(args.eps),
        "aux_weight": args.aux_weight, "budget": args.budget, "budget_params": dataclasses.asdict(settings.budget),
        "joint_weights": list(args.joint_weights), "taus": list(args.taus), "seed": args.seed,
        "attacks_requested": args.attacks, "device": str(args.device), "torch": torch.__version__,
        "autoattack_package": package, "started": started.isoformat(timespec="seconds"),
        "seconds": (datetime.now() - started).total_seconds(), "arguments": vars(args),
    }
    out_dir = Path(args.out_dir or Path(args.ckpt).parent / f"eval_{started:%Y%m%d_%H%M%S}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown_report(evaluation, checks, meta)
    (out_dir / "report.md").write_text(report)
    (out_dir / "results.json").write_text(json.dumps(json_report(evaluation, checks, meta), indent=1))
    print(report)
    print(f"saved {out_dir / 'report.md'} and {out_dir / 'results.json'}")
    return out_dir


def main(argv=None):
    return run_cli(run, parse_args, (EvaluationError, CheckpointError, datasets.DatasetError, AutoAttackUnavailable), argv)


if __name__ == "__main__":
    sys.exit(main())
