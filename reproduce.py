"""Reproduce a table or the figures of the paper with one resumable command: train every row
(or resume it), evaluate it, and write OUT/STUDY/table.md and table.json.

Rerunning the same command after an interruption continues where it stopped; nothing finished is
redone. `python reproduce.py --list` shows the studies and their rows.
"""
import argparse
import sys

from utils.cli import OneLineArgumentParser, explicit_options, finite_float
from utils.reproduce.cli import main
from utils.reproduce.studies import STUDIES


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="?", choices=sorted(STUDIES), help="which table or figures")
    parser.add_argument("--list", action="store_true", help="print the studies and their rows, then exit")
    parser.add_argument("--out-dir", default="results", help="parent of OUT/STUDY (default results)")
    parser.add_argument("--only", default=None, metavar="ROW,...", help="run only these rows (see --list)")
    parser.add_argument("--smoke", action="store_true",
                        help="synthetic data, tiny sizes, small attack budget without AutoAttack: the whole chain "
                             "on a CPU in minutes")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train this many epochs, lr milestones scaled from 75/90/100 of 120 (default 120, "
                             "verdict 15; smoke 2)")
    parser.add_argument("--dataset", default=None, help="default: the study's (smoke: synthetic)")
    parser.add_argument("--data-dir", default=None, help="where datasets live (default ./data)")
    parser.add_argument("--n-examples", type=int, default=None,
                        help="test examples evaluated (default 1000; smoke 16)")
    parser.add_argument("--seeds", "--seed", dest="seeds", default="0", metavar="S[,S...]",
                        help="training and attack seeds: every row is trained and evaluated once per seed, on the "
                             "same test images (default 0; one seed keeps the run folders of earlier versions)")
    parser.add_argument("--gpus", default=None, metavar="0,1,...",
                        help="run independent rows concurrently, one per GPU (or per group of --nproc-per-row); "
                             "a GPU named twice takes two rows")
    parser.add_argument("--rows-per-gpu", type=int, default=None, metavar="K",
                        help="run K rows at once on each GPU (or group; without --gpus, on the default device): "
                             "for rows that use a fraction of a device (default 1, or the study's own)")
    parser.add_argument("--nproc-per-row", type=int, default=1,
                        help="train each row with this many processes through torchrun (default 1)")
    parser.add_argument("--time-budget", type=finite_float, default=None, metavar="SECONDS",
                        help="verdict only: measure a probe epoch, then shorten --epochs and --n-examples so the "
                             "whole study ends within SECONDS (the table says what was shortened)")
    parser.add_argument("--record", default=None, metavar="RESULTS.md",
                        help="verdict only: append the finished verdict to this file; only real-data runs on a "
                             "CUDA GPU are recorded")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.given_options = sorted(explicit_options(parser, argv))  # for the options that would change nothing
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args(), command=["python", "reproduce.py", *sys.argv[1:]]))
