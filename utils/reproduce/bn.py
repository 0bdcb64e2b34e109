"""Clean accuracy with BatchNorm's running statistics (eval mode) against each batch's own
statistics, for models whose final BatchNorm serves two feature distributions.

The RA WideResNet and PreActResNet (as in the reference code) pass both RA blocks' outputs and
the network's end through one final BatchNorm, so its running statistics average different
distributions; a large gap between the two accuracies shows it. Run as
``python -m utils.reproduce.bn --ckpt RUN/best.pt --n-examples N --out bn.json``.
"""
import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from models import CheckpointError
from utils.checkpoint import atomic_write_json
from utils.cli import OneLineArgumentParser, add_device_argument, resolve_device, run_cli
from utils.data import DatasetError
from utils.evaluation.command import load_checkpoint, load_test_subset
from utils.evaluation.suite import EvaluationError


@torch.no_grad()
def _accuracy(model, x, y, batch_size, device):
    correct = 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        correct += int((model(xb).argmax(1) == yb).sum())
    return correct / max(1, len(y))


def batch_statistics_accuracy(model, x, y, batch_size=200, device="cpu"):
    """``{"eval": acc, "batch_stats": acc}``: clean accuracy in eval mode, and with every BatchNorm
    normalising by its batch's statistics (a deep copy runs that, so ``model``'s running statistics,
    mode and parameters are left as they were). Batches are consecutive slices of ``batch_size``."""
    if batch_size < 2:
        raise ValueError("batch statistics need batches of at least 2 examples")
    was_training = model.training
    model.eval()
    try:
        eval_accuracy = _accuracy(model, x, y, batch_size, device)
    finally:
        model.train(was_training)
    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if isinstance(module, _BatchNorm):
            module.train()
    return {"eval": eval_accuracy, "batch_stats": _accuracy(probe, x, y, batch_size, device)}


def parse_args(argv=None):
    """Options of ``python -m utils.reproduce.bn``."""
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint of this project")
    parser.add_argument("--n-examples", type=int, default=1000, help="size of the fixed test subset (default 1000)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the fixed test subset (default 0)")
    parser.add_argument("--dataset", default=None, help="default: the checkpoint's")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=200, help="batch of the batch statistics (default 200)")
    add_device_argument(parser)
    parser.add_argument("--out", required=True, help="JSON file to write")
    return parser.parse_args(argv)


def run(args):
    """Measure on the same fixed test subset that test_white_attack.py evaluates; write ``args.out``.
    A ``--device`` that is not here raises ValueError (one line, exit code 2) before anything is read."""
    args.device = str(resolve_device(args.device))
    model, config, saved = load_checkpoint(args.ckpt, device=args.device)
    subset = load_test_subset(config, saved, n_examples=args.n_examples, dataset=args.dataset,
                              data_dir=args.data_dir, subset_seed=args.subset_seed, source=args.ckpt)
    dataset, x, y, indices = subset.dataset, subset.x, subset.y, subset.indices
    result = batch_statistics_accuracy(model, x, y, args.batch_size, args.device)
    atomic_write_json(Path(args.out), {**result, "n_examples": len(indices), "batch_size": args.batch_size,
                                       "dataset": dataset, "checkpoint": str(args.ckpt), "indices": indices})
    print(f"clean accuracy: eval mode {100 * result['eval']:.2f} %, batch statistics "
          f"{100 * result['batch_stats']:.2f} % (batches of {args.batch_size}, n = {len(indices)})")


def main(argv=None):
    """Entry point; an expected error prints one ``error: ...`` line and returns 2."""
    return run_cli(run, parse_args, (CheckpointError, DatasetError, EvaluationError, ValueError), argv)


if __name__ == "__main__":
    sys.exit(main())
