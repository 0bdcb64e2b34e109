"""Train the vanilla baselines (PGD-AT, TRADES with its KL attack, MART, or standard training) on a
plain model of any architecture and dataset.

This is `train.py` with a vanilla method by default. Run `python train_baselines.py --help` for the
options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import Defaults, main

DEFAULTS = Defaults("Train vanilla PGD-AT / TRADES / MART (or standard training) on a plain model.",
                    arch="resnet18", dataset="cifar10", method="pgd-at")

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
