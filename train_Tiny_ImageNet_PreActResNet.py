"""Train PreActResNet-18 with ANCRA on Tiny-ImageNet (200 classes, weight decay 5e-4).

Run `python train_Tiny_ImageNet_PreActResNet.py --help` for the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import main

if __name__ == "__main__":
    sys.exit(main("tiny"))
