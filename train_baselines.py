"""Train the vanilla baselines (PGD-AT, TRADES with its KL attack, MART, or standard training) on a
plain model of any architecture and dataset.

Run `python train_baselines.py --help` for the options; `--smoke` runs the whole pipeline on tiny synthetic data.
"""
import sys

from utils.training.cli import main

if __name__ == "__main__":
    sys.exit(main("baselines"))
