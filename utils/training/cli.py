"""Command line shared by the four train_* scripts: one parser builder, one ``main``.

A script only names its kind (``resnet``, ``wideresnet``, ``tiny``, ``baselines``); the kind
fixes the architectures it accepts, the dataset choices and whether the model is ANCRA (RA
model, ANC on) or a plain baseline. ``--smoke`` swaps the defaults for a tiny synthetic run;
``--resume`` takes the defaults from the run being resumed, so only changed options need
repeating. Every option is checked before any folder is created or deleted.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass

from models import CheckpointError, arch_help, arch_info, canonical_arch
from utils import data, distributed, recipe
from utils.checkpoint import RunDirError, load_training_checkpoint, resolve_resume
from utils.cli import OneLineArgumentParser, add_speed_arguments, eps_fraction, eps_type, finite_float
from utils.locks import LockError
from utils.training import resume
from utils.training.config import DEVICES
from utils.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from utils.training.methods import get_method, method_names
from utils.training.negatives import STRATEGIES
from utils.training.setup import check_resume, method_config, run, schedule_of

SMOKE_DEFAULTS = {"dataset": "synthetic", "train_size": 32, "batch_size": 16, "epochs": 2, "milestones": [2],
                  "eval_size": 32, "eval_steps": 2, "attack_steps": 2, "save_freq": 2, "overwrite": True,
                  "awp_warmup": 0}  # with --awp-gamma, AWP runs from the first smoke epoch
DATA_SEED = 0  # seed of the synthetic data and of the fixed subsets (read back by the evaluation)


@dataclass(frozen=True)
class ScriptKind:
    """What distinguishes one train_* script from another."""

    description: str
    datasets: tuple | None  # None: every registered dataset
    default_dataset: str
    ancra: bool            # RA model + ANC by default, with --no-anc / --no-ra ablations
    default_method: str
    default_arch: str
    arch_pattern: str      # regular expression of the architectures the script trains
    smoke_image_size: int = 16

    @property
    def dataset_choices(self):
        """The datasets this script trains on: its own list, or every registered one (``datasets=None``)."""
        return tuple(data.DATASETS) if self.datasets is None else self.datasets

    @property
    def methods(self):
        """Registered methods this script offers (ANCRA scripts: those that take negatives)."""
        return tuple(m for m in method_names() if get_method(m).allows_anc or not self.ancra)


CIFAR = ("cifar10", "cifar100", "synthetic")
KINDS = {
    "resnet": ScriptKind("Train ResNet-18 with ANCRA (PGD-AT / TRADES / MART + ANC + RA) on CIFAR-10/100.",
                         CIFAR, "cifar10", True, "trades", "resnet18", r"resnet18"),
    "wideresnet": ScriptKind("Train a WideResNet (default WRN-34-10) with ANCRA on CIFAR-10/100.",
                             CIFAR, "cifar10", True, "trades", "wrn-34-10", r"wrn-\d+-\d+"),
    "tiny": ScriptKind("Train PreActResNet-18 with ANCRA on Tiny-ImageNet (200 classes, 64x64).",
                       ("tiny-imagenet", "synthetic"), "tiny-imagenet", True, "trades", "preact-resnet18",
                       r"preact-resnet18", smoke_image_size=32),
    "baselines": ScriptKind("Train vanilla PGD-AT / TRADES / MART (or standard training) on a plain model.",
                            None, "cifar10", False, "pgd-at", "resnet18", r".+"),
}


def _model_arguments(parser, kind):
    spec = KINDS[kind]
    model = parser.add_argument_group("model and method")
    arch_text = {"wideresnet": "wrn-D-K (e.g. wrn-34-10, wrn-28-10); default wrn-<depth>-<widen>",
                 "baselines": arch_help()}.get(kind, f"{spec.default_arch} (the one this script trains)")
    model.add_argument("--arch", default=None if kind == "wideresnet" else spec.default_arch, help=arch_text)
    if kind == "wideresnet":
        model.add_argument("--depth", type=int, default=None,
                           help="WRN depth (6n+4: 34, 28, ...); shorthand for --arch (34 when neither is given)")
        model.add_argument("--widen", type=int, default=None,
                           help="WRN widen factor; shorthand for --arch (10 when neither is given)")
    model.add_argument("--method", choices=spec.methods, default=spec.default_method,
                       help="training method" + (" (ANCRA variant unless --no-anc/--no-ra)" if spec.ancra else ""))
    if spec.ancra:
        model.add_argument("--no-anc", action="store_true", help="ablation: no asymmetric negative contrast")
        model.add_argument("--no-ra", action="store_true", help="ablation: plain model without reverse attention")
        model.add_argument("--strategy", choices=STRATEGIES, default="random_adv",
                           help=f"negative (other-class example) strategy; non-random ones use random for "
                                f"epochs <= {recipe.NEGATIVE_WARMUP_EPOCHS}")
        model.add_argument("--alpha", type=finite_float, default=recipe.ALPHA, help="ANC asymmetry (1: only the negative moves)")
        model.add_argument("--zeta", type=finite_float, default=recipe.ZETA, help="weight of the ANC term")
        model.add_argument("--aux-weight", type=finite_float, default=recipe.AUX_WEIGHT,
                           help="lambda: weight of the RA heads in losses and training attacks")
        if kind in ("wideresnet", "tiny"):
            model.add_argument("--separate-bn", action="store_true",
                               help="ablation: each RA block gets its own BatchNorm instead of sharing the "
                                    "network's final one (the reference shares it)")
    model.add_argument("--beta", type=finite_float, default=None, help="TRADES/MART robust-term weight (default 6 / 5)")
    model.add_argument("--attack-loss", choices=("ce", "kl"), default=None,
                       help="loss of the training adversarial examples (default: kl for vanilla TRADES, else ce)")


def _recipe_arguments(parser):
    group = parser.add_argument_group("training recipe (defaults: the paper's, docs/protocol.md section 5)")
    group.add_argument("--epochs", type=int, default=recipe.EPOCHS)
    group.add_argument("--batch-size", type=int, default=recipe.BATCH_SIZE)
    group.add_argument("--lr", type=finite_float, default=recipe.LR,
                       help="initial learning rate (the paper's 0.01 for every dataset; the reference "
                            "Tiny-ImageNet script used 0.1)")
    group.add_argument("--momentum", type=finite_float, default=recipe.MOMENTUM)
    group.add_argument("--weight-decay", type=finite_float, default=None,
                       help="default: the architecture's (2e-4 for ResNet-18 and WRNs, 5e-4 for "
                            "PreActResNet-18) and 5e-4 on Tiny-ImageNet")
    group.add_argument("--milestones", type=int, nargs="*", default=list(recipe.MILESTONES),
                       help="epochs after which the lr is multiplied by 0.1")
    group.add_argument("--eps", type=eps_type, default=recipe.EPS,
                       help="L-inf radius: 8/255 (default), 0.031 or 8 (pixel units); at most 255 pixel units")
    group.add_argument("--step-size", type=finite_float, default=recipe.STEP_SIZE,
                       help="PGD step of training attacks and evaluation")
    group.add_argument("--attack-steps", type=int, default=recipe.TRAIN_ATTACK_STEPS,
                       help="PGD steps of the training attacks")
    update = parser.add_argument_group("weight update (beyond the paper; both off by default)")
    update.add_argument("--awp-gamma", type=finite_float, default=0.0,
                        help="adversarial weight perturbation (Wu et al. 2020) of relative size gamma; 0 = off; "
                             "their defaults: 5e-3 for TRADES, 1e-2 for PGD-AT")
    update.add_argument("--awp-warmup", type=int, default=None,
                        help="AWP starts after this many epochs (default as in their code: 10 for TRADES, else 0)")
    update.add_argument("--ema", type=finite_float, default=0.0, metavar="DECAY",
                        help="keep an exponential moving average of the weights with this decay (e.g. 0.999); "
                             "0 = off. When on, the per-epoch check and best.pt use the averaged weights")


def _data_arguments(parser, spec):
    group = parser.add_argument_group("data and evaluation")
    group.add_argument("--dataset", choices=spec.dataset_choices, default=spec.default_dataset)
    group.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="where datasets live (CIFAR downloads here)")
    group.add_argument("--train-size", type=int, default=None,
                       help="train on a fixed random subset of this many images (synthetic: generate this many)")
    group.add_argument("--image-size", type=int, default=None, help="side of the synthetic images (synthetic only)")
    group.add_argument("--eval-size", type=int, default=1000,
                       help="fixed test subset evaluated every epoch (0: the whole test set)")
    group.add_argument("--eval-steps", type=int, default=recipe.EVAL_STEPS, help="steps of the per-epoch PGD evaluation")
    group.add_argument("--val-size", type=int, default=0,
                       help="hold out this many training images to choose best.pt (0: choose on the test subset)")


def _run_arguments(parser):
    group = parser.add_argument_group("run directory")
    group.add_argument("--out-dir", default="runs", help="parent folder of run directories")
    group.add_argument("--run-name", default=None, help="default: <dataset>_<arch>_<method>_s<seed>")
    group.add_argument("--resume", default=None, metavar="PATH",
                       help="continue a run: its directory (uses last.pt) or a checkpoint file; an interrupted "
                            "epoch restarts from the epoch-end checkpoint. --lr, --momentum, --weight-decay, "
                            "--milestones and --epochs given with it apply from the next epoch")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    group.add_argument("--save-freq", type=int, default=10, help="also keep epoch_N.pt every this many epochs")
    group.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python random")
    group.add_argument("--device", choices=DEVICES, default="auto")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    group.add_argument("--smoke", action="store_true",
                       help="tiny synthetic run of the whole pipeline (2 epochs, a few batches, 2-step attacks); "
                            "replaces its own run directory, never a run that is not a smoke run")
    several = parser.add_argument_group("several processes (launch with torchrun --nproc_per_node=N)")
    several.add_argument("--per-rank-batch", action="store_true",
                         help="--batch-size is per process (global batch = N x --batch-size); by default "
                              "--batch-size is the global batch, split across the N processes")
    several.add_argument("--sync-bn", action="store_true",
                         help="SyncBatchNorm: training BN statistics over the global batch instead of each shard")


def build_parser(kind):
    """The argument parser of script ``kind`` (errors are one line, exit code 2)."""
    spec = KINDS[kind]
    parser = OneLineArgumentParser(description=spec.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_arguments(parser, kind)
    _recipe_arguments(parser)
    _data_arguments(parser, spec)
    _run_arguments(parser)
    add_speed_arguments(parser.add_argument_group(
        "speed (same mathematics; defaults: bf16 on CUDA, fp32 on CPU; channels-last with bf16)"))
    return parser


def parse_args(kind, argv=None):
    """Parse ``argv``; returns ``(args, checkpoint payload or None, run_dir or None)``.

    ``--smoke`` and ``--resume`` replace the parser's defaults (smoke settings, or the resumed
    run's arguments) and the command line is parsed again, so explicit options still win.
    """
    parser = build_parser(kind)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parser.parse_args(argv)
    payload = run_dir = None
    if first.resume:
        run_dir, checkpoint_path = resolve_resume(first.resume)
        payload = load_training_checkpoint(checkpoint_path)
        resume.refuse_folder_options(resume.explicit_options(parser, argv), first, run_dir, payload["args"])
        known = vars(parser.parse_args([]))
        parser.set_defaults(**{k: v for k, v in payload["args"].items()
                               if k in known and k not in resume.NOT_RESTORED})
    elif first.smoke:
        parser.set_defaults(**dict(SMOKE_DEFAULTS, image_size=KINDS[kind].smoke_image_size))
    return parser.parse_args(argv), payload, run_dir


def architecture(kind, args):
    """The canonical architecture name the options ask for (``--depth/--widen`` for WRN)."""
    if kind != "wideresnet":
        return canonical_arch(args.arch)
    if args.arch is None:
        return f"wrn-{args.depth or 34}-{args.widen or 10}"
    arch = canonical_arch(args.arch)
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if match and (args.depth not in (None, int(match[1])) or args.widen not in (None, int(match[2]))):
        raise ConfigError(f"--arch {arch} disagrees with --depth {args.depth} / --widen {args.widen}; give one of them")
    return arch


def check_arch_fits(kind, arch, resumed=None):
    """Refuse an architecture the script is not for (``resumed``: the checkpoint being resumed)."""
    spec = KINDS[kind]
    if re.fullmatch(spec.arch_pattern, arch):
        return
    trains = "wrn-D-K" if kind == "wideresnet" else spec.default_arch
    if resumed is not None:
        raise ConfigError(f"cannot resume {resumed}: it holds a {arch} model and this script trains {trains} "
                          f"models; resume it with the script that created it")
    raise ConfigError(f"this script trains {trains} models, not {arch}; use train_baselines.py --arch {arch} "
                      f"for other architectures")


FLOAT_OPTIONS = ("lr", "momentum", "weight_decay", "step_size", "eps", "awp_gamma", "ema", "alpha", "zeta",
                 "aux_weight", "beta")
NON_NEGATIVE = ("zeta", "aux_weight", "beta")


def _check_floats(args):
    """Every float option is a finite number (also those a resumed run's args.json supplies) and
    the loss weights are >= 0; the other ranges are checked where the values are used."""
    for name in FLOAT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
        if name in NON_NEGATIVE and value is not None and value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} is a loss weight and must be >= 0, got {value}")


def check_run_name(name):
    """A run name is one plain folder name: not empty, no path separator, not ``.`` or ``..``."""
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if not name or name in (".", "..") or any(sep in name for sep in separators) or name != name.strip():
        raise ConfigError(f"--run-name {name!r} is not a plain folder name; give a name such as my_run "
                          f"(no '/', not empty, '.' or '..'): the run folder is --out-dir/NAME")


def _check_ranges(args):
    """Option ranges; each message names the option and what it accepts."""
    _check_floats(args)
    for name in ("batch_size", "epochs", "attack_steps", "eval_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_size < 0 or args.val_size < 0 or (args.train_size is not None and args.train_size < 1):
        raise ConfigError("--eval-size and --val-size must be >= 0 and --train-size >= 1")
    milestones = list(args.milestones)
    if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 1 for m in milestones):
        raise ConfigError(f"--milestones must be strictly increasing positive epochs (each decays the lr once), "
                          f"got {' '.join(map(str, milestones))}")
    if args.awp_gamma < 0 or (args.awp_warmup is not None and args.awp_warmup < 0):
        raise ConfigError("--awp-gamma and --awp-warmup must be >= 0 (0 turns AWP off)")
    if not 0 <= args.ema < 1:
        raise ConfigError(f"--ema is a decay in [0, 1) such as 0.999 (0 = off), got {args.ema}")
    if args.image_size < 1:
        raise ConfigError("--image-size must be at least 1")


def _arch_weight_decay(arch):
    """The architecture's default weight decay from the model registry (an unknown name is a ConfigError)."""
    try:
        return arch_info(arch).weight_decay
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_args(kind, args):
    """Fill the defaults that depend on other options and check the combination."""
    spec = KINDS[kind]
    args.arch = architecture(kind, args)
    args.eps = eps_fraction(args.eps)  # runs saved before ε was stored as a fraction hold pixel units (8.0)
    args.reverse_attention = spec.ancra and not args.no_ra
    args.anc = spec.ancra and not args.no_anc
    args.data_seed = DATA_SEED
    method = get_method(args.method)
    if args.weight_decay is None:
        tiny = args.dataset == "tiny-imagenet"
        args.weight_decay = recipe.TINY_IMAGENET_WEIGHT_DECAY if tiny else _arch_weight_decay(args.arch)
    args.separate_bn = bool(getattr(args, "separate_bn", False))
    if args.separate_bn and not args.reverse_attention:
        raise ConfigError("--separate-bn only changes RA models (the BatchNorm shared by the RA blocks); drop it or --no-ra")
    if args.attack_loss is None:
        args.attack_loss = method.attack_loss(args.anc, args.reverse_attention)
    if args.awp_warmup is None:
        args.awp_warmup = method.awp_warmup
    if args.image_size is None:
        args.image_size = data.image_size(args.dataset)
    elif args.dataset != "synthetic" and args.image_size != data.image_size(args.dataset):
        raise ConfigError(f"--image-size only applies to the synthetic dataset; {args.dataset} images are "
                          f"{data.image_size(args.dataset)} pixels wide")
    _check_ranges(args)
    schedule_of(args)  # validates lr, momentum and weight decay
    args.method_name = method_config(args).name(args.reverse_attention)
    if args.run_name is None:
        prefix = "smoke_" if args.smoke else ""
        suffix = "_sepbn" if args.separate_bn else ""
        args.run_name = f"{prefix}{args.dataset}_{args.arch}_{args.method_name}{suffix}_s{args.seed}"
    check_run_name(args.run_name)
    return args


def main(kind, argv=None):
    """Entry point of the train_* scripts; returns the process exit code."""
    finished = False
    try:
        args, payload, run_dir = parse_args(kind, argv)
        resolve_args(kind, args)
        if payload is not None:
            check_resume(payload, args)
        check_arch_fits(kind, args.arch, args.resume)
        run(args, payload, run_dir)
        finished = True
    except (data.DatasetError, CheckpointError, RunDirError, ConfigError, LockError,
            distributed.DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("aborted without saving this epoch", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(wait=finished)
    return 0
