"""Train WideResNet-34-10 / 28-10 with ANCRA on CIFAR-10/100 (--depth, --widen).

Run `python train_CIFAR10_WideResNet.py --help` for the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import main

if __name__ == "__main__":
    sys.exit(main("wideresnet"))
