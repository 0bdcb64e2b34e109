"""Train any registered method on any registered architecture and dataset:

    python train.py --arch resnet18 --dataset cifar10 --method trades-ancra

``--method`` takes a registered method (pgd-at, trades, mart, standard, ...) with the -anc, -ra or
-ancra suffix for ANCRA's parts; a bare name is the vanilla method. The four train_*.py scripts are
this same command with the paper's defaults. `--smoke` runs the whole pipeline on tiny synthetic
data; `python train.py --help` lists every option.
"""
import sys

from utils.training.cli import Defaults, main

DEFAULTS = Defaults("Train a registered method (with -anc, -ra or -ancra for ANCRA) on any registered "
                    "architecture and dataset.", arch="resnet18", dataset="cifar10", method="trades-ancra")

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
