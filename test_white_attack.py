"""Robust accuracy of a checkpoint, or of any model built by a Python function: the paper's
white-box protocol (docs/protocol.md §2) and an adaptive evaluation that sees through reverse
attention (§8), with sanity checks for gradient masking, run as a cascade by default.

Writes report.md and results.json (every attack's accuracy, parameters, seed, time and
per-example correctness) to --out-dir, saving each finished attack as it goes (--resume picks
up an interrupted run), and prints the markdown report. The logic lives in
utils/evaluation/command.py; `python test_white_attack.py --help` lists the options.
"""
import sys

from utils.evaluation.command import PARTIAL, main, parse_args

__all__ = ["PARTIAL", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
