"""Resumable orchestration of a study: for each row, the phases not yet done (train or resume,
evaluate, BatchNorm check, features / UMAP), each a child process; then the study's figures, and
the table after every phase. Rerunning the same command continues where the last one stopped."""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from utils.checkpoint import BEST, atomic_write_json, atomic_write_text
from utils.locks import LOCK_NAME, busy_message, lock_is_stale, read_lock
from utils.reproduce import commands
from utils.reproduce.launcher import STOP_SIGNALS, Launcher, child_environment
from utils.reproduce.plan import ROOT
from utils.reproduce.schedule import run_concurrently
from utils.reproduce.state import (
    RunStateError,
    StateFile,
    evaluates_checkpoint,
    finished_results,
    git_commit,
    has_results,
    move_aside,
    read_json,
    record_evaluated_checkpoint,
    trained_files,
    training_progress,
    unreadable_results,
)
from utils.reproduce.table import (
    RowInput,
    build_table,
    render_figures_markdown,
    render_markdown,
)

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process row locks
    fcntl = None

INTERRUPTED, FAILED = 130, 1


@dataclass
class Phase:
    """One step of a row: done already?, its command, a progress text, and what to do after it."""

    name: str
    done: Callable[[], bool]
    command: Callable[[], list]
    describe: Callable[[], str]
    finish: Callable[[], None] | None = None
    problem: Callable[[], str | None] = lambda: None
    prepare: Callable[[str], None] | None = None  # given the row's prefix, runs just before the command


class RowFailed(RuntimeError):
    """A phase of a row failed; the message is the one-line reason shown in the table."""


class RowBusy(RuntimeError):
    """Another process still writes the row's run folder; the message says which and what to do."""


class StudyRun:
    """One invocation of reproduce.py on a plan."""

    def __init__(self, plan, launcher=None, tool=None, echo=print):
        self.plan = plan
        self.echo = echo
        self.launcher = launcher or Launcher(echo)
        self.tool = tool
        self.stop = threading.Event()
        self.state = StateFile(plan.study_dir / "state.json")
        self.commit = git_commit(ROOT)
        self._table_lock = threading.Lock()
        self.failed = []
        self.busy = []

    # ---------------------------------------------------------------- phases

    def training_phase(self, row):
        """Train the row from scratch, or resume its run folder; done when last.pt holds every epoch."""
        plan, run_dir = self.plan, self.plan.run_dir(row)

        def problem():
            progress = training_progress(run_dir)
            kept = trained_files(run_dir) if progress is None else []
            if kept:
                return (f"{run_dir} holds {', '.join(kept)} but no last.pt, and a new run would delete them; "
                        f"resume it by hand from its newest epoch_N.pt (--resume RUN/epoch_N.pt) or move the folder "
                        f"away, then rerun")
            if progress and progress[1] != plan.epochs:
                return (f"{run_dir} was started for {progress[1]} epochs, not {plan.epochs}; move it away or "
                        f"choose another --out-dir")
            return None

        def describe():
            progress = training_progress(run_dir)
            return f"training (epoch {progress[0]}/{plan.epochs} done)" if progress else \
                f"training (new run, {plan.schedule_text()})"

        def done():
            progress = training_progress(run_dir)
            return bool(progress) and progress[0] >= plan.epochs and progress[1] == plan.epochs

        return Phase("training", done,
                     lambda: commands.train_command(plan, row, resume=training_progress(run_dir) is not None),
                     describe, problem=problem)

    def evaluation_phase(self, row):
        """test_white_attack.py on best.pt; done when its results.json is complete and of best.pt as it
        is now (its size and mtime, else its sha256, recorded in the folder when the evaluation started)."""
        plan, eval_dir = self.plan, self.plan.eval_dir(row)
        checkpoint = plan.run_dir(row) / BEST
        done = lambda: finished_results(eval_dir) is not None and evaluates_checkpoint(eval_dir, checkpoint)
        resume = lambda: has_results(eval_dir) and self.tool.resume
        return Phase("evaluation", done, lambda: commands.evaluate_command(plan, row, self.tool, resume=resume()),
                     lambda: f"evaluating {plan.n_examples} test examples ({plan.budget} budget"
                             f"{', resuming' if resume() else ''})",
                     prepare=lambda prefix: self.prepare_evaluation(prefix, eval_dir, checkpoint))

    def prepare_evaluation(self, prefix, eval_dir, checkpoint):
        """Before an evaluation: move aside what it could not use (never delete), with a note: results
        cut off while being written, or an evaluation of another best.pt; then record which best.pt it
        measures. An evaluation stopped before its first attack finished left only the folder: it
        starts afresh (``--resume`` needs results to continue)."""
        for path in unreadable_results(eval_dir):
            moved = move_aside(path, "unreadable")
            self.echo(f"{prefix} note: {path.name} was cut off or unreadable (an unfinished evaluation); moved to "
                      f"{moved.name}, evaluating again")
        if checkpoint.is_file() and has_results(eval_dir) and not evaluates_checkpoint(eval_dir, checkpoint):
            moved = move_aside(eval_dir, "other-checkpoint")
            self.echo(f"{prefix} note: {eval_dir.name} holds an evaluation of another {checkpoint.name}; moved to "
                      f"{moved.name}, evaluating the current one")
        if checkpoint.is_file() and not has_results(eval_dir):
            eval_dir.mkdir(parents=True, exist_ok=True)
            record_evaluated_checkpoint(eval_dir, checkpoint)

    def batchnorm_phase(self, row):
        """Clean accuracy with running vs batch BatchNorm statistics (utils/reproduce/bn.py); it lives in
        the evaluation's folder, so it goes with it when that is moved aside."""
        return Phase("BatchNorm check", lambda: read_json(self.plan.bn_file(row)) is not None,
                     lambda: commands.batchnorm_command(self.plan, row),
                     lambda: "BatchNorm check (running vs batch statistics)")

    def features_phase(self, row):
        """feature_distance.py for class 0, written under a temporary name and renamed when complete."""
        final = self.plan.features_file(row)
        partial = final.with_name(final.stem + ".partial.npz")
        return Phase("features", final.exists, lambda: commands.features_command(self.plan, row, partial),
                     lambda: "feature distances (class 0)", finish=lambda: os.replace(partial, final))

    def figure_phase(self, figure, rows):
        """draw_hist.py or draw_umap.py into the figure's folder; done.json marks it complete."""
        out_dir = self.plan.figures_dir / figure.name
        marker = out_dir / "done.json"
        if figure.kind == "umap":
            command = lambda: commands.umap_command(self.plan, rows[0], out_dir)
        else:
            command = lambda: commands.histogram_command(self.plan, rows, out_dir)
        finish = lambda: atomic_write_json(marker, {"figure": figure.name, "rows": [r.name for r in rows]})
        describe = lambda: f"drawing the {figure.kind} of {', '.join(figure.rows)}"
        return Phase(figure.name, marker.exists, command, describe, finish=finish)

    def row_phases(self, row):
        """The row's phases in order: training, then evaluation (+ BatchNorm check) or features (+ UMAP)."""
        phases = [self.training_phase(row)]
        if self.plan.study.evaluate:
            phases.append(self.evaluation_phase(row))
            if row.shares_final_bn:
                phases.append(self.batchnorm_phase(row))
        else:
            phases.append(self.features_phase(row))
            phases += [self.figure_phase(f, (row,)) for f in self.plan.study.figures
                       if f.kind == "umap" and f.rows == (row.name,)]
        return phases

    # ---------------------------------------------------------------- running

    def left(self):
        """What is left over all selected rows, for the progress line."""
        plan = self.plan
        train = sum(1 for r in plan.rows if _trained_epochs(plan.run_dir(r)) < plan.epochs)
        if not plan.study.evaluate:
            return f"left: {train} to train"
        evaluate = sum(1 for r in plan.rows if finished_results(plan.eval_dir(r)) is None)
        return f"left: {train} to train, {evaluate} to evaluate"

    def run_phase(self, phase, prefix, slot, log, keep_fds):
        """Run one phase's child; raise RowFailed with the reason when it fails (not when stopped)."""
        reason = phase.problem()
        if reason:
            raise RowFailed(f"{phase.name}: {reason}")
        if phase.prepare is not None:
            phase.prepare(prefix)
        self.echo(f"{prefix} {phase.describe()} | {self.left()}")
        code, tail = self.launcher.run(phase.command(), child_environment(slot, ROOT), log, prefix, keep_fds)
        if self.stop.is_set():
            return False
        if code != 0 or (phase.finish is None and not phase.done()):
            raise RowFailed(f"{phase.name}: {failure_line(code, tail)} (log: {log})")
        if phase.finish is not None:
            phase.finish()
        return True

    def process_row(self, indexed, slot):
        """Every phase of one row that is not done yet, in order; failures are recorded, not raised."""
        index, row = indexed
        plan = self.plan
        prefix = f"[row {index}/{len(plan.rows)} {row.name}]"
        phases = self.row_phases(row)
        with row_lock(plan.runs_dir(row), plan.run_dir(row).name) as lock:
            try:
                check_not_busy(plan.run_dir(row), lock is None)
                if all(p.done() for p in phases):
                    self.echo(f"{prefix} already done ({plan.run_dir(row)})")
                    self.state.update(row.name, status="done", error=None)
                    return
                self.state.update(row.name, status="running", error=None)
                log = plan.run_dir(row).parent / f"{plan.run_dir(row).name}.reproduce.log"
                for phase in phases:
                    if self.stop.is_set():
                        break
                    if phase.done():
                        continue
                    if not self.run_phase(phase, prefix, slot, log, (lock,) if lock >= 0 else ()):
                        break
                    self.state.update(row.name, **{f"commit_{phase.name.split()[0].lower()}": self.commit})
                status = "interrupted" if self.stop.is_set() else "done"
                self.state.update(row.name, status=status)
                if status == "done":
                    self.echo(f"{prefix} done")
            except RowBusy as err:
                self.busy.append(row.name)
                self.state.update(row.name, status="busy", error=str(err))
                self.echo(f"{prefix} not started: {err}")
            except Exception as err:  # noqa: BLE001  (a row's failure must not stop the other rows)
                if not isinstance(err, (RowFailed, RunStateError, OSError)):
                    err = f"{type(err).__name__}: {err}"
                self.failed.append(row.name)
                self.state.update(row.name, status="failed", error=str(err))
                self.echo(f"{prefix} failed: {err}")
            finally:
                self.write_table()

    def draw_figures(self):
        """The study's histogram figures, once every row they need has its features."""
        by_name = {r.name: r for r in self.plan.rows}
        for figure in self.plan.study.figures:
            if figure.kind == "umap" or self.stop.is_set():
                continue
            rows = [by_name.get(name) for name in figure.rows]
            if None in rows or not all(self.plan.features_file(r).exists() for r in rows):
                continue
            phase = self.figure_phase(figure, tuple(rows))
            if phase.done():
                continue
            try:
                self.run_phase(phase, f"[figure {figure.name}]", self.plan.slots[0],
                               self.plan.figures_dir / f"{figure.name}.reproduce.log", ())
            except (RowFailed, OSError) as err:
                self.failed.append(figure.name)
                self.echo(f"[figure {figure.name}] failed: {err}")

    def run(self):
        """Run the plan; returns the exit code (0 done, 1 a row failed, 130 stopped)."""
        self.plan.study_dir.mkdir(parents=True, exist_ok=True)
        self.write_table()
        if len(self.plan.slots) > 1 and len(self.plan.rows) > 1:
            self.echo(f"up to {len(self.plan.slots)} rows at a time: {describe_slots(self.plan.slots)}")
        with forward_stop_signals(self):
            if self.tool is None and self.plan.study.evaluate:
                self.tool = commands.EvaluationTool.probe()
            run_concurrently(list(enumerate(self.plan.rows, 1)), self.plan.slots, self.process_row, self.stop)
            if not self.stop.is_set():
                run_concurrently([None], self.plan.slots[:1], lambda _item, _slot: self.draw_figures(), self.stop)
        self.write_table()
        table = self.plan.study_dir / "table.md"
        if self.stop.is_set():
            self.echo(f"stopped; run the same command again to continue. Table so far: {table}")
            return INTERRUPTED
        notes = [f"{len(self.failed)} failed: {', '.join(self.failed)}"] if self.failed else []
        if self.busy:
            notes.append(f"{len(self.busy)} still running in another process: {', '.join(self.busy)}; rerun when "
                         f"they finish")
        self.echo(f"table: {table}" + (f" ({'; '.join(notes)})" if notes else ""))
        return FAILED if self.failed or self.busy else 0

    # ---------------------------------------------------------------- table

    def row_input(self, row):
        """What the files and the state file say about ``row`` now."""
        plan = self.plan
        entry = self.state.get(row.name)
        results = finished_results(plan.eval_dir(row)) if plan.study.evaluate else None
        trained = _trained_epochs(plan.run_dir(row))
        try:
            finished = (results is not None or not plan.study.evaluate) and all(p.done() for p in self.row_phases(row))
        except RunStateError as err:
            entry, finished = {"status": "failed", "error": str(err)}, False
        if entry.get("status") == "failed":
            status = "failed: " + (entry.get("error") or "unknown error").splitlines()[0]
        elif entry.get("status") == "busy":
            status = "running in another process (rerun when it finishes)"
        elif finished:
            status = "done"
        elif 0 < trained < plan.epochs:
            status = f"pending (trained {trained}/{plan.epochs} epochs)"
        else:
            status = "pending"
        batchnorm = read_json(plan.bn_file(row)) if row.shares_final_bn else None
        commit = entry.get("commit_evaluation") or entry.get("commit_training")
        return RowInput(row, status, str(plan.run_dir(row)), results if status == "done" else None, batchnorm,
                        commit)

    def settings(self):
        """The invocation's settings as the table reports them."""
        plan = self.plan
        return {"dataset": plan.dataset, "epochs": plan.epochs, "milestones": list(plan.milestones),
                "seed": plan.seed, "seeds": list(plan.seed_list), "n_examples": plan.n_examples, "budget": plan.budget,
                "smoke": plan.smoke, "commit": self.commit}

    def write_table(self):
        """Rewrite table.json and table.md (or, for the figures study, the list of figures) from the
        files and state.json as they are now, under the study's lock: the last table written is
        never older than the last state written by any invocation."""
        with self._table_lock, self.state.locked():
            items = [self.row_input(row) for row in self.plan.rows]
            study_dir = self.plan.study_dir
            if self.plan.study.evaluate:
                table = build_table(self.plan.study, self.settings(), items)
                text = render_markdown(table)
            else:
                figures = {f.name: self.figure_phase(f, ()).done() for f in self.plan.study.figures}
                table = {"study": self.plan.study.name, "settings": self.settings(),
                         "figures_dir": str(self.plan.figures_dir), "figures": figures,
                         "rows": [{"row": i.row.name, "status": i.status, "run_dir": i.run_dir} for i in items]}
                text = render_figures_markdown(table)
            atomic_write_json(study_dir / "table.json", table)
            atomic_write_text(study_dir / "table.md", text)


def describe_slots(slots):
    """The devices of the concurrent rows in words: "3 on GPU 0, 3 on GPU 1", "2 on the default device"."""
    counts = {}
    for slot in slots:
        counts[slot] = counts.get(slot, 0) + 1
    return ", ".join(f"{n} on " + ("the default device" if slot is None else f"GPU{'s' if ',' in slot else ''} {slot}")
                     for slot, n in counts.items())


def _trained_epochs(run_dir):
    """Completed epochs of a run (0 when it has none or its last.pt cannot be read)."""
    try:
        return (training_progress(run_dir) or (0,))[0]
    except RunStateError:
        return 0


def failure_line(code, tail):
    """The one-line reason of a failed child: its last ``error: ...`` line, else its last line."""
    for line in reversed(tail):
        if line.strip().startswith("error:"):
            return line.strip()
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return f"exit code {code}" + (f": {last}" if last else "")


@contextmanager
def row_lock(folder, name):
    """An exclusive lock on ``folder/name.lock`` (yields its file descriptor), or None when another
    process holds it. Children inherit the descriptor, so a row stays locked while they live, even
    after the reproduce.py that started them is gone. The file names the reproduce.py that took it."""
    if fcntl is None:
        yield -1
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield None
            return
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield fd
    finally:
        os.close(fd)


def check_not_busy(run_dir, row_locked):
    """Raise RowBusy when another process still works on ``run_dir``: its reproduce row lock is held
    (``row_locked``: by another reproduce.py, or by a step it started that outlived it), or a live
    process holds the run folder's own lock (a training run, utils/locks.py)."""
    run_dir = Path(run_dir)
    owner = read_lock(run_dir)
    if (run_dir / LOCK_NAME).exists() and not lock_is_stale(owner):
        raise RowBusy(busy_message(run_dir, "a training run", owner))
    if row_locked:
        starter = read_json(run_dir.parent / f"{run_dir.name}.lock") or {}
        raise RowBusy(f"another process still works on {run_dir} (a step started by reproduce.py pid "
                      f"{starter.get('pid', '?')} at {starter.get('started', '?')}; its log: "
                      f"{run_dir.name}.reproduce.log); wait for it to finish (or stop it), then rerun")


@contextmanager
def forward_stop_signals(study):
    """SIGINT / SIGTERM set the study's stop flag and reach the running children once each; a
    second signal is forwarded too (a training run then aborts without saving)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        first = not study.stop.is_set()
        study.stop.set()
        name = signal.Signals(signum).name
        study.echo(f"{name}: " + ("letting the running steps save, then stopping (send it again to abort them)"
                                  if first else "forwarded again: running steps abort without saving"))
        study.launcher.forward(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
