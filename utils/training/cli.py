"""Command line shared by the four train_* scripts: one parser builder, one ``main``.

A script only names its kind (``resnet``, ``wideresnet``, ``tiny``, ``baselines``); the kind
fixes the architecture options, the dataset choices and whether the model is ANCRA (RA model,
ANC on) or a plain baseline. ``--smoke`` swaps the defaults for a tiny synthetic run;
``--resume`` takes the defaults from the run being resumed, so only changed options need
repeating.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models import ARCH_HELP, CheckpointError, create_model, unwrap
from utils import data, distributed
from utils.attacks import EPS
from utils.cli import add_speed_arguments, eps_fraction, eps_type
from utils.checkpoint import (RunDirError, atomic_write_json, load_training_checkpoint, prepare_run_dir,
                              resolve_resume, seed_everything)
from utils.training.config import EvalConfig, MethodConfig, SpeedConfig, prepare_model, resolve_device
from utils.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from utils.training.records import RunInfo
from utils.training.schedule import Schedule, build_optimizer, build_scheduler
from utils.training.step import TrainStep
from utils.training.trainer import Trainer
from utils.training.negatives import STRATEGIES

EVAL_BATCH = 256
NOT_RESTORED_ON_RESUME = ("resume", "overwrite", "smoke", "world_size")
SMOKE_DEFAULTS = dict(dataset="synthetic", train_size=32, image_size=8, batch_size=16, epochs=2, milestones=[2],
                      eval_size=32, eval_steps=2, attack_steps=2, save_freq=2, overwrite=True)


@dataclass(frozen=True)
class ScriptKind:
    """What distinguishes one train_* script from another."""

    description: str
    datasets: tuple
    default_dataset: str
    ancra: bool            # RA model + ANC by default, with --no-anc / --no-ra ablations
    methods: tuple
    default_method: str
    smoke_image_size: int = 16


KINDS = {
    "resnet": ScriptKind("Train ResNet-18 with ANCRA (PGD-AT / TRADES / MART + ANC + RA) on CIFAR-10/100.",
                         ("cifar10", "cifar100", "synthetic"), "cifar10", True, ("trades", "pgd-at", "mart"), "trades"),
    "wideresnet": ScriptKind("Train a WideResNet (default WRN-34-10) with ANCRA on CIFAR-10/100.",
                             ("cifar10", "cifar100", "synthetic"), "cifar10", True, ("trades", "pgd-at", "mart"),
                             "trades"),
    "tiny": ScriptKind("Train PreActResNet-18 with ANCRA on Tiny-ImageNet (200 classes, 64x64).",
                       ("tiny-imagenet", "synthetic"), "tiny-imagenet", True, ("trades", "pgd-at", "mart"), "trades",
                       smoke_image_size=32),
    "baselines": ScriptKind("Train vanilla PGD-AT / TRADES / MART (or standard training) on a plain model.",
                            tuple(data.DATASETS), "cifar10", False, ("pgd-at", "trades", "mart", "standard"),
                            "pgd-at"),
}


def build_parser(kind):
    """The argument parser of script ``kind``."""
    spec = KINDS[kind]
    parser = argparse.ArgumentParser(description=spec.description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model and method")
    if kind == "wideresnet":
        model.add_argument("--depth", type=int, default=34, help="WRN depth (6n+4: 34, 28, ...)")
        model.add_argument("--widen", type=int, default=10, help="WRN widen factor")
    if kind == "baselines":
        model.add_argument("--arch", default="resnet18", help=ARCH_HELP)
    model.add_argument("--method", choices=spec.methods, default=spec.default_method,
                       help="training method" + (" (ANCRA variant unless --no-anc/--no-ra)" if spec.ancra else ""))
    if spec.ancra:
        model.add_argument("--no-anc", action="store_true", help="ablation: no asymmetric negative contrast")
        model.add_argument("--no-ra", action="store_true", help="ablation: plain model without reverse attention")
        model.add_argument("--strategy", choices=STRATEGIES, default="random_adv",
                           help="negative (other-class example) strategy; non-random ones use random for epochs <= 10")
        model.add_argument("--alpha", type=float, default=1.0, help="ANC asymmetry (1: only the negative moves)")
        model.add_argument("--zeta", type=float, default=3.0, help="weight of the ANC term")
        model.add_argument("--aux-weight", type=float, default=2.0,
                           help="lambda: weight of the RA heads in losses and training attacks")
    model.add_argument("--beta", type=float, default=None, help="TRADES/MART robust-term weight (default 6 / 5)")
    model.add_argument("--attack-loss", choices=("ce", "kl"), default=None,
                       help="loss of the training adversarial examples (default: kl for vanilla TRADES, else ce)")

    recipe = parser.add_argument_group("training recipe (defaults: the paper's, SPEC section 5)")
    recipe.add_argument("--epochs", type=int, default=120)
    recipe.add_argument("--batch-size", type=int, default=128)
    recipe.add_argument("--lr", type=float, default=0.01,
                        help="initial learning rate (the paper's 0.01 for every dataset; the reference "
                             "Tiny-ImageNet script used 0.1)")
    recipe.add_argument("--momentum", type=float, default=0.9)
    recipe.add_argument("--weight-decay", type=float, default=None,
                        help="default 5e-4 for Tiny-ImageNet / PreActResNet-18, 2e-4 otherwise")
    recipe.add_argument("--milestones", type=int, nargs="*", default=[75, 90, 100],
                        help="epochs after which the lr is multiplied by 0.1")
    recipe.add_argument("--eps", type=eps_type, default=EPS, help="L-inf radius: 8/255 (default), 0.031 or 8 (pixel units)")
    recipe.add_argument("--step-size", type=float, default=0.007, help="PGD step of training attacks and evaluation")
    recipe.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the training attacks")

    dataset = parser.add_argument_group("data and evaluation")
    dataset.add_argument("--dataset", choices=spec.datasets, default=spec.default_dataset)
    dataset.add_argument("--data-dir", default=data.DEFAULT_DATA_DIR, help="where datasets live (CIFAR downloads here)")
    dataset.add_argument("--train-size", type=int, default=None,
                         help="train on a fixed random subset of this many images (synthetic: generate this many)")
    dataset.add_argument("--image-size", type=int, default=None, help="side of the synthetic images (synthetic only)")
    dataset.add_argument("--eval-size", type=int, default=1000,
                         help="fixed test subset evaluated every epoch (0: the whole test set)")
    dataset.add_argument("--eval-steps", type=int, default=20, help="steps of the per-epoch PGD evaluation")
    dataset.add_argument("--val-size", type=int, default=0,
                         help="hold out this many training images to choose best.pt (0: choose on the test subset)")

    run = parser.add_argument_group("run directory")
    run.add_argument("--out-dir", default="runs", help="parent folder of run directories")
    run.add_argument("--run-name", default=None, help="default: <dataset>_<arch>_<method>_s<seed>")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="continue a run: its directory (uses last.pt) or a checkpoint file")
    run.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    run.add_argument("--save-freq", type=int, default=10, help="also keep epoch_N.pt every this many epochs")
    run.add_argument("--seed", type=int, default=0, help="seeds torch, numpy and python random")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--smoke", action="store_true",
                     help="tiny synthetic run of the whole pipeline (2 epochs, a few batches, 2-step attacks); "
                          "overwrites its own run directory")

    several = parser.add_argument_group("several processes (launch with torchrun --nproc_per_node=N)")
    several.add_argument("--per-rank-batch", action="store_true",
                         help="--batch-size is per process (global batch = N x --batch-size); by default "
                              "--batch-size is the global batch, split across the N processes")
    several.add_argument("--sync-bn", action="store_true",
                         help="SyncBatchNorm: training BN statistics over the global batch instead of each shard")

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
        known = vars(parser.parse_args([]))
        parser.set_defaults(**{k: v for k, v in payload["args"].items()
                               if k in known and k not in NOT_RESTORED_ON_RESUME})
    elif first.smoke:
        parser.set_defaults(**dict(SMOKE_DEFAULTS, image_size=KINDS[kind].smoke_image_size))
    return parser.parse_args(argv), payload, run_dir


def architecture(kind, args):
    """Architecture name for the script kind and options."""
    if kind == "resnet":
        return "resnet18"
    if kind == "wideresnet":
        return f"wrn-{args.depth}-{args.widen}"
    if kind == "tiny":
        return "preact-resnet18"
    return args.arch.lower()


def resolve_args(kind, args):
    """Fill the defaults that depend on other options and check the combination."""
    spec = KINDS[kind]
    args.arch = architecture(kind, args)
    args.eps = eps_fraction(args.eps)  # runs saved before ε was stored as a fraction hold pixel units (8.0)
    args.reverse_attention = spec.ancra and not args.no_ra
    args.anc = spec.ancra and not args.no_anc
    if args.weight_decay is None:
        args.weight_decay = 5e-4 if (args.dataset == "tiny-imagenet" or args.arch == "preact-resnet18") else 2e-4
    if args.attack_loss is None:
        args.attack_loss = "kl" if (not spec.ancra and args.method == "trades") else "ce"
    if args.image_size is None:
        args.image_size = data.image_size(args.dataset)
    elif args.dataset != "synthetic" and args.image_size != data.image_size(args.dataset):
        raise ConfigError(f"--image-size only applies to the synthetic dataset; {args.dataset} images are "
                          f"{data.image_size(args.dataset)} pixels wide")
    for name in ("batch_size", "epochs", "attack_steps", "eval_steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_size < 0 or args.val_size < 0 or (args.train_size is not None and args.train_size < 1):
        raise ConfigError("--eval-size and --val-size must be >= 0 and --train-size >= 1")
    if sorted(args.milestones) != list(args.milestones) or any(m < 1 for m in args.milestones):
        raise ConfigError(f"--milestones must be increasing positive epochs, got {args.milestones}")
    args.method_name = method_config(args).name(args.reverse_attention)
    if args.run_name is None:
        prefix = "smoke_" if args.smoke else ""
        args.run_name = f"{prefix}{args.dataset}_{args.arch}_{args.method_name}_s{args.seed}"
    return args


def method_config(args):
    """The engine's MethodConfig for parsed ``args``."""
    return MethodConfig(method=args.method, anc=args.anc, strategy=getattr(args, "strategy", "random_adv"),
                        alpha=getattr(args, "alpha", 1.0), zeta=getattr(args, "zeta", 3.0), beta=args.beta,
                        aux_weight=getattr(args, "aux_weight", 2.0), attack_loss=args.attack_loss,
                        eps=args.eps, step_size=args.step_size, steps=args.attack_steps)


def speed_config(args, device):
    """The engine's SpeedConfig: per-device defaults, overridden by explicit flags."""
    return SpeedConfig.for_device(device, amp=args.amp, channels_last=args.channels_last,
                                  joint_attacks=args.joint_attacks, compile=args.compile)


def model_config(args):
    """The ``model_config`` stored in checkpoints (read back by ``models.load_model``)."""
    return {"arch": args.arch, "num_classes": data.num_classes(args.dataset),
            "reverse_attention": args.reverse_attention, "image_size": args.image_size}


def _describe(config):
    kind = "an RA" if config.get("reverse_attention") else "a plain"
    return f"{kind} {config.get('arch')} with {config.get('num_classes')} classes on {config.get('image_size')}px images"


def check_resume_model(payload, wanted, path):
    """Refuse to resume a checkpoint whose model differs from the one these options build."""
    saved = payload["model_config"]
    if any(saved.get(k) != wanted[k] for k in ("arch", "num_classes", "reverse_attention", "image_size")):
        raise CheckpointError(f"cannot resume {path}: it holds {_describe(saved)} but this script and its options "
                              f"build {_describe(wanted)}; resume it with the script and options that created it")


def load_splits(args):
    """``(train, val or None, test subset)`` TensorPairs for ``args``."""
    synthetic = dict(synthetic_image_size=args.image_size, seed=0)
    train = data.load_dataset(args.dataset, args.data_dir, "train", synthetic_size=args.train_size, **synthetic)
    test = data.load_dataset(args.dataset, args.data_dir, "test", **synthetic)
    if args.train_size is not None:
        train = data.fixed_subset(train, args.train_size, seed=0)
    val = None
    if args.val_size:
        if args.val_size >= len(train):
            raise ConfigError(f"--val-size {args.val_size} leaves no training data ({len(train)} images)")
        train, val = data.split_holdout(train, args.val_size, args.seed)
    return train, val, data.fixed_subset(test, args.eval_size or None, seed=0)


def build_model(args, device):
    """The model the options describe, on ``device``."""
    try:
        model = create_model(args.arch, data.num_classes(args.dataset), args.reverse_attention, args.image_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model.to(device)


def rank_batch(args, context):
    """This process's batch size: the global --batch-size split evenly, or --per-rank-batch as is."""
    if args.per_rank_batch or not context.enabled:
        return args.batch_size
    if args.batch_size % context.world_size:
        raise ConfigError(f"--batch-size {args.batch_size} cannot be split over {context.world_size} processes; "
                          f"use a multiple of {context.world_size} or --per-rank-batch")
    return args.batch_size // context.world_size


def probe_loss(model, args, device):
    """A scalar depending on every parameter a training forward uses (for freezing unused ones)."""
    x = torch.zeros(2, 3, args.image_size, args.image_size, device=device)
    if args.reverse_attention:
        logits, aux = model(x, torch.zeros(2, dtype=torch.long, device=device), return_aux=True)
        return sum(o.sum() for o in [logits, *aux])
    return model(x).sum()


def distributed_model(model, args, context, device):
    """DDP around ``model`` (unused parameters frozen first), or ``model`` itself in a single process."""
    if context.enabled:
        frozen = distributed.freeze_unused_parameters(model, lambda: probe_loss(model, args, device))
        if frozen and context.is_main:
            print(f"parameters unused by the forward pass, frozen for DDP: {', '.join(frozen)}", file=sys.stderr)
    return distributed.wrap(context, model, device, sync_bn=args.sync_bn)


def run(kind, args, payload=None, run_dir=None):
    """Train as ``args`` say (resuming ``payload`` when given); returns the epoch records.
    Under torchrun every process runs this; rank 0 alone writes the run folder."""
    resolve_args(kind, args)
    context = distributed.from_env()
    args.world_size = context.world_size
    batch = rank_batch(args, context)
    device = distributed.init(context, args.device) if context.enabled else resolve_device(args.device)
    if args.sync_bn:
        distributed.check_sync_bn(context, device)
    wanted = model_config(args)
    if payload is not None:
        check_resume_model(payload, wanted, args.resume)
        run_dir = Path(run_dir)
    else:
        run_dir = Path(args.out_dir) / args.run_name
        distributed.run_on_main(context, lambda: prepare_run_dir(run_dir, overwrite=args.overwrite))
    splits = distributed.run_on_main(context, lambda: load_splits(args))  # rank 0 downloads first
    train, val, test = splits if context.is_main else load_splits(args)
    seed_everything(args.seed)
    speed = speed_config(args, device)
    model = distributed_model(prepare_model(build_model(args, device), speed), args, context, device)
    schedule = Schedule(args.lr, args.momentum, args.weight_decay, tuple(args.milestones))
    optimizer = build_optimizer(model, schedule)
    if not args.sync_bn:
        distributed.share_buffers_each_step(context, unwrap(model), optimizer)
    step = TrainStep(model, optimizer, method_config(args), data.num_classes(args.dataset), speed)
    shard = dict(rank=context.rank, world_size=context.world_size)
    eval_loader = lambda split: data.BatchLoader(split, EVAL_BATCH, shuffle=False, augment=False,  # noqa: E731
                                                 device=device, pad=False, **shard)
    loaders = {"test": eval_loader(test)}
    if val is not None:
        loaders["val"] = eval_loader(val)
    train_loader = data.BatchLoader(train, batch, shuffle=True, augment=data.default_augment(args.dataset),
                                    device=device, seed=args.seed, **shard)
    saved_args = dict(vars(args))
    info = RunInfo(run_dir if context.is_main else None, saved_args, wanted,
                   title=f"{args.run_name} ({args.method_name})")
    eval_config = EvalConfig(eps=args.eps, step_size=args.step_size, steps=args.eval_steps)
    reseed = (lambda epoch: seed_everything(distributed.epoch_seed(args.seed, context.rank, epoch))
              if context.enabled else None)
    trainer = Trainer(step, build_scheduler(optimizer, schedule), train_loader, loaders, info, epochs=args.epochs,
                      eval_config=eval_config, save_freq=args.save_freq, quiet=args.quiet, context=context,
                      reseed=reseed)
    if context.is_main:
        atomic_write_json(run_dir / "args.json", saved_args)
    processes = (f" | {context.world_size} processes x batch {batch} (global {batch * context.world_size})"
                 + (", SyncBatchNorm" if args.sync_bn else "") if context.enabled else "")
    trainer.log(f"{args.method_name} | {args.arch} on {args.dataset} ({len(train)} train, "
                f"{len(val) if val is not None else 0} val, {len(test)} test images) | device {device} "
                f"({speed.describe()}){processes} | run {run_dir}")
    if payload is not None:
        changed = [f"{k} {payload['args'].get(k)!r} -> {v!r}" for k, v in saved_args.items()
                   if k in payload["args"] and payload["args"][k] != v and k not in NOT_RESTORED_ON_RESUME]
        trainer.log(f"resuming {args.resume} (epoch {payload['epoch']})"
                    + (f" with changed options: {', '.join(changed)}" if changed else ""))
    start = trainer.restore(payload) if payload is not None else 1
    return trainer.fit(start)


def main(kind, argv=None):
    """Entry point of the train_* scripts; returns the process exit code."""
    finished = False
    try:
        args, payload, run_dir = parse_args(kind, argv)
        run(kind, args, payload, run_dir)
        finished = True
    except (data.DatasetError, CheckpointError, RunDirError, ConfigError, distributed.DistributedError) as err:
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

