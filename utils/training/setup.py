"""Setting up a training run from resolved options: every check first (outputs, data, memory,
architecture), only then the run folder, locked for the whole run (one writer per folder); then
the model, the step, the trainer and the loop."""
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from models import CheckpointError, create_model, unwrap
from utils import data, distributed, recipe
from utils.checkpoint import (
    RunWriteError,
    atomic_write_json,
    check_run_dir,
    prepare_run_dir,
    read_metrics,
    remove_stale_temp_files,
    seed_everything,
)
from utils.locks import FolderLock, check_unlocked
from utils.training import resume
from utils.training.config import (
    EvalConfig,
    MethodConfig,
    SpeedConfig,
    prepare_model,
    resolve_device,
)
from utils.training.errors import ConfigError
from utils.training.records import RunInfo, write_reason
from utils.training.schedule import (
    Schedule,
    build_optimizer,
    build_scheduler,
    reschedule,
)
from utils.training.step import TrainStep
from utils.training.trainer import Trainer
from utils.training.updates import build_update

EVAL_BATCH = 256
SYNTHETIC_BYTES_PER_VALUE = 20  # float32 temporaries of the generator plus the uint8 images


def model_options(args):
    """Architecture options of ``args`` that differ from the default (``separate_bn``)."""
    return {"separate_bn": True} if getattr(args, "separate_bn", False) else {}


def model_config(args):
    """The ``model_config`` stored in checkpoints (read back by ``models.load_model``)."""
    return {"arch": args.arch, "num_classes": data.num_classes(args.dataset),
            "reverse_attention": args.reverse_attention, "image_size": args.image_size, **model_options(args)}


def _describe(config):
    kind = "an RA" if config.get("reverse_attention") else "a plain"
    options = " with separate RA BatchNorms" if config.get("separate_bn") else ""
    return (f"{kind} {config.get('arch')}{options} with {config.get('num_classes')} classes on "
            f"{config.get('image_size')}px images")


def check_resume(payload, args):
    """Refuse to resume a checkpoint whose model, method or data differ from what ``args`` ask for."""
    saved, wanted = payload["model_config"], model_config(args)
    keys = ("arch", "num_classes", "reverse_attention", "image_size", "separate_bn")
    if any(saved.get(k) != wanted.get(k) for k in keys):
        raise CheckpointError(f"cannot resume {args.resume}: it holds {_describe(saved)} but this script and its "
                              f"options build {_describe(wanted)}; resume it with the script and options that "
                              f"created it")
    resume.refuse_identity_changes(payload["args"], args)
    resume.refuse_split_changes(payload["args"], args)


def available_memory():
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_inputs(args):
    """The data folder exists (a typo is not created by a download) and a synthetic --train-size fits in memory."""
    if (args.dataset in ("cifar10", "cifar100") and args.data_dir != data.DEFAULT_DATA_DIR
            and not Path(args.data_dir).expanduser().is_dir()):
        raise ConfigError(f"--data-dir {args.data_dir} is not a folder; pass the folder that holds "
                          f"{args.dataset} (or create it first to download {args.dataset} there)")
    if args.dataset == "synthetic" and args.train_size is not None:
        need = args.train_size * 3 * args.image_size ** 2 * SYNTHETIC_BYTES_PER_VALUE
        free = available_memory()
        if free is not None and need > free:
            raise ConfigError(f"--train-size {args.train_size} needs about {need / 2 ** 30:.1f} GiB of memory for "
                              f"{args.image_size}px synthetic images but {free / 2 ** 30:.1f} GiB is available; "
                              f"use a smaller --train-size")


def check_outputs(args, context, payload, run_dir):
    """The run directory to write, checked (nothing created or deleted yet): not in use by another
    training, and for a resume a readable ``metrics.jsonl``."""
    if payload is None:
        out_dir = Path(args.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is a file, not a folder; pass the folder that should hold the runs")
        run_dir = out_dir / args.run_name
    run_dir = Path(run_dir)

    def check():
        if run_dir.is_dir():
            check_unlocked(run_dir, "a training run")
        if payload is None:
            check_run_dir(run_dir, overwrite=args.overwrite, smoke=args.smoke)
        else:
            read_metrics(run_dir)

    distributed.run_on_main(context, check)
    return run_dir


@contextmanager
def claimed_run_dir(context, run_dir, args, payload):
    """Rank 0 creates ``run_dir`` (if new), takes its lock for the duration, and only then deletes
    an overwritten run's files and the temporary files of interrupted writes. Other ranks wait
    for it and share its refusal (:class:`~utils.locks.LockError` when another process holds the lock)."""
    lock = FolderLock(run_dir, "a training run")

    def claim():
        if payload is None:
            check_run_dir(run_dir, overwrite=args.overwrite, smoke=args.smoke)
            run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        try:
            if payload is None:
                prepare_run_dir(run_dir, args.overwrite, args.smoke)
            removed = remove_stale_temp_files(run_dir)
        except BaseException:
            lock.release()
            raise
        if removed:
            print(f"note: removed {len(removed)} temporary file(s) of interrupted writes in {run_dir}: "
                  f"{', '.join(removed)}", file=sys.stderr)

    distributed.run_on_main(context, claim)
    try:
        yield run_dir
    finally:
        lock.release()


def load_splits(args):
    """``(train, val or None, test subset)`` TensorPairs for ``args``."""
    synthetic = {"synthetic_image_size": args.image_size, "seed": args.data_seed}
    train = data.load_dataset(args.dataset, args.data_dir, "train", synthetic_size=args.train_size, **synthetic)
    test = data.load_dataset(args.dataset, args.data_dir, "test", **synthetic)
    if args.train_size is not None:
        if args.train_size > len(train):
            raise ConfigError(f"--train-size {args.train_size} is more than the {len(train)} training images of "
                              f"{args.dataset}; leave it out to train on all of them")
        train = data.fixed_subset(train, args.train_size, seed=args.data_seed)
    val = None
    if args.val_size:
        if args.val_size >= len(train):
            raise ConfigError(f"--val-size {args.val_size} leaves no training data ({len(train)} images)")
        train, val = data.split_holdout(train, args.val_size, args.seed)
    return train, val, data.fixed_subset(test, args.eval_size or None, seed=args.data_seed)


def build_model(args, device):
    """The model the options describe, on ``device`` (an unknown architecture is a ConfigError)."""
    try:
        model = create_model(args.arch, data.num_classes(args.dataset), args.reverse_attention, args.image_size,
                             **model_options(args))
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


def method_config(args):
    """The step's MethodConfig for resolved ``args`` (baseline scripts have no ANC/RA options)."""
    return MethodConfig(method=args.method, anc=args.anc, strategy=getattr(args, "strategy", "random_adv"),
                        alpha=getattr(args, "alpha", recipe.ALPHA), zeta=getattr(args, "zeta", recipe.ZETA),
                        beta=args.beta, aux_weight=getattr(args, "aux_weight", recipe.AUX_WEIGHT),
                        attack_loss=args.attack_loss, eps=args.eps, step_size=args.step_size,
                        steps=args.attack_steps)


def speed_config(args, device):
    """The step's SpeedConfig: per-device defaults, overridden by explicit flags."""
    return SpeedConfig.for_device(device, amp=args.amp, channels_last=args.channels_last,
                                  joint_attacks=args.joint_attacks, compile=args.compile)


def schedule_of(args):
    """The optimiser schedule ``args`` ask for."""
    return Schedule(args.lr, args.momentum, args.weight_decay, tuple(args.milestones))


def build_trainer(args, model, splits, device, context, run_dir):
    """The step (with its weight update) and the trainer around it."""
    train, val, test = splits
    speed = speed_config(args, device)
    model = distributed_model(prepare_model(model, speed), args, context, device)
    optimizer = build_optimizer(model, schedule_of(args))
    if not args.sync_bn:
        distributed.share_buffers_each_step(context, unwrap(model), optimizer)
    update = build_update(optimizer, model, awp_gamma=args.awp_gamma, awp_warmup=args.awp_warmup, ema_decay=args.ema)
    step = TrainStep(model, optimizer, method_config(args), data.num_classes(args.dataset), speed, update)
    shard = {"rank": context.rank, "world_size": context.world_size, "device": device}
    eval_loader = lambda split: data.BatchLoader(split, EVAL_BATCH, shuffle=False, augment=False,
                                                 pad=False, **shard)
    loaders = {"test": eval_loader(test), **({"val": eval_loader(val)} if val is not None else {})}
    train_loader = data.BatchLoader(train, rank_batch(args, context), shuffle=True, seed=args.seed,
                                    augment=data.default_augment(args.dataset), **shard)
    info = RunInfo(run_dir if context.is_main else None, dict(vars(args)), model_config(args),
                   title=f"{args.run_name} ({args.method_name})")
    reseed = (lambda epoch: seed_everything(distributed.epoch_seed(args.seed, context.rank, epoch))
              if context.enabled else None)
    return Trainer(step, build_scheduler(optimizer, schedule_of(args)), train_loader, loaders, info,
                   epochs=args.epochs, eval_config=EvalConfig(eps=args.eps, step_size=args.step_size,
                                                              steps=args.eval_steps),
                   save_freq=args.save_freq, quiet=args.quiet, context=context, reseed=reseed)


def _log_start(trainer, args, splits, device, context, run_dir, payload):
    train, val, test = splits
    batch = rank_batch(args, context)
    processes = (f" | {context.world_size} processes x batch {batch} (global {batch * context.world_size})"
                 + (", SyncBatchNorm" if args.sync_bn else "") if context.enabled else "")
    trainer.log(f"{args.method_name} | {args.arch} on {args.dataset} ({len(train)} train, "
                f"{len(val) if val is not None else 0} val, {len(test)} test images) | device {device} "
                f"({trainer.step.speed.describe()}){processes} | run {run_dir}")
    beyond = [m for m in args.milestones if m > args.epochs]
    if beyond:
        trainer.log(f"note: milestone(s) {' '.join(map(str, beyond))} lie beyond --epochs {args.epochs}: they decay "
                    f"the lr only if the run is resumed with a larger --epochs")
    if payload is not None:
        changed = resume.changed_options(payload["args"], args)
        trainer.log(f"resuming {args.resume} (epoch {payload['epoch']}; the next epoch starts from this "
                    f"epoch-end checkpoint)" + (f" with changed options: {', '.join(changed)}" if changed else ""))


def run(args, payload=None, run_dir=None):
    """Train as ``args`` say (resuming ``payload`` when given); returns the epoch records.
    Under torchrun every process runs this; rank 0 alone writes the run folder."""
    if payload is not None and payload["epoch"] >= args.epochs:
        print(f"nothing to do: {args.resume} already finished {payload['epoch']} of --epochs {args.epochs} "
              f"(pass a larger --epochs to go on); nothing was changed")
        return []
    context = distributed.from_env()
    args.world_size = context.world_size
    rank_batch(args, context)
    device = distributed.init(context, args.device) if context.enabled else resolve_device(args.device)
    if args.sync_bn:
        distributed.check_sync_bn(context, device)
    run_dir = check_outputs(args, context, payload, run_dir)
    check_inputs(args)
    seed_everything(args.seed)
    model = build_model(args, device)  # the architecture is checked before any data is decoded
    splits = distributed.run_on_main(context, lambda: load_splits(args))  # rank 0 downloads first
    splits = splits if context.is_main else load_splits(args)
    with claimed_run_dir(context, run_dir, args, payload):
        trainer = build_trainer(args, model, splits, device, context, run_dir)
        if context.is_main:
            write_args(run_dir, args)
        _log_start(trainer, args, splits, device, context, run_dir, payload)
        start = 1
        if payload is not None:
            start = trainer.restore(payload)
            if resume.schedule_changed(payload["args"], args):
                trainer.scheduler = reschedule(trainer.optimizer, schedule_of(args), payload["epoch"])
        return trainer.fit(start)


def write_args(run_dir, args):
    """``args.json`` of the run (a disk-full failure leaves the previous one whole)."""
    try:
        atomic_write_json(run_dir / "args.json", dict(vars(args)))
    except OSError as err:
        raise RunWriteError(f"could not write {run_dir / 'args.json'} ({write_reason(err)}); nothing was trained: "
                            f"free space and run the command again") from err
