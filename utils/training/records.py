"""What a run records: its identity (:class:`RunInfo`), the best-checkpoint selection, the
checkpoint payload and the one-line epoch summary."""
from dataclasses import asdict, dataclass
from pathlib import Path

from models import unwrap
from utils.checkpoint import capture_rng, scheduler_state


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
