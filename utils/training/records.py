"""What a run records: its identity (:class:`RunInfo`), the best-checkpoint selection, the
checkpoint payload and the one-line epoch summary."""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from models import unwrap
from utils.checkpoint import (
    BEST,
    LAST,
    RunWriteError,
    atomic_save_many,
    capture_rng,
    load_scheduler_state,
    read_metrics,
    scheduler_state,
    write_metrics,
)
from utils.training.curves import plot_curves


@dataclass
class RunInfo:
    """What a checkpoint records besides the training state: the run's folder, its arguments
    (a plain dict) and the model config that ``models.load_model`` reads back."""

    run_dir: Path | None
    args: dict
    model_config: dict
    title: str = ""


@dataclass
class BestSoFar:
    """The checkpoint selection: best PGD accuracy so far on ``split`` ('val' or 'test')."""

    split: str
    score: float = -1.0
    epoch: int | None = None

    def describe(self):
        where = ("the validation split held out from training" if self.split == "val"
                 else "the test subset (no --val-size given)")
        return f"best chosen on {where}"


def checkpoint_payload(step, scheduler, run: RunInfo, epoch, best: BestSoFar, last_record):
    """The full training state after ``epoch`` completed epochs (weights_only-safe). Plug-ins of
    the weight update with state add their entry (EMA: ``payload["ema"]``)."""
    payload = {
        "model": unwrap(step.model).state_dict(),
        "model_config": dict(run.model_config),
        "args": dict(run.args),
        "epoch": epoch,
        "interrupted_epoch": None,  # kept for the format; checkpoints are written at epoch ends only
        "optimizer": step.optimizer.state_dict(),
        "scheduler": scheduler_state(scheduler),
        "rng": capture_rng(),
        "best": asdict(best),
        "metrics": last_record,
    }
    payload.update(step.update.state_dict())
    return payload


def load_training_state(step, scheduler, payload):
    """Put a checkpoint's weights, optimizer, scheduler and weight-update plug-in states back."""
    unwrap(step.model).load_state_dict(payload["model"], strict=True)
    step.optimizer.load_state_dict(payload["optimizer"])
    load_scheduler_state(scheduler, payload["scheduler"])
    step.update.load_state_dict(payload)


def save_epoch_files(run: RunInfo, records, payload, *, is_best, save_freq):
    """The checkpoints of the epoch ``payload`` ends (``best.pt`` when ``is_best``, ``epoch_N.pt``
    every ``save_freq`` epochs, and ``last.pt``, replaced last), then metrics and curves. A failed
    write (disk full) is a :class:`RunWriteError` that leaves the previous ``last.pt`` whole; the
    checkpoint carries its epoch's record, so a resume repairs metrics that lag behind it."""
    epoch = payload["epoch"]
    targets = [run.run_dir / BEST] if is_best else []
    if save_freq and epoch % save_freq == 0:
        targets.append(run.run_dir / f"epoch_{epoch}.pt")
    try:
        atomic_save_many(payload, [*targets, run.run_dir / LAST])
    except OSError as err:
        raise RunWriteError(f"could not write the checkpoint of epoch {epoch} into {run.run_dir} ({write_reason(err)}); "
                            f"the previous {LAST} and metrics are intact: free space and continue with "
                            f"--resume {shlex.quote(str(run.run_dir))}") from err
    try:
        write_metrics(run.run_dir, records)
        plot_curves(records, run.run_dir / "curves.png", run.title)
    except OSError as err:
        raise RunWriteError(f"epoch {epoch} is saved in {run.run_dir / LAST} but metrics.jsonl and curves.png could "
                            f"not be updated ({write_reason(err)}); free space and continue with --resume "
                            f"{run.run_dir}, which restores the record from the checkpoint") from err


def write_reason(err):
    """The short reason of an OSError (``No space left on device``)."""
    return err.strerror or str(err)


def resumed_records(run_dir, payload):
    """The epoch records a run resumed from ``payload`` continues: those of ``metrics.jsonl``
    before the checkpoint's epoch, then the checkpoint's own record (saved with it, so it also
    survives a failure between the checkpoint and the metrics writes). Nothing is written here:
    ``metrics.jsonl`` keeps its later records until the first resumed epoch is saved."""
    epoch = payload["epoch"]
    records = read_metrics(run_dir, epoch)
    own = payload.get("metrics")
    if isinstance(own, dict) and own.get("epoch") == epoch:
        records = [r for r in records if r["epoch"] < epoch] + [own]
    return records


def summary_line(record, epochs):
    """The one-line epoch summary of ``record``."""
    train = record["train"]
    terms = " ".join(f"{k} {v:.4f}" for k, v in train.items() if not k.startswith(("acc_", "anc_fired", "neg_valid")))
    acc_key = "acc_adv" if "acc_adv" in train else "acc_nat"
    parts = [f"epoch {record['epoch']}/{epochs}", f"lr {record['lr']:.4g}", terms,
             f"train {acc_key} {100 * train.get(acc_key, float('nan')):.1f}%"]
    for split in ("test", "val"):
        if split in record:
            r = record[split]
            parts.append(f"{split} nat {100 * r['nat']:.1f}% {record['eval_attack']} {100 * r['pgd']:.1f}%")
    best = record["best"]
    parts.append(f"best ({best['split']}) {100 * best['score']:.1f}% @ {best['epoch']}")
    parts.append(f"{record['seconds']:.0f}s")
    return " | ".join(parts)
