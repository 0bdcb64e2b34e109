"""The one training engine for every method (SPEC §2–5): PGD-AT, TRADES, MART (and standard
training as a reference), each with or without ANC, on RA or plain models.

:class:`TrainStep` is all the work of one batch; :func:`evaluate` measures natural and PGD
accuracy; :class:`Trainer` runs the epochs and owns checkpoints, metrics, curves, the NaN
check and Ctrl-C / SIGTERM handling. Inside the step nothing waits for the device: metrics stay
tensors and are brought to the host every ``sync_every`` batches and at the end of an epoch.
"""
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from models import has_reverse_attention, unwrap
from utils import distributed
from utils.attacks import EPS, pgd, pgd_train, random_start
from utils.checkpoint import (BEST, LAST, atomic_save, atomic_save_many, capture_rng, load_scheduler_state,
                              read_metrics, restore_rng, scheduler_state, write_metrics)
from utils.analysis.curves import plot_curves
from utils.training.losses import DEFAULT_BETA, METHODS as LOSS_METHODS, training_loss
from utils.training.negatives import STRATEGIES, Negatives, make_negatives, select_negatives

METHODS = LOSS_METHODS + ("standard",)
ATTACK_LOSSES = ("ce", "kl")
DEVICES = ("auto", "cpu", "cuda")
_STANDARD_RENAME = {"acc_adv": "acc_nat", "ce_adv": "ce_nat"}


class ConfigError(ValueError):
    """Options that do not make sense together; the message says what to change."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; nothing was saved over the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: ``last.pt`` was saved and the message says how to resume."""


def resolve_device(name="auto"):
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a ConfigError."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but this machine has no usable CUDA GPU; use --device cpu")
        return torch.device("cuda")
    return torch.device("cpu")


# ----------------------------------------------------------------------------- one batch


@dataclass(frozen=True)
class MethodConfig:
    """What one training batch computes (SPEC §2–4).

    ``attack_loss`` is the loss of the training adversarial examples: ``ce`` for PGD-AT, MART
    and every ANCRA variant, ``kl`` for vanilla TRADES. ``aux_weight`` (λ) enters the losses and
    the training attacks ("with p") of RA models only; ``beta=None`` takes the method's default.
    """

    method: str = "trades"
    anc: bool = True
    strategy: str = "random_adv"
    alpha: float = 1.0
    zeta: float = 3.0
    beta: Optional[float] = None
    aux_weight: float = 2.0
    attack_loss: str = "ce"
    eps: float = EPS
    step_size: float = 0.007
    steps: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown negative strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.attack_loss not in ATTACK_LOSSES:
            raise ConfigError(f"unknown attack loss {self.attack_loss!r}; choose one of {', '.join(ATTACK_LOSSES)}")
        if self.method == "standard" and self.anc:
            raise ConfigError("standard training has no negatives; turn ANC off (--no-anc) for --method standard")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.steps < 1 or self.eps <= 0 or self.step_size <= 0:
            raise ConfigError("the training attack needs --attack-steps >= 1 and positive --eps and --step-size")

    @property
    def resolved_beta(self):
        """β actually used (TRADES 6, MART 5 by default; unused by PGD-AT and standard)."""
        return DEFAULT_BETA.get(self.method, 0.0) if self.beta is None else self.beta

    def name(self, reverse_attention):
        """Method name as in the paper: ``trades-ancra``, ``trades-anc``, ``trades-ra`` or ``trades``."""
        suffix = {(True, True): "-ancra", (True, False): "-anc", (False, True): "-ra", (False, False): ""}
        return self.method + suffix[(self.anc, bool(reverse_attention))]


@dataclass(frozen=True)
class SpeedConfig:
    """How a step is executed, never what it computes (SPEC's mathematics in every combination).

    ``joint_attacks``: the adversarial examples and the targeted negatives (both eval mode, both
    CE from x + 0.001·N(0,1)) run as one PGD batch of 2B with a per-example direction;
    ``amp``: bf16 autocast for every forward (attacks, losses, evaluation); ``channels_last``:
    NHWC weights and inputs; ``compile``: ``torch.compile`` the model. :meth:`for_device` gives
    the defaults: bf16 on CUDA, fp32 on CPU, channels-last with bf16 (on CPU it pays only there).
    """

    joint_attacks: bool = True
    amp: bool = False
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def for_device(cls, device, **overrides):
        """Defaults for ``device`` with ``overrides`` (None values keep the default)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        amp = overrides.pop("amp", torch.device(device).type == "cuda")
        return cls(**{"amp": amp, "channels_last": amp, **overrides})

    def autocast(self, device):
        """bf16 autocast on ``device`` when ``amp`` is set, else a no-op context."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=self.amp)

    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self):
        flags = [("bf16 autocast" if self.amp else "fp32"), ("channels-last" if self.channels_last else "NCHW"),
                 ("joint 2B attack batch" if self.joint_attacks else "separate attack batches")]
        if self.compile:
            flags.append("torch.compile")
        return ", ".join(flags)


def prepare_model(model, speed: SpeedConfig):
    """Apply ``speed``'s memory format to ``model`` in place (before the optimizer and DDP see it)."""
    return model.to(memory_format=speed.memory_format())


def compiled(model, speed: SpeedConfig):
    """``torch.compile(model)`` when ``speed.compile`` is set (static shapes: one graph per batch size)."""
    return torch.compile(model, dynamic=False) if speed.compile else model


class TrainStep:
    """One optimisation step on a batch: adversarial examples, negatives (ANC), loss, update.

    ``step(x, y, epoch)`` returns the batch's metrics as detached 0-dim tensors on the device
    (no host synchronisation). ``model`` may be wrapped (DDP); the attacks run on the bare
    module. ``epoch`` is 1-based and decides the warm-up of non-random negative strategies.
    """

    def __init__(self, model, optimizer, config: MethodConfig, num_classes, speed: SpeedConfig = SpeedConfig()):
        self.model = compiled(model, speed)
        self.attack_model = compiled(unwrap(model), speed)  # attacks bypass DDP: no gradient sync, no parameter grads
        self.optimizer = optimizer
        self.config = config
        self.num_classes = num_classes
        self.speed = speed
        self.reverse_attention = has_reverse_attention(unwrap(model))
        self.attack_aux_weight = config.aux_weight if self.reverse_attention else 0.0

    def _pgd_args(self):
        cfg = self.config
        return dict(eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, aux_weight=self.attack_aux_weight)

    def adversarial(self, x, y):
        """Training adversarial examples (x itself for standard training)."""
        cfg = self.config
        if cfg.method == "standard":
            return x
        return pgd_train(self.attack_model, x, y, loss=cfg.attack_loss, **self._pgd_args())

    def negatives(self, x, y, epoch):
        """One negative per anchor (SPEC §3), or None when ANC is off."""
        cfg = self.config
        if not cfg.anc:
            return None
        return make_negatives(cfg.strategy, self.attack_model, x, y, self.num_classes, epoch=epoch,
                              **self._pgd_args())

    def can_join(self):
        """Whether both attacks can share one batch: same loss (CE) and both attacked."""
        cfg = self.config
        return (self.speed.joint_attacks and cfg.anc and cfg.strategy.endswith("_adv")
                and cfg.attack_loss == "ce" and cfg.method != "standard")

    def joint_attack(self, x, y, epoch):
        """Adversarial examples and negatives from one PGD batch of 2B. The random starts and the
        negative choice draw from the RNG in the same order as the separate attacks, so the
        result is the one of :meth:`adversarial` + :meth:`negatives`."""
        cfg = self.config
        start_adv = random_start(x, cfg.eps, "normal")
        index, valid = select_negatives(cfg.strategy, self.attack_model, x, y, self.num_classes, epoch=epoch)
        x_neg = x[index]
        start = torch.cat([start_adv, random_start(x_neg, cfg.eps, "normal")])
        batch = x.shape[0]
        targeted = torch.arange(2 * batch, device=x.device) >= batch
        both = pgd(self.attack_model, torch.cat([x, x_neg]), torch.cat([y, y]), loss="ce", targeted=targeted,
                   start=start, **self._pgd_args())
        x_adv, x_neg = both.split(batch)
        return x_adv, Negatives(x_neg, y[index], index, valid)

    def examples(self, x, y, epoch):
        """``(x_adv, negatives or None)`` for the batch, jointly when possible."""
        if self.can_join():
            return self.joint_attack(x, y, epoch)
        return self.adversarial(x, y), self.negatives(x, y, epoch)

    def __call__(self, x, y, epoch):
        cfg = self.config
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.speed.autocast(x.device):
            x_adv, neg = self.examples(x, y, epoch)
            self.model.train()
            loss, metrics = training_loss(
                "pgd-at" if cfg.method == "standard" else cfg.method, self.model, x, y, x_adv,
                None if neg is None else neg.x, None if neg is None else neg.y,
                beta=cfg.resolved_beta, zeta=cfg.zeta, alpha=cfg.alpha, aux_weight=cfg.aux_weight,
                neg_valid=None if neg is None else neg.valid)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if cfg.method == "standard":
            metrics = {_STANDARD_RENAME.get(k, k): v for k, v in metrics.items()}
        return metrics


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalConfig:
    """The per-epoch robustness check: PGD (CE, uniform start) with a fixed noise seed."""

    eps: float = EPS
    step_size: float = 0.007
    steps: int = 20
    seed: int = 0

    @property
    def attack_name(self):
        return f"PGD-{self.steps}"


def evaluate(model, loader, config: EvalConfig = EvalConfig(), speed: SpeedConfig = SpeedConfig(), reduce=None):
    """Natural and PGD accuracy of ``model`` over ``loader`` (eval mode, argmax RA masks).

    The PGD start noise comes from a generator seeded with ``config.seed``, so every epoch is
    attacked with the same noise and the global RNG (and with it resume) is untouched. ``speed``
    gives the training run's autocast and memory format (the final evaluation,
    ``test_white_attack.py``, is fp32). ``reduce`` sums the counts of a sharded loader over
    ranks. Returns ``{"nat", "pgd", "size"}`` with accuracies in [0, 1].
    """
    was_training = model.training
    model.eval()
    generator = None
    correct_nat = correct_pgd = None
    total = 0
    for x, y in loader:
        x = x.contiguous(memory_format=speed.memory_format())
        if generator is None:
            generator = torch.Generator(device=x.device).manual_seed(config.seed)
            correct_nat = torch.zeros((), device=x.device)
            correct_pgd = torch.zeros((), device=x.device)
        with speed.autocast(x.device):
            with torch.no_grad():
                correct_nat += (model(x).argmax(1) == y).sum()
            x_adv = pgd(model, x, y, config.eps, config.step_size, config.steps, loss="ce", init="uniform",
                        generator=generator)
            with torch.no_grad():
                correct_pgd += (model(x_adv).argmax(1) == y).sum()
        total += y.shape[0]
    model.train(was_training)
    if generator is None:  # an empty shard still joins the reduction
        correct_nat = correct_pgd = torch.zeros((), device=next(model.parameters()).device)
    counts = torch.stack([correct_nat, correct_pgd, torch.full_like(correct_nat, total)])
    if reduce is not None:
        counts = reduce(counts)
    nat, pgd_correct, total = counts.tolist()
    if total == 0:
        return {"nat": float("nan"), "pgd": float("nan"), "size": 0}
    return {"nat": nat / total, "pgd": pgd_correct / total, "size": int(total)}


# ----------------------------------------------------------------------------- optimisation


@dataclass(frozen=True)
class Schedule:
    """SPEC §5: SGD with momentum, lr ×``gamma`` at each milestone epoch, stepped once per epoch."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-4
    milestones: tuple = (75, 90, 100)
    gamma: float = 0.1

    def __post_init__(self):
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("need --lr > 0 and --weight-decay >= 0")


def build_optimizer(model, schedule: Schedule):
    """SGD over the model's parameters with the schedule's momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay)


def build_scheduler(optimizer, schedule: Schedule):
    """MultiStepLR at the schedule's milestones (one ``step()`` per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.milestones), schedule.gamma)


# ----------------------------------------------------------------------------- the epoch loop


@dataclass
class RunInfo:
    """What a checkpoint records besides the training state: the run's folder, its arguments
    (a plain dict) and the model config that ``models.load_model`` reads back."""

    run_dir: Optional[Path]
    args: dict
    model_config: dict
    title: str = ""


@dataclass
class BestSoFar:
    """The checkpoint selection: best PGD accuracy so far on ``split`` ('val' or 'test')."""

    split: str
    score: float = -1.0
    epoch: Optional[int] = None

    def describe(self):
        where = ("the validation split held out from training" if self.split == "val"
                 else "the test subset (no --val-size given)")
        return f"best chosen on {where}"


class Trainer:
    """Runs epochs of ``step`` over ``train_loader``; after each epoch evaluates on
    ``eval_loaders`` ({'test': ..., optionally 'val': ...}), writes metrics, curves and
    checkpoints into ``run.run_dir`` (if not None)."""

    def __init__(self, step: TrainStep, scheduler, train_loader, eval_loaders, run: RunInfo, *, epochs,
                 eval_config: EvalConfig = EvalConfig(), save_freq=10, quiet=False, sync_every=20,
                 context: distributed.Context = distributed.SINGLE, reseed=None):
        if "test" not in eval_loaders:
            raise ConfigError("the trainer needs a 'test' evaluation loader")
        self.step = step
        self.model = step.model
        self.optimizer = step.optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.eval_loaders = eval_loaders
        self.run = run
        self.epochs = epochs
        self.eval_config = eval_config
        self.save_freq = save_freq
        self.quiet = quiet
        self.sync_every = max(1, sync_every)
        self.context = context
        self.reseed = reseed  # reseed(epoch): per-rank RNG at each epoch start (distributed runs)
        self._stop_poll = distributed.StopPoll(context)
        self.best = BestSoFar("val" if "val" in eval_loaders else "test")
        self.records = []
        self.completed_epochs = 0
        self._stop_signal = None

    # --- logging

    def log(self, message):
        """Print ``message`` (without breaking progress bars) and append it to ``log.txt`` (rank 0 only)."""
        if not self.context.is_main:
            return
        tqdm.write(message, file=sys.stdout)
        if self.run.run_dir is not None:
            with open(self.run.run_dir / "log.txt", "a", encoding="utf-8") as handle:
                handle.write(message + "\n")

    def _bars_enabled(self):
        return not self.quiet and self.context.is_main and sys.stderr.isatty()

    # --- checkpoints

    def checkpoint(self, epoch, interrupted_epoch=None):
        """The full training state after ``epoch`` completed epochs (weights_only-safe)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "model_config": dict(self.run.model_config),
            "args": dict(self.run.args),
            "epoch": epoch,
            "interrupted_epoch": interrupted_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler_state(self.scheduler),
            "rng": capture_rng(),
            "best": asdict(self.best),
            "metrics": self.records[-1] if self.records else None,
        }

    def restore(self, payload):
        """Load a checkpoint written by :meth:`checkpoint`; returns the epoch to start from."""
        unwrap(self.model).load_state_dict(payload["model"], strict=True)
        self.optimizer.load_state_dict(payload["optimizer"])
        load_scheduler_state(self.scheduler, payload["scheduler"])
        best = payload.get("best") or {}
        if best.get("split", self.best.split) == self.best.split:
            self.best = BestSoFar(**best)
        self.completed_epochs = payload["epoch"]
        if self.run.run_dir is not None:
            self.records = read_metrics(self.run.run_dir, self.completed_epochs)
            write_metrics(self.run.run_dir, self.records)
        restore_rng(payload["rng"])
        if payload.get("interrupted_epoch"):
            self.log(f"resuming interrupted epoch {payload['interrupted_epoch']}: it restarts from the weights "
                     f"saved at the interruption")
        return self.completed_epochs + 1

    def _last_good(self):
        if self.run.run_dir is None or self.completed_epochs == 0:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {self.run.run_dir / LAST} (epoch {self.completed_epochs}) is intact"

    def _save_epoch(self, epoch, is_best):
        run_dir = self.run.run_dir
        if run_dir is None:
            return
        write_metrics(run_dir, self.records)
        plot_curves(self.records, run_dir / "curves.png", self.run.title)
        targets = [run_dir / BEST] if is_best else []
        if self.save_freq and epoch % self.save_freq == 0:
            targets.append(run_dir / f"epoch_{epoch}.pt")
        atomic_save_many(self.checkpoint(epoch), targets + [run_dir / LAST])  # last.pt replaced last

    # --- signals

    @contextmanager
    def _stop_requests(self):
        """Turn SIGINT / SIGTERM into a flag checked at batch boundaries (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, _frame):
            if self._stop_signal:  # second request: give up at once, without saving
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            sys.stderr.write(f"\n{self._stop_signal}: saving last.pt after this batch "
                             f"(send it again to abort without saving)\n")

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_agreed(self):
        """Whether any rank was asked to stop (a collective in distributed runs)."""
        if not self.context.enabled:
            return bool(self._stop_signal)
        device = next(unwrap(self.model).parameters()).device
        flag = torch.tensor([float(bool(self._stop_signal))], device=device)
        if distributed.all_reduce_sum(self.context, flag).item() > 0:
            self._stop_signal = self._stop_signal or "a stop request on another rank"
        return bool(self._stop_signal)

    def _stop_now(self, epoch, mid_epoch=True):
        """Raise TrainingInterrupted; mid-epoch, first save ``last.pt`` with ``epoch`` marked incomplete."""
        where = ""
        if self.run.run_dir is not None:
            if mid_epoch:
                atomic_save(self.checkpoint(epoch - 1, interrupted_epoch=epoch), self.run.run_dir / LAST)
            where = f"; saved {self.run.run_dir / LAST}, continue with --resume {self.run.run_dir}"
        distributed.barrier(self.context)  # no rank exits (and makes torchrun kill the others) before the save
        when = f"during epoch {epoch}" if mid_epoch else f"after epoch {epoch}"
        raise TrainingInterrupted(f"stopped by {self._stop_signal} {when}{where}")

    # --- the loop

    def _host_means(self, sums, count, epoch, batch):
        """Bring the running sums to the host (one sync) as means over all ranks; stop on a NaN/inf
        loss (every rank sees the same reduced loss, so all stop together)."""
        names = list(sums)
        values = torch.stack([sums[k].float() for k in names])
        values = (distributed.all_reduce_sum(self.context, values) / (self.context.world_size * count)).tolist()
        means = dict(zip(names, values))
        if not math.isfinite(means["loss"]):
            raise NonFiniteLossError(
                f"the training loss became {means['loss']} in epoch {epoch} (within its first {batch} batches); "
                f"training stopped without saving and {self._last_good()}; lower --lr or check the data")
        return means

    def train_epoch(self, epoch):
        """One pass over the training data; returns the epoch means of the step metrics."""
        self.train_loader.set_epoch(epoch)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not self._bars_enabled())
        sums, means, count = {}, {}, 0
        for batch, (x, y) in enumerate(bar, 1):
            metrics = self.step(x, y, epoch)
            for name, value in metrics.items():
                sums[name] = sums[name] + value if name in sums else value
            count += 1
            stop = self._stop_poll(self._stop_signal)
            if stop and not self._stop_signal:
                self._stop_signal = "a stop request on another rank"
            if batch % self.sync_every == 0 or batch == len(self.train_loader) or stop:
                means = self._host_means(sums, count, epoch, batch)
                bar.set_postfix(loss=f"{means['loss']:.3f}",
                                acc=f"{100 * means.get('acc_adv', means.get('acc_nat', 0.0)):.1f}%")
            if stop:
                bar.close()
                self._stop_now(epoch)
        bar.close()
        return means

    def evaluate_all(self):
        """``{split: evaluate(...)}`` for each evaluation loader."""
        model, speed = self.step.attack_model, self.step.speed
        reduce = lambda counts: distributed.all_reduce_sum(self.context, counts)  # noqa: E731
        return {split: evaluate(model, loader, self.eval_config, speed, reduce)
                for split, loader in self.eval_loaders.items()}

    def fit(self, start_epoch=1):
        """Train epochs ``start_epoch..epochs``; returns the list of epoch records."""
        if start_epoch > self.epochs:
            self.log(f"nothing to do: the run already finished {self.epochs} epochs (pass a larger --epochs to go on)")
            return self.records
        self.log(f"{self.best.describe()}; epochs {start_epoch}..{self.epochs}")
        with self._stop_requests():
            for epoch in range(start_epoch, self.epochs + 1):
                started = time.perf_counter()
                if self.reseed is not None:
                    self.reseed(epoch)
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_epoch(epoch)
                self.scheduler.step()
                results = self.evaluate_all()
                record = {"epoch": epoch, "lr": lr, "train": train, **results,
                          "eval_attack": self.eval_config.attack_name}
                score = results[self.best.split]["pgd"]
                is_best = score > self.best.score
                if is_best:
                    self.best = BestSoFar(self.best.split, score, epoch)
                record["seconds"] = round(time.perf_counter() - started, 3)
                record["best"] = asdict(self.best)
                self.records.append(record)
                self.completed_epochs = epoch
                self._save_epoch(epoch, is_best)
                self.log(self.summary(record))
                if self._stop_agreed():
                    self._stop_now(epoch, mid_epoch=False)
        self._stop_poll.finish()
        self.log(f"done: {self.best.describe()}: {self.eval_config.attack_name} "
                 f"{100 * self.best.score:.2f}% at epoch {self.best.epoch}")
        return self.records

    def summary(self, record):
        """The one-line epoch summary."""
        train = record["train"]
        terms = " ".join(f"{k} {v:.4f}" for k, v in train.items() if not k.startswith(("acc_", "anc_fired", "neg_valid")))
        acc_key = "acc_adv" if "acc_adv" in train else "acc_nat"
        parts = [f"epoch {record['epoch']}/{self.epochs}", f"lr {record['lr']:.4g}", terms,
                 f"train {acc_key} {100 * train.get(acc_key, float('nan')):.1f}%"]
        for split in ("test", "val"):
            if split in record:
                r = record[split]
                parts.append(f"{split} nat {100 * r['nat']:.1f}% {record['eval_attack']} {100 * r['pgd']:.1f}%")
        best = record["best"]
        parts.append(f"best ({best['split']}) {100 * best['score']:.1f}% @ {best['epoch']}")
        parts.append(f"{record['seconds']:.0f}s")
        return " | ".join(parts)
