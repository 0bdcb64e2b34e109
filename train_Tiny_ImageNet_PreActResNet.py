"""Train PreActResNet-18 with ANCRA on Tiny-ImageNet (200 classes, weight decay 5e-4).

This is `train.py` with the paper's Tiny-ImageNet defaults. Run `python train_Tiny_ImageNet_PreActResNet.py
--help` for the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import Defaults, main

DEFAULTS = Defaults("Train PreActResNet-18 with ANCRA on Tiny-ImageNet (200 classes, 64x64).",
                    arch="preact-resnet18", dataset="tiny-imagenet", method="trades", ancra=True,
                    smoke_image_size=32)

if __name__ == "__main__":
    sys.exit(main(DEFAULTS))
