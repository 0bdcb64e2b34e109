"""The epoch loop: train, check robustness, record, checkpoint; stop cleanly on a signal or a
non-finite loss. Checkpoints are written at epoch ends only, so ``last.pt`` always holds a
clean epoch-end state from which an interrupted epoch restarts (bit-exactly as if never stopped).
"""
import math
import shlex
import sys
import time
from dataclasses import asdict

import torch
from tqdm import tqdm

from models import unwrap
from utils import distributed
from utils.checkpoint import (
    LAST,
    RunWriteError,
    atomic_save,
    restore_rng,
)
from utils.training.config import RECIPE_CHECK, EvalConfig
from utils.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from utils.training.fast import FastStep
from utils.training.monitor import monitor_accuracy
from utils.training.records import (
    BestSoFar,
    RunInfo,
    checkpoint_payload,
    load_training_state,
    resumed_records,
    save_epoch_files,
    summary_line,
    write_reason,
)
from utils.training.stop import StopControl
from utils.training.updates import EMA


class Trainer:
    """Runs epochs of ``step`` (a TrainStep as the speed options run it) over ``train_loader``;
    after each epoch checks the model (the EMA weights when the step keeps them) on
    ``eval_loaders`` ({'test': ..., optionally 'val': ...}) and writes metrics, curves and
    checkpoints into ``run.run_dir`` (if not None)."""

    def __init__(self, step: FastStep, scheduler, train_loader, eval_loaders, run: RunInfo, *, epochs,
                 eval_config: EvalConfig = RECIPE_CHECK, save_freq=10, quiet=False, sync_every=20,
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
        self.stop = StopControl(context)
        self.best = BestSoFar("val" if "val" in eval_loaders else "test")
        self.records = []
        self.completed_epochs = 0

    def log(self, message):
        """Print ``message`` (without breaking progress bars) and append it to ``log.txt`` (rank 0 only)."""
        if not self.context.is_main:
            return
        tqdm.write(message, file=sys.stdout)
        if self.run.run_dir is not None:
            try:
                with open(self.run.run_dir / "log.txt", "a", encoding="utf-8") as handle:
                    handle.write(message + "\n")
            except OSError as err:
                raise RunWriteError(f"could not append to {self.run.run_dir / 'log.txt'} ({write_reason(err)}); "
                                    f"{self._last_good()}: free space and continue with --resume "
                                    f"{self.run.run_dir}") from err

    # --- checkpoints

    def checkpoint(self, epoch):
        """The full training state after ``epoch`` completed epochs."""
        return checkpoint_payload(self.step, self.scheduler, self.run, epoch, self.best,
                                  self.records[-1] if self.records else None)

    def restore(self, payload):
        """Load a checkpoint written by :meth:`checkpoint`; returns the epoch to start from."""
        load_training_state(self.step, self.scheduler, payload)
        best = payload.get("best") or {}
        if best.get("split", self.best.split) == self.best.split:
            self.best = BestSoFar(**best)
        self.completed_epochs = payload["epoch"]
        if self.run.run_dir is not None:
            self.records = resumed_records(self.run.run_dir, payload)  # metrics.jsonl is rewritten at the next save
        restore_rng(payload["rng"])
        if payload.get("interrupted_epoch"):  # written by versions that saved at the interruption
            self.log(f"resuming interrupted epoch {payload['interrupted_epoch']}: it restarts from the weights "
                     f"saved at the interruption")
        return self.completed_epochs + 1

    def _last_good(self):
        if self.run.run_dir is None or not (self.run.run_dir / LAST).is_file():
            return "no checkpoint had been written yet"
        return f"the last good checkpoint {self.run.run_dir / LAST} (epoch {self.completed_epochs}) is intact"

    def _save_epoch(self, epoch, is_best):
        if self.run.run_dir is not None:
            save_epoch_files(self.run, self.records, self.checkpoint(epoch), is_best=is_best, save_freq=self.save_freq)

    def _stop_now(self, epoch, mid_epoch=True):
        """Raise TrainingInterrupted; ``last.pt`` is the epoch-end checkpoint and is left as it is."""
        where = ""
        if self.run.run_dir is not None:
            last, run_dir = self.run.run_dir / LAST, self.run.run_dir
            if mid_epoch:
                where = (f"; epoch {epoch} restarts from the epoch-end checkpoint {last} (epoch "
                         f"{self.completed_epochs}): continue with --resume {shlex.quote(str(run_dir))}")
            else:
                where = f"; saved {last}, continue with --resume {shlex.quote(str(run_dir))}"
        distributed.barrier(self.context)  # no rank exits (and makes torchrun kill the others) before the save
        when = f"during epoch {epoch}" if mid_epoch else f"after epoch {epoch}"
        raise TrainingInterrupted(f"stopped by {self.stop.reason} {when}{where}")

    # --- one epoch

    def _host_means(self, sums, batch, epoch):
        """Bring the running sums to the host (one sync) as means over all ranks; stop on a NaN/inf
        loss (every rank sees the same reduced loss, so all stop together)."""
        names = list(sums)
        values = torch.stack([sums[k].float() for k in names])
        values = (distributed.all_reduce_sum(self.context, values) / (self.context.world_size * batch)).tolist()
        means = dict(zip(names, values))
        if not math.isfinite(means["loss"]):
            raise NonFiniteLossError(
                f"the training loss became {means['loss']} in epoch {epoch} (within its first {batch} batches); "
                f"training stopped without saving and {self._last_good()}; lower --lr or check the data")
        return means

    def train_epoch(self, epoch):
        """One pass over the training data; returns the epoch means of the step metrics."""
        self.train_loader.set_epoch(epoch)
        bars = not self.quiet and self.context.is_main and sys.stderr.isatty()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not bars)
        sums, means = {}, {}
        for batch, (x, y) in enumerate(bar, 1):
            metrics = self.step(x, y, epoch)
            for name, value in metrics.items():
                sums[name] = sums[name] + value if name in sums else value
            stop = self.stop.poll()
            if batch % self.sync_every == 0 or batch == len(self.train_loader) or stop:
                means = self._host_means(sums, batch, epoch)
                bar.set_postfix(loss=f"{means['loss']:.3f}",
                                acc=f"{100 * means.get('acc_adv', means.get('acc_nat', 0.0)):.1f}%")
            if stop:
                bar.close()
                self._stop_now(epoch)
        bar.close()
        return means

    def monitored_model(self):
        """The model the per-epoch check sees: the EMA weights when kept, else the trained ones."""
        ema = self.step.update.find(EMA)
        return self.step.attack_model if ema is None else ema.model(self.model)

    def evaluate_all(self):
        """``{split: monitor_accuracy(...)}`` for each evaluation loader."""
        model, speed = self.monitored_model(), self.step.speed
        reduce = lambda counts: distributed.all_reduce_sum(self.context, counts)
        return {split: monitor_accuracy(model, loader, self.eval_config, speed, reduce)
                for split, loader in self.eval_loaders.items()}

    def run_epoch(self, epoch):
        """Train and check one epoch, save its checkpoints; returns its record."""
        started = time.perf_counter()
        if self.reseed is not None:
            self.reseed(epoch)
        lr = self.optimizer.param_groups[0]["lr"]
        train = self.train_epoch(epoch)
        compile_s = self.step.take_compile_seconds()  # --compile: the calls that compiled a graph
        self.scheduler.step()
        results = self.evaluate_all()
        record = {"epoch": epoch, "lr": lr, "train": train, **results, "eval_attack": self.eval_config.attack_name}
        if compile_s:
            record["compile_seconds"] = round(compile_s, 3)
            self.log(f"compiled the training step in {compile_s:.1f} s (epoch {epoch})")
        if self.step.update.find(EMA) is not None:
            record["eval_weights"] = "ema"
        score = results[self.best.split]["pgd"]
        is_best = score > self.best.score
        if is_best:
            self.best = BestSoFar(self.best.split, score, epoch)
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["best"] = asdict(self.best)
        self.records.append(record)
        self.completed_epochs = epoch
        self._save_epoch(epoch, is_best)
        self.log(summary_line(record, self.epochs))
        return record

    def fit(self, start_epoch=1):
        """Train epochs ``start_epoch..epochs``; returns the list of epoch records. A new run first
        saves its starting state as ``last.pt`` (epoch 0), so a stop in epoch 1 resumes too."""
        if start_epoch > self.epochs:
            self.log(f"nothing to do: the run already finished {self.epochs} epochs (pass a larger --epochs to go on)")
            return self.records
        if start_epoch == 1 and self.run.run_dir is not None:
            try:
                atomic_save(self.checkpoint(0), self.run.run_dir / LAST)
            except OSError as err:
                raise RunWriteError(f"could not write the starting checkpoint {self.run.run_dir / LAST} "
                                    f"({write_reason(err)}); no epoch was trained: free space and start it again "
                                    f"with --overwrite") from err
        self.log(f"{self.best.describe()}; epochs {start_epoch}..{self.epochs}")
        device = next(unwrap(self.model).parameters()).device
        with self.stop.handling_signals():
            for epoch in range(start_epoch, self.epochs + 1):
                self.run_epoch(epoch)
                if self.stop.agreed(device):
                    self._stop_now(epoch, mid_epoch=False)
        self.stop.finish()
        self.log(f"done: {self.best.describe()}: {self.eval_config.attack_name} "
                 f"{100 * self.best.score:.2f}% at epoch {self.best.epoch}")
        return self.records
