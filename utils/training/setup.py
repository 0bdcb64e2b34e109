"""Setting up a training run from resolved options: every check first (outputs, data, memory,
architecture), only then the run folder, locked for the whole run (one writer per folder); then
the model, the step, the trainer and the loop."""
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

from models import CheckpointError, create_model, unwrap
from utils import data, distributed
from utils.checkpoint import (
    RunWriteError,
    atomic_write_json,
    check_run_dir,
    prepare_run_dir,
    read_metrics,
    remove_stale_temp_files,
    seed_everything,
)
from utils.cli import resolve_device
from utils.locks import FolderLock, check_unlocked
from utils.training import resume
from utils.training.ancra import TrainStep
from utils.training.config import TrainConfig, as_record
from utils.training.errors import ConfigError
from utils.training.fast import FastStep
from utils.training.records import RunInfo, write_reason
from utils.training.schedule import build_optimizer, build_scheduler, reschedule
from utils.training.trainer import Trainer
from utils.training.updates import build_update

EVAL_BATCH = 256
SYNTHETIC_BYTES_PER_VALUE = 20  # float32 temporaries of the generator plus the uint8 images


def _describe(config):
    kind = "an RA" if config.get("reverse_attention") else "a plain"
    options = " with separate RA BatchNorms" if config.get("separate_bn") else ""
    return (f"{kind} {config.get('arch')}{options} with {config.get('num_classes')} classes on "
            f"{config.get('image_size')}px images")


def check_resume(payload, config: TrainConfig):
    """Refuse to resume a checkpoint whose model differs from the one ``config`` builds."""
    saved, wanted = payload["model_config"], config.model_config(data.num_classes(config.dataset))
    keys = ("arch", "num_classes", "reverse_attention", "image_size", "separate_bn")
    if any(saved.get(k) != wanted.get(k) for k in keys):
        raise CheckpointError(f"cannot resume this checkpoint: it holds {_describe(saved)} but this command and "
                              f"its options build {_describe(wanted)}; resume it with the options that created it")


def available_memory():
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_inputs(d: TrainConfig):
    """The data folder exists (a typo is not created by a download) and a synthetic --train-size fits in memory."""
    missing = not Path(d.data_dir).expanduser().is_dir()
    if d.dataset in ("cifar10", "cifar100") and d.data_dir != data.DEFAULT_DATA_DIR and missing:
        raise ConfigError(f"--data-dir {d.data_dir} is not a folder; pass the folder that holds "
                          f"{d.dataset} (or create it first to download {d.dataset} there)")
    if d.dataset == "synthetic" and d.train_size is not None:
        need = d.train_size * 3 * d.image_size ** 2 * SYNTHETIC_BYTES_PER_VALUE
        free = available_memory()
        if free is not None and need > free:
            raise ConfigError(f"--train-size {d.train_size} needs about {need / 2 ** 30:.1f} GiB of memory for "
                              f"{d.image_size}px synthetic images but {free / 2 ** 30:.1f} GiB is available; "
                              f"use a smaller --train-size")


def check_writable(folder, resumed):
    """Refuse a run folder (or, for a new run, the nearest existing folder above it) that cannot be
    written: a read-only filesystem or no permission. Creates nothing."""
    probe = Path(folder)
    while not resumed and not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        if resumed:
            raise ConfigError(f"cannot resume {folder}: the folder is not writable (read-only or no permission), and "
                              f"a resumed run writes its checkpoints there; copy the run folder somewhere writable "
                              f"and resume the copy")
        raise ConfigError(f"cannot create the run folder {folder}: {probe} is not writable (read-only or no "
                          f"permission); pass another --out-dir")


def check_outputs(config: TrainConfig, launch, context):
    """The run directory to write, checked (nothing created or deleted yet): writable, not in use
    by another training, and for a resume a readable ``metrics.jsonl``."""
    run_dir = launch.run_dir
    if launch.payload is None:
        out_dir = Path(config.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is a file, not a folder; pass the folder that should hold the runs")
        run_dir = out_dir / config.run_name
    run_dir = Path(run_dir)

    def check():
        if launch.payload is None:
            check_run_dir(run_dir, overwrite=launch.overwrite or config.smoke, smoke=config.smoke)
        check_writable(run_dir, resumed=launch.payload is not None)
        if run_dir.is_dir():
            check_unlocked(run_dir, "a training run")
        if launch.payload is not None:
            read_metrics(run_dir)

    distributed.run_on_main(context, check)
    return run_dir


@contextmanager
def claimed_run_dir(context, run_dir, config, launch):
    """Rank 0 creates ``run_dir`` (if new), takes its lock for the duration, and only then deletes
    an overwritten run's files and the temporary files of interrupted writes. Other ranks wait
    for it and share its refusal (:class:`~utils.locks.LockError` when another process holds the lock)."""
    lock = FolderLock(run_dir, "a training run")

    overwrite = launch.overwrite or config.smoke  # a smoke run replaces its own smoke run folder
    payload = launch.payload

    def claim():
        if payload is None:
            check_run_dir(run_dir, overwrite=overwrite, smoke=config.smoke)
            run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        try:
            if payload is None:
                prepare_run_dir(run_dir, overwrite, config.smoke)
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


def load_splits(d: TrainConfig):
    """``(train, val or None, test subset)`` TensorPairs; the run's ``seed`` draws the validation split."""
    synthetic = {"synthetic_image_size": d.image_size, "seed": d.data_seed}
    train = data.load_dataset(d.dataset, d.data_dir, "train", synthetic_size=d.train_size, **synthetic)
    test = data.load_dataset(d.dataset, d.data_dir, "test", **synthetic)
    if d.train_size is not None:
        if d.train_size > len(train) and not d.smoke:  # --smoke on a small dataset: all of it
            raise ConfigError(f"--train-size {d.train_size} is more than the {len(train)} training images of "
                              f"{d.dataset}; leave it out to train on all of them")
        train = data.fixed_subset(train, d.train_size, seed=d.data_seed)
    val = None
    if d.val_size:
        if d.val_size >= len(train):
            raise ConfigError(f"--val-size {d.val_size} leaves no training data ({len(train)} images)")
        train, val = data.split_holdout(train, d.val_size, d.seed)
    return train, val, data.fixed_subset(test, d.eval_size or None, seed=d.data_seed)


def build_model(config: TrainConfig, device):
    """The model ``config`` describes, on ``device`` (an unknown architecture is a ConfigError)."""
    try:
        model = create_model(config.arch, data.num_classes(config.dataset), config.ra, config.image_size,
                             **({"separate_bn": True} if config.separate_bn else {}))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model.to(device)


def rank_batch(config, context):
    """This process's batch size: the global --batch-size split evenly, or --per-rank-batch as is."""
    if config.per_rank_batch or not context.enabled:
        return config.batch_size
    if config.batch_size % context.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} cannot be split over {context.world_size} processes; "
                          f"use a multiple of {context.world_size} or --per-rank-batch")
    return config.batch_size // context.world_size


def probe_loss(model, config, device):
    """A scalar depending on every parameter a training forward uses (for freezing unused ones)."""
    x = torch.zeros(2, 3, config.image_size, config.image_size, device=device)
    if config.ra:
        logits, aux = model(x, torch.zeros(2, dtype=torch.long, device=device), return_aux=True)
        return sum(o.sum() for o in [logits, *aux])
    return model(x).sum()


def distributed_model(model, config, context, device):
    """DDP around ``model`` (unused parameters frozen first), or ``model`` itself in a single process."""
    if context.enabled:
        frozen = distributed.freeze_unused_parameters(model, lambda: probe_loss(model, config, device))
        if frozen and context.is_main:
            print(f"parameters unused by the forward pass, frozen for DDP: {', '.join(frozen)}", file=sys.stderr)
    return distributed.wrap(context, model, device, sync_bn=config.sync_bn)


def build_trainer(config: TrainConfig, model, splits, device, context, run_dir):
    """The step (with its weight update) and the trainer around it; ``config`` is the run's record
    (:meth:`TrainConfig.on` fills the device's speed defaults for the step and the check)."""
    train, val, test = splits
    record, config = config, config.on(device)
    model = distributed_model(model.to(memory_format=config.memory_format()), config, context, device)
    optimizer = build_optimizer(model, config)
    if not config.sync_bn:
        distributed.share_buffers_each_step(context, unwrap(model), optimizer)
    update = build_update(optimizer, model, awp_gamma=config.awp_gamma, awp_warmup=config.awp_warmup,
                          ema_decay=config.ema)
    step = FastStep(TrainStep(model, optimizer, config, data.num_classes(config.dataset), update), config)
    shard = {"rank": context.rank, "world_size": context.world_size, "device": device}
    eval_loader = lambda split: data.BatchLoader(split, EVAL_BATCH, shuffle=False, augment=False,
                                                 pad=False, **shard)
    loaders = {"test": eval_loader(test), **({"val": eval_loader(val)} if val is not None else {})}
    train_loader = data.BatchLoader(train, rank_batch(config, context), shuffle=True, seed=config.seed,
                                    augment=data.default_augment(config.dataset), **shard)
    info = RunInfo(run_dir if context.is_main else None, as_record(record),
                   config.model_config(data.num_classes(config.dataset)), title=f"{config.run_name} ({config.method_name})")
    reseed = (lambda epoch: seed_everything(distributed.epoch_seed(config.seed, context.rank, epoch))
              if context.enabled else None)
    return Trainer(step, build_scheduler(optimizer, config), train_loader, loaders, info, config,
                   context=context, reseed=reseed)


def _log_start(trainer, config, splits, device, context, run_dir, launch):
    train, val, test = splits
    batch = rank_batch(config, context)
    processes = (f" | {context.world_size} processes x batch {batch} (global {batch * context.world_size})"
                 + (", SyncBatchNorm" if config.sync_bn else "") if context.enabled else "")
    trainer.log(f"{config.method_name} | {config.arch} on {config.dataset} ({len(train)} train, "
                f"{len(val) if val is not None else 0} val, {len(test)} test images) | device {device} "
                f"({config.on(device).describe_speed()}){processes} | run {run_dir}")
    epochs = config.epochs
    beyond = [m for m in config.milestones if m > epochs]
    if beyond:
        trainer.log(f"note: milestone(s) {' '.join(map(str, beyond))} lie beyond --epochs {epochs}: they decay "
                    f"the lr only if the run is resumed with a larger --epochs")
    if launch.payload is not None:
        changed = resume.changed_options(launch.saved, config)
        trainer.log(f"resuming {launch.resume} (epoch {launch.payload['epoch']}; the next epoch starts from this "
                    f"epoch-end checkpoint)" + (f" with changed options: {', '.join(changed)}" if changed else ""))


def training_device(config, context):
    """The device of this process: ``--device`` (under torchrun, CUDA is one GPU per local rank)."""
    if context.enabled:
        if config.device.startswith("cuda:"):
            raise ConfigError(f"--device {config.device}: under torchrun each process uses the GPU of its local "
                              f"rank; use --device cuda (or auto)")
        return distributed.init(context, config.device)
    try:
        return resolve_device(config.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run(config: TrainConfig, launch=None):
    """Train as ``config`` says; returns the epoch records. ``launch`` (from
    :func:`utils.training.cli.parse`) holds a resumed run's ``payload``, ``saved`` record,
    ``run_dir`` and ``resume`` path, and ``overwrite``. Under torchrun every process runs this;
    rank 0 alone writes the run folder."""
    launch = launch or SimpleNamespace(payload=None, run_dir=None, overwrite=False)
    payload = launch.payload
    if payload is not None and payload["epoch"] >= config.epochs:
        print(f"nothing to do: {launch.resume} already finished {payload['epoch']} of --epochs "
              f"{config.epochs} (pass a larger --epochs to go on); nothing was changed")
        return []
    context = distributed.from_env()
    config = replace(config, world_size=context.world_size)
    rank_batch(config, context)
    device = training_device(config, context)
    if config.sync_bn:
        distributed.check_sync_bn(context, device)
    run_dir = check_outputs(config, launch, context)
    check_inputs(config)
    seed_everything(config.seed)
    model = build_model(config, device)  # the architecture is checked before any data is decoded
    splits = distributed.run_on_main(context, lambda: load_splits(config))  # rank 0 downloads first
    splits = splits if context.is_main else load_splits(config)
    with claimed_run_dir(context, run_dir, config, launch):
        trainer = build_trainer(config, model, splits, device, context, run_dir)
        if context.is_main:
            write_args(run_dir, as_record(config))
        _log_start(trainer, config, splits, device, context, run_dir, launch)
        start = 1
        if payload is not None:
            start = trainer.restore(payload)
            if resume.schedule_changed(launch.saved, config):
                trainer.scheduler = reschedule(trainer.optimizer, config, payload["epoch"])
        return trainer.fit(start)


def write_args(run_dir, args):
    """``args.json`` of the run: the flat ``args`` record (a disk-full failure leaves the previous one whole)."""
    try:
        atomic_write_json(run_dir / "args.json", args)
    except OSError as err:
        raise RunWriteError(f"could not write {run_dir / 'args.json'} ({write_reason(err)}); nothing was trained: "
                            f"free space and run the command again") from err
