"""Train ResNet-18 with ANCRA on CIFAR-10/100 (TRADES-ANCRA by default; --method, --no-anc, --no-ra for the other rows).

This is `train.py` with the paper's ResNet-18 defaults. Run `python train_CIFAR10_ResNet.py --help` for the
options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import Defaults, main

DEFAULTS = Defaults("Train ResNet-18 with ANCRA (PGD-AT / TRADES / MART + ANC + RA) on CIFAR-10/100.",
                    arch="resnet18", dataset="cifar10", method="trades", ancra=True)

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
