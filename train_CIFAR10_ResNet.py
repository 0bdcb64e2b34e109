"""Train ResNet-18 with ANCRA on CIFAR-10/100 (TRADES-ANCRA by default; --method, --no-anc, --no-ra for the other rows).

Run `python train_CIFAR10_ResNet.py --help` for the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import main

if __name__ == "__main__":
    sys.exit(main("resnet"))
