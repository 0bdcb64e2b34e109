"""Train WideResNet-34-10 / 28-10 with ANCRA on CIFAR-10/100 (--depth, --widen).

This is `train.py` with the paper's WideResNet defaults. Run `python train_CIFAR10_WideResNet.py --help` for
the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import Defaults, main

DEFAULTS = Defaults("Train a WideResNet (default WRN-34-10) with ANCRA on CIFAR-10/100.",
                    arch="wrn-34-10", dataset="cifar10", method="trades", ancra=True)

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
