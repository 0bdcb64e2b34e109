"""Cosine / L2 statistics of PP (natural vs adversarial) and NP (natural vs other-class) feature
pairs for one class of the test set (docs/protocol.md §6, paper Fig. 1, 3); prints a table, saves an .npz."""
import sys
from pathlib import Path

from models import CheckpointError
from utils.analysis.features import (
    FeatureError,
    add_common_arguments,
    analysis_from_args,
    attack_from_args,
    check_options,
    feature_distances,
    safe_name,
    save_npz,
    stats_table,
)
from utils.cli import OneLineArgumentParser, run_cli
from utils.data import DatasetError
from utils.evaluation.options import (
    OutputError,
    check_output_dir,
    check_output_file,
    create_output_dir,
)
from utils.training.ancra import STRATEGIES


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--target-label", type=int, default=0, help="class of the natural examples (default 0)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="random_adv",
                        help="negative strategy for the NP pairs (default random_adv; random = natural OEs)")
    parser.add_argument("--output", default=None,
                        help="npz path (default OUT_DIR/features_LABEL_classC_STRATEGY.npz)")
    parser.add_argument("--save-features", action="store_true", help="also store the N×R feature arrays")
    parser.set_defaults(out_dir="results/features")
    return parser.parse_args(argv)


def run(args):
    check_options(args)
    if args.output:  # outputs are checked before any work
        check_output_file(args.output)
    else:
        check_output_dir(args.out_dir)
    analysis = analysis_from_args(args)
    attack = attack_from_args(args, analysis)
    result = feature_distances(analysis, args.target_label, strategy=args.strategy, n_examples=args.n_examples,
                               batch_size=args.batch_size, attack=attack, seed=args.seed, device=args.device,
                               progress=not args.quiet, save_features=args.save_features)
    create_output_dir(Path(args.output).parent if args.output else args.out_dir)  # checked above; made once there is a result
    name = f"features_{safe_name(analysis.label)}_class{args.target_label}_{args.strategy}.npz"
    path = save_npz(Path(args.output) if args.output else Path(args.out_dir) / name, result)
    print(f"{analysis.label} on {analysis.dataset}, class {args.target_label} "
          f"({result['n_examples']} images), NP strategy {args.strategy}")
    print(stats_table(result))
    print(f"saved {path}")
    return path


def main(argv=None):
    return run_cli(run, parse_args, (FeatureError, CheckpointError, DatasetError, OutputError), argv)


if __name__ == "__main__":
    sys.exit(main())
