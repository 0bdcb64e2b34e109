"""The paper's Fig. 1 / Fig. 3 histograms (NP cosine, NP L2, PP cosine, PP L2; 20 bins, density)
with several methods overlaid, from .npz files written by feature_distance.py. A label shared by
several files gets each run's name added; a caption under each figure names the class, dataset, ε,
NP strategy and runs."""
import sys

from utils.analysis.features import FeatureError, load_npz
from utils.analysis.plots import histogram_figures, mixed_metadata
from utils.cli import OneLineArgumentParser, run_cli
from utils.evaluation.options import OutputError, check_output_dir


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", help=".npz files from feature_distance.py, one per method")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend labels, one per file (default: the method labels stored in the files)")
    parser.add_argument("--bins", type=int, default=20, help="bins per panel, shared by all methods (default 20)")
    parser.add_argument("--out-dir", default="figures", help="output folder (created if missing)")
    return parser.parse_args(argv)


def run(args):
    if args.labels is not None and len(args.labels) != len(args.files):
        raise FeatureError(f"got {len(args.labels)} --labels for {len(args.files)} files; give one label per file")
    if args.bins < 1:
        raise FeatureError("--bins must be at least 1")
    check_output_dir(args.out_dir)  # before reading the files
    runs = [load_npz(path) for path in args.files]
    for message in mixed_metadata(runs, args.files):
        print(f"warning: {message}", file=sys.stderr)
    labels = args.labels or [str(run["label"]) for run in runs]
    paths = histogram_figures(runs, labels, args.out_dir, args.bins, paths=args.files)
    print("saved " + ", ".join(str(p) for p in paths))
    return paths


def main(argv=None):
    return run_cli(run, parse_args, (FeatureError, OutputError), argv)


if __name__ == "__main__":
    sys.exit(main())
