"""Setting up a training run from resolved options: every check first (outputs, data, memory,
architecture), only then the run folder, locked for the whole run (one writer per folder); then
the model, the step, the trainer and the loop."""
import sys
from contextlib import contextmanager
from pathlib import Path

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
from utils.training.config import ModelConfig, TrainConfig, prepare_model
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
    """Refuse to resume a checkpoint whose model, method or data differ from what ``config`` asks for."""
    saved, wanted = payload["model_config"], config.model.as_dict()
    keys = ("arch", "num_classes", "reverse_attention", "image_size", "separate_bn")
    if any(saved.get(k) != wanted.get(k) for k in keys):
        raise CheckpointError(f"cannot resume {config.run.resume}: it holds {_describe(saved)} but this command and "
                              f"its options build {_describe(wanted)}; resume it with the options that created it")
    current = config.as_args()
    resume.refuse_identity_changes(payload["args"], current)
    resume.refuse_split_changes(payload["args"], current)


def available_memory():
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_inputs(data_config):
    """The data folder exists (a typo is not created by a download) and a synthetic --train-size fits in memory."""
    d = data_config
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


def check_outputs(run_config, context, payload, run_dir):
    """The run directory to write, checked (nothing created or deleted yet): not in use by another
    training, and for a resume a readable ``metrics.jsonl``."""
    r = run_config
    if payload is None:
        out_dir = Path(r.out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out-dir {out_dir} is a file, not a folder; pass the folder that should hold the runs")
        run_dir = out_dir / r.run_name
    run_dir = Path(run_dir)

    def check():
        if run_dir.is_dir():
            check_unlocked(run_dir, "a training run")
        if payload is None:
            check_run_dir(run_dir, overwrite=r.overwrite, smoke=r.smoke)
        else:
            read_metrics(run_dir)

    distributed.run_on_main(context, check)
    return run_dir


@contextmanager
def claimed_run_dir(context, run_dir, run_config, payload):
    """Rank 0 creates ``run_dir`` (if new), takes its lock for the duration, and only then deletes
    an overwritten run's files and the temporary files of interrupted writes. Other ranks wait
    for it and share its refusal (:class:`~utils.locks.LockError` when another process holds the lock)."""
    lock = FolderLock(run_dir, "a training run")

    def claim():
        if payload is None:
            check_run_dir(run_dir, overwrite=run_config.overwrite, smoke=run_config.smoke)
            run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        try:
            if payload is None:
                prepare_run_dir(run_dir, run_config.overwrite, run_config.smoke)
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


def load_splits(data_config, seed):
    """``(train, val or None, test subset)`` TensorPairs; ``seed`` (the run's) draws the validation split."""
    d = data_config
    synthetic = {"synthetic_image_size": d.image_size, "seed": d.seed}
    train = data.load_dataset(d.dataset, d.data_dir, "train", synthetic_size=d.train_size, **synthetic)
    test = data.load_dataset(d.dataset, d.data_dir, "test", **synthetic)
    if d.train_size is not None:
        if d.train_size > len(train):
            raise ConfigError(f"--train-size {d.train_size} is more than the {len(train)} training images of "
                              f"{d.dataset}; leave it out to train on all of them")
        train = data.fixed_subset(train, d.train_size, seed=d.seed)
    val = None
    if d.val_size:
        if d.val_size >= len(train):
            raise ConfigError(f"--val-size {d.val_size} leaves no training data ({len(train)} images)")
        train, val = data.split_holdout(train, d.val_size, seed)
    return train, val, data.fixed_subset(test, d.eval_size or None, seed=d.seed)


def build_model(model_config: ModelConfig, device):
    """The model ``model_config`` describes, on ``device`` (an unknown architecture is a ConfigError)."""
    m = model_config
    try:
        model = create_model(m.arch, m.num_classes, m.reverse_attention, m.image_size,
                             **({"separate_bn": True} if m.separate_bn else {}))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return model.to(device)


def rank_batch(schedule, context):
    """This process's batch size: the global --batch-size split evenly, or --per-rank-batch as is."""
    if schedule.per_rank_batch or not context.enabled:
        return schedule.batch_size
    if schedule.batch_size % context.world_size:
        raise ConfigError(f"--batch-size {schedule.batch_size} cannot be split over {context.world_size} processes; "
                          f"use a multiple of {context.world_size} or --per-rank-batch")
    return schedule.batch_size // context.world_size


def probe_loss(model, model_config, device):
    """A scalar depending on every parameter a training forward uses (for freezing unused ones)."""
    x = torch.zeros(2, 3, model_config.image_size, model_config.image_size, device=device)
    if model_config.reverse_attention:
        logits, aux = model(x, torch.zeros(2, dtype=torch.long, device=device), return_aux=True)
        return sum(o.sum() for o in [logits, *aux])
    return model(x).sum()


def distributed_model(model, config, context, device):
    """DDP around ``model`` (unused parameters frozen first), or ``model`` itself in a single process."""
    if context.enabled:
        frozen = distributed.freeze_unused_parameters(model, lambda: probe_loss(model, config.model, device))
        if frozen and context.is_main:
            print(f"parameters unused by the forward pass, frozen for DDP: {', '.join(frozen)}", file=sys.stderr)
    return distributed.wrap(context, model, device, sync_bn=config.run.sync_bn)


def build_trainer(config: TrainConfig, model, splits, device, context, run_dir):
    """The step (with its weight update) and the trainer around it."""
    train, val, test = splits
    schedule, run_config = config.schedule, config.run
    speed = config.speed.on(device)
    model = distributed_model(prepare_model(model, speed), config, context, device)
    optimizer = build_optimizer(model, schedule.optimizer)
    if not run_config.sync_bn:
        distributed.share_buffers_each_step(context, unwrap(model), optimizer)
    update = build_update(optimizer, model, awp_gamma=schedule.awp_gamma, awp_warmup=schedule.awp_warmup,
                          ema_decay=schedule.ema)
    step = FastStep(TrainStep(model, optimizer, config.method, config.model.num_classes, update), speed)
    shard = {"rank": context.rank, "world_size": context.world_size, "device": device}
    eval_loader = lambda split: data.BatchLoader(split, EVAL_BATCH, shuffle=False, augment=False,
                                                 pad=False, **shard)
    loaders = {"test": eval_loader(test), **({"val": eval_loader(val)} if val is not None else {})}
    train_loader = data.BatchLoader(train, rank_batch(schedule, context), shuffle=True, seed=run_config.seed,
                                    augment=data.default_augment(config.data.dataset), **shard)
    info = RunInfo(run_dir if context.is_main else None, config.as_args(context.world_size), config.model.as_dict(),
                   title=f"{run_config.run_name} ({config.method_name})")
    reseed = (lambda epoch: seed_everything(distributed.epoch_seed(run_config.seed, context.rank, epoch))
              if context.enabled else None)
    return Trainer(step, build_scheduler(optimizer, schedule.optimizer), train_loader, loaders, info,
                   epochs=schedule.epochs, eval_config=config.evaluation, save_freq=run_config.save_freq,
                   quiet=run_config.quiet, context=context, reseed=reseed)


def _log_start(trainer, config, splits, device, context, run_dir, payload):
    train, val, test = splits
    batch = rank_batch(config.schedule, context)
    processes = (f" | {context.world_size} processes x batch {batch} (global {batch * context.world_size})"
                 + (", SyncBatchNorm" if config.run.sync_bn else "") if context.enabled else "")
    trainer.log(f"{config.method_name} | {config.model.arch} on {config.data.dataset} ({len(train)} train, "
                f"{len(val) if val is not None else 0} val, {len(test)} test images) | device {device} "
                f"({trainer.step.speed.describe()}){processes} | run {run_dir}")
    epochs = config.schedule.epochs
    beyond = [m for m in config.schedule.optimizer.milestones if m > epochs]
    if beyond:
        trainer.log(f"note: milestone(s) {' '.join(map(str, beyond))} lie beyond --epochs {epochs}: they decay "
                    f"the lr only if the run is resumed with a larger --epochs")
    if payload is not None:
        changed = resume.changed_options(payload["args"], config.as_args(context.world_size))
        trainer.log(f"resuming {config.run.resume} (epoch {payload['epoch']}; the next epoch starts from this "
                    f"epoch-end checkpoint)" + (f" with changed options: {', '.join(changed)}" if changed else ""))


def training_device(run_config, context):
    """The device of this process: ``--device`` (under torchrun, CUDA is one GPU per local rank)."""
    if context.enabled:
        if run_config.device.startswith("cuda:"):
            raise ConfigError(f"--device {run_config.device}: under torchrun each process uses the GPU of its local "
                              f"rank; use --device cuda (or auto)")
        return distributed.init(context, run_config.device)
    try:
        return resolve_device(run_config.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def run(config: TrainConfig, payload=None, run_dir=None):
    """Train as ``config`` says (resuming ``payload`` when given); returns the epoch records.
    Under torchrun every process runs this; rank 0 alone writes the run folder."""
    if payload is not None and payload["epoch"] >= config.schedule.epochs:
        print(f"nothing to do: {config.run.resume} already finished {payload['epoch']} of --epochs "
              f"{config.schedule.epochs} (pass a larger --epochs to go on); nothing was changed")
        return []
    context = distributed.from_env()
    rank_batch(config.schedule, context)
    device = training_device(config.run, context)
    if config.run.sync_bn:
        distributed.check_sync_bn(context, device)
    run_dir = check_outputs(config.run, context, payload, run_dir)
    check_inputs(config.data)
    seed_everything(config.run.seed)
    model = build_model(config.model, device)  # the architecture is checked before any data is decoded
    splits = distributed.run_on_main(context, lambda: load_splits(config.data, config.run.seed))  # rank 0 downloads first
    splits = splits if context.is_main else load_splits(config.data, config.run.seed)
    with claimed_run_dir(context, run_dir, config.run, payload):
        trainer = build_trainer(config, model, splits, device, context, run_dir)
        if context.is_main:
            write_args(run_dir, config.as_args(context.world_size))
        _log_start(trainer, config, splits, device, context, run_dir, payload)
        start = 1
        if payload is not None:
            start = trainer.restore(payload)
            if resume.schedule_changed(payload["args"], config.as_args()):
                trainer.scheduler = reschedule(trainer.optimizer, config.schedule.optimizer, payload["epoch"])
        return trainer.fit(start)


def write_args(run_dir, args):
    """``args.json`` of the run: the flat ``args`` record (a disk-full failure leaves the previous one whole)."""
    try:
        atomic_write_json(run_dir / "args.json", args)
    except OSError as err:
        raise RunWriteError(f"could not write {run_dir / 'args.json'} ({write_reason(err)}); nothing was trained: "
                            f"free space and run the command again") from err
