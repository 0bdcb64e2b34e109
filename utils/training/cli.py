"""The one training command line: ``train.py`` and the four paper scripts are the same entry
with different defaults (:class:`Defaults`).

``--method NAME`` takes any registered method with the ``-anc``, ``-ra`` or ``-ancra`` suffix
(``trades-ancra``); a paper script's bare name means its ANCRA variant, ablated with
``--no-anc`` / ``--no-ra``. ``--smoke`` swaps the defaults for a tiny synthetic run; ``--resume``
takes the defaults from the run being resumed, so only changed options need repeating. The
command line is turned once into a typed :class:`~utils.training.config.TrainConfig`
(:func:`resolve`), checked before any folder is created or deleted.
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
from utils.cli import (
    OneLineArgumentParser,
    add_device_argument,
    add_speed_arguments,
    eps_fraction,
    eps_type,
    explicit_options,
    finite_float,
)
from utils.locks import LockError
from utils.training import resume
from utils.training.ancra import (
    STRATEGIES,
    find_method,
    format_method_name,
    get_method,
    method_names,
    parse_method_name,
    split_method_suffix,
)
from utils.training.config import (
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    SpeedOptions,
    TrainConfig,
)
from utils.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from utils.training.schedule import Schedule
from utils.training.setup import check_resume, run

# 8 batches per epoch: two epochs of 2 batches left BatchNorm's running statistics at their
# initial values, so the eval-mode smoke model ignored its input (issue 31)
SMOKE_DEFAULTS = {"dataset": "synthetic", "train_size": 64, "batch_size": 8, "epochs": 2, "milestones": [2],
                  "eval_size": 32, "eval_steps": 2, "attack_steps": 2, "save_freq": 2, "overwrite": True,
                  "awp_warmup": 0}  # with --awp-gamma, AWP runs from the first smoke epoch
DATA_SEED = 0  # seed of the synthetic data and of the fixed subsets (read back by the evaluation)


@dataclass(frozen=True)
class Defaults:
    """What one training command defaults to; every command takes every option.

    ``ancra``: a bare ``--method NAME`` means NAME with ANC and RA (the paper scripts, whose
    ``--no-anc`` / ``--no-ra`` give the ablations); otherwise a bare name is the vanilla method.
    ``smoke_image_size``: side of the synthetic images of ``--smoke``.
    """

    description: str
    arch: str = "resnet18"
    dataset: str = "cifar10"
    method: str = "trades-ancra"
    ancra: bool = False
    smoke_image_size: int = 16


def method_type(text):
    """argparse type of ``--method``: a registered method, optionally with -anc, -ra or -ancra."""
    try:
        parse_method_name(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return str(text).lower()


def _model_arguments(parser, defaults):
    model = parser.add_argument_group("model and method")
    model.add_argument("--arch", default=defaults.arch, help=f"architecture: {arch_help()}")
    model.add_argument("--depth", type=int, default=None,
                       help="WRN depth (6n+4: 34, 28, ...); shorthand for --arch wrn-DEPTH-WIDEN (widen 10 unless given)")
    model.add_argument("--widen", type=int, default=None,
                       help="WRN widen factor; shorthand for --arch wrn-DEPTH-WIDEN (depth 34 unless given)")
    bare = "its ANCRA variant (--no-anc / --no-ra for the ablations)" if defaults.ancra else "the vanilla method"
    model.add_argument("--method", type=method_type, default=defaults.method,
                       help=f"training method: {', '.join(method_names())}, optionally with -anc, -ra or -ancra "
                            f"(e.g. trades-ancra); a bare name is {bare}")
    model.add_argument("--no-anc", action="store_true", help="without asymmetric negative contrast (ablation)")
    model.add_argument("--no-ra", action="store_true", help="plain model without reverse attention (ablation)")
    model.add_argument("--strategy", choices=STRATEGIES, default="random_adv",
                       help=f"ANC: negative (other-class example) strategy; non-random ones use random for "
                            f"epochs <= {recipe.NEGATIVE_WARMUP_EPOCHS}")
    model.add_argument("--alpha", type=finite_float, default=recipe.ALPHA, help="ANC asymmetry (1: only the negative moves)")
    model.add_argument("--zeta", type=finite_float, default=recipe.ZETA, help="ANC: weight of the ANC term")
    model.add_argument("--aux-weight", type=finite_float, default=recipe.AUX_WEIGHT,
                       help="RA: lambda, weight of the RA heads in losses and training attacks")
    model.add_argument("--separate-bn", action="store_true",
                       help="RA ablation (WRN, PreActResNet-18): each RA block gets its own BatchNorm instead of "
                            "sharing the network's final one (the reference shares it)")
    model.add_argument("--beta", type=finite_float, default=None, help="TRADES/MART robust-term weight (default 6 / 5)")


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


def _data_arguments(parser, defaults):
    group = parser.add_argument_group("data and evaluation")
    group.add_argument("--dataset", choices=tuple(data.DATASETS), default=defaults.dataset,
                       help="any registered dataset (utils/data.py)")
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
    add_device_argument(group)
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


def build_parser(defaults: Defaults):
    """The argument parser of a training command (errors are one line, exit code 2)."""
    parser = OneLineArgumentParser(description=defaults.description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_arguments(parser, defaults)
    _recipe_arguments(parser)
    _data_arguments(parser, defaults)
    _run_arguments(parser)
    add_speed_arguments(parser.add_argument_group(
        "speed (same mathematics; defaults: bf16 on CUDA, fp32 on CPU; channels-last with bf16)"))
    return parser


def parse_args(defaults: Defaults, argv=None):
    """Parse ``argv``; returns ``(args, explicit option names, checkpoint payload or None, run_dir or None)``.

    ``--smoke`` and ``--resume`` replace the parser's defaults (smoke settings, or the resumed
    run's options: its method with its ANC/RA choice, whichever command resumes it) and the
    command line is parsed again, so explicit options still win.
    """
    parser = build_parser(defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parser.parse_args(argv)
    explicit = explicit_options(parser, argv)
    payload = run_dir = None
    if first.resume:
        run_dir, checkpoint_path = resolve_resume(first.resume)
        payload = load_training_checkpoint(checkpoint_path)
        saved = payload["args"]
        resume.refuse_folder_options(explicit, first, run_dir, saved)
        known = vars(parser.parse_args([]))
        restored = {k: v for k, v in saved.items() if k in known and k not in resume.NOT_RESTORED}
        if find_method(saved.get("method")) is not None:
            restored["method"] = format_method_name(saved["method"], saved.get("anc"), saved.get("reverse_attention"))
        parser.set_defaults(**restored)
    elif first.smoke:
        parser.set_defaults(**dict(SMOKE_DEFAULTS, image_size=defaults.smoke_image_size))
    return parser.parse_args(argv), explicit, payload, run_dir


def architecture(args, explicit=frozenset()):
    """The canonical architecture the options ask for: ``--arch``, or ``--depth/--widen`` as
    shorthand for ``wrn-DEPTH-WIDEN`` when ``--arch`` is not on the command line (``explicit``)."""
    if args.depth is None and args.widen is None:
        return canonical_arch(args.arch)
    if "arch" not in explicit:
        return f"wrn-{args.depth or 34}-{args.widen or 10}"
    arch = canonical_arch(args.arch)
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if not match or args.depth not in (None, int(match[1])) or args.widen not in (None, int(match[2])):
        raise ConfigError(f"--arch {arch} disagrees with --depth {args.depth} / --widen {args.widen}; give one of them")
    return arch


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
    if args.image_size is not None and args.image_size < 1:
        raise ConfigError("--image-size must be at least 1")


def _arch_info(arch):
    """The architecture's registry entry (an unknown name is a ConfigError)."""
    try:
        return arch_info(arch)
    except ValueError as err:
        raise ConfigError(str(err)) from None


ANC_OPTIONS = ("strategy", "alpha", "zeta")
RA_OPTIONS = ("aux_weight",)


def _method(defaults, args, explicit, arch):
    """``(method, anc, reverse_attention)`` from --method (a bare name: the command's default
    variant), --no-anc / --no-ra, and the architecture; options that would do nothing are refused."""
    method, anc, ra = parse_method_name(args.method)
    if split_method_suffix(args.method)[1] is None and defaults.ancra:
        anc, ra = get_method(method).allows_anc, True
    anc, ra = anc and not args.no_anc, ra and not args.no_ra
    if ra and not arch.supports_ra:
        raise ConfigError(f"{arch.name} has no reverse-attention variant; train it without RA "
                          f"(--method {format_method_name(method, anc, False)} or --no-ra)")
    unused = [name for name in ANC_OPTIONS if name in explicit and not anc]
    unused += [name for name in RA_OPTIONS if name in explicit and not ra]
    if unused:
        options = " and ".join(f"--{name.replace('_', '-')}" for name in unused)
        raise ConfigError(f"{options} only change{'s' if len(unused) == 1 else ''} "
                          f"{'ANC' if set(unused) <= set(ANC_OPTIONS) else 'ANC/RA'} training, and "
                          f"{format_method_name(method, anc, ra)} has none; drop {options} or pick a method "
                          f"with it (e.g. --method {format_method_name(method, get_method(method).allows_anc, True)})")
    return method, anc, ra


def resolve(defaults: Defaults, args, explicit=frozenset()):
    """The :class:`TrainConfig` that ``args`` ask for: the defaults that depend on other options
    filled in, every range and combination checked (ConfigError names the option)."""
    arch = _arch_info(architecture(args, explicit))
    method, anc, ra = _method(defaults, args, explicit, arch)
    if args.separate_bn and not ra:
        raise ConfigError("--separate-bn only changes RA models (the BatchNorm shared by the RA blocks); drop it or --no-ra")
    _check_ranges(args)
    image_size = args.image_size or data.image_size(args.dataset)
    if args.dataset != "synthetic" and image_size != data.image_size(args.dataset):
        raise ConfigError(f"--image-size only applies to the synthetic dataset; {args.dataset} images are "
                          f"{data.image_size(args.dataset)} pixels wide")
    eps = eps_fraction(args.eps)  # runs saved before ε was stored as a fraction hold pixel units (8.0)
    weight_decay = args.weight_decay
    if weight_decay is None:
        weight_decay = recipe.TINY_IMAGENET_WEIGHT_DECAY if args.dataset == "tiny-imagenet" else arch.weight_decay
    unit = get_method(method)
    method_config = MethodConfig(
        method=method, anc=anc, ra=ra, strategy=args.strategy, alpha=args.alpha, zeta=args.zeta, beta=args.beta,
        aux_weight=args.aux_weight, eps=eps, step_size=args.step_size, attack_steps=args.attack_steps)
    model = ModelConfig(arch=arch.name, num_classes=data.num_classes(args.dataset), reverse_attention=ra,
                        image_size=image_size, separate_bn=bool(args.separate_bn))
    data_config = DataConfig(dataset=args.dataset, data_dir=args.data_dir, image_size=image_size,
                             train_size=args.train_size, eval_size=args.eval_size, val_size=args.val_size,
                             seed=DATA_SEED)
    schedule = ScheduleConfig(
        epochs=args.epochs, batch_size=args.batch_size, per_rank_batch=args.per_rank_batch,
        optimizer=Schedule(args.lr, args.momentum, weight_decay, tuple(args.milestones)),
        awp_gamma=args.awp_gamma, awp_warmup=unit.awp_warmup if args.awp_warmup is None else args.awp_warmup,
        ema=args.ema)
    run_name = args.run_name
    if run_name is None:
        prefix = "smoke_" if args.smoke else ""
        suffix = "_sepbn" if args.separate_bn else ""
        run_name = f"{prefix}{args.dataset}_{arch.name}_{method_config.name(ra)}{suffix}_s{args.seed}"
    check_run_name(run_name)
    run_config = RunConfig(out_dir=args.out_dir, run_name=run_name, seed=args.seed, device=args.device,
                           save_freq=args.save_freq, resume=args.resume, overwrite=args.overwrite, smoke=args.smoke,
                           quiet=args.quiet, sync_bn=args.sync_bn)
    speed = SpeedOptions(amp=args.amp, channels_last=args.channels_last, joint_attacks=args.joint_attacks,
                         compile=args.compile)
    evaluation = EvalConfig(eps=eps, step_size=args.step_size, steps=args.eval_steps)
    return TrainConfig(method_config, model, data_config, schedule, speed, evaluation, run_config)


def main(defaults: Defaults, argv=None):
    """Entry point of train.py and the paper scripts; returns the process exit code."""
    finished = False
    try:
        args, explicit, payload, run_dir = parse_args(defaults, argv)
        config = resolve(defaults, args, explicit)
        if payload is not None:
            check_resume(payload, config)
        run(config, payload, run_dir)
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
