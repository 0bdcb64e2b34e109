"""UMAP of the penultimate features of natural and PGD adversarial test images, coloured by
class (o natural, x adversarial); saves umap.png/pdf and the 2-D embedding (umap_embedding.npz)."""
import json
import sys

from models import CheckpointError
from utils.analysis.features import (
    FeatureError,
    add_common_arguments,
    analysis_from_args,
    attack_from_args,
    check_options,
    save_npz,
    umap_inputs,
)
from utils.analysis.plots import run_name, umap_embedding, umap_figure
from utils.cli import OneLineArgumentParser, nonnegative_float, run_cli
from utils.data import DatasetError
from utils.evaluation.options import (
    OutputError,
    check_output_dir,
    create_output_dir,
)
from utils.evaluation.report import eps_text


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__)
    add_common_arguments(parser)
    parser.add_argument("--n-neighbors", type=int, default=15, help="UMAP n_neighbors (default 15)")
    parser.add_argument("--min-dist", type=nonnegative_float, default=0.1, help="UMAP min_dist in [0, 1] (default 0.1)")
    parser.set_defaults(n_examples=500)
    return parser.parse_args(argv)


def run(args):
    check_options(args)
    if args.n_neighbors < 2:
        raise FeatureError("--n-neighbors must be at least 2")
    if args.min_dist > 1:
        raise FeatureError(f"--min-dist must lie in [0, 1] (UMAP's spread is 1), got {args.min_dist}")
    if 2 * args.n_examples <= args.n_neighbors + 1:
        raise FeatureError(f"--n-examples {args.n_examples} gives {2 * args.n_examples} points, too few for UMAP with "
                           f"--n-neighbors {args.n_neighbors}; use at least {args.n_neighbors // 2 + 2} examples")
    out_dir = check_output_dir(args.out_dir)  # before any work
    analysis = analysis_from_args(args)
    attack = attack_from_args(args, analysis)
    inputs = umap_inputs(analysis, args.n_examples, batch_size=args.batch_size, attack=attack, seed=args.seed,
                         device=args.device, progress=not args.quiet)
    embedding = umap_embedding(inputs["features"], args.seed, args.n_neighbors, args.min_dist)
    create_output_dir(out_dir)  # checked above; made once there is something to save
    n = len(inputs["index"])
    title = (f"{analysis.label} ({run_name({'checkpoint': str(args.ckpt)}, args.ckpt)}) on {analysis.dataset}: {n} test "
             f"images, natural and PGD-{attack.steps} at ε = {eps_text(attack.eps)}")
    paths = umap_figure(embedding, inputs["labels"], inputs["is_adv"], analysis.data.classes, title, out_dir / "umap")
    paths.append(save_npz(out_dir / "umap_embedding.npz", {
        "embedding": embedding, "labels": inputs["labels"], "is_adv": inputs["is_adv"], "index": inputs["index"],
        "checkpoint": str(args.ckpt), "label": analysis.label, "dataset": analysis.dataset, "seed": int(args.seed),
        "attack": json.dumps(attack.for_model(analysis.model).describe()["ae"])}))
    print("saved " + ", ".join(str(p) for p in paths))
    return paths


def main(argv=None):
    return run_cli(run, parse_args, (FeatureError, CheckpointError, DatasetError, OutputError), argv)


if __name__ == "__main__":
    sys.exit(main())
