"""Run directories and checkpoints that never lose work: atomic writes, RNG capture/restore,
and the refusal to start over an existing run by accident.

A run directory holds ``args.json``, ``metrics.jsonl``, ``log.txt``, ``curves.png`` and the
checkpoints ``last.pt``, ``best.pt`` and ``epoch_N.pt``. Every file is written to a temporary
name next to its target and renamed over it, so a crash never leaves a half-written file.
"""
import json
import os
import random
import re
import shlex
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from models import CheckpointError, read_checkpoint
from models.loading import saved_args, saved_model_config

LAST, BEST = "last.pt", "best.pt"
RUN_FILES = ("args.json", "metrics.jsonl", "log.txt", "curves.png", LAST, BEST)
FILE_MODE = 0o644  # mkstemp makes 0600 files; run outputs are ordinary readable files
_EPOCH_FILE = re.compile(r"^epoch_\d+\.pt$")
_TEMP_FILE = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]+\.tmp$")  # tempfile.mkstemp names


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists already, not a run, ...)."""


class RunWriteError(RunDirError):
    """Writing into the run directory failed (disk full, permissions); the message says which
    files are intact and how to continue."""


def _atomic_write(path, write):
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.
    A symlink is written through (its target is replaced), never replaced by a regular file."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _WriteErrors:
    """A file wrapper that keeps the first OSError of a write: ``torch.save`` reports a failed write
    (a full disk) as a RuntimeError about stream positions, and the real cause is raised instead."""

    def __init__(self, handle):
        self.handle = handle
        self.error = None

    def write(self, data):
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.handle.flush()


def _torch_save(obj, handle):
    """``torch.save(obj, handle)``; a failed write raises its OSError (``No space left on device``)."""
    writer = _WriteErrors(handle)
    try:
        torch.save(obj, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def atomic_save(obj, path):
    """``torch.save`` to ``path`` atomically (temp file + rename)."""
    _atomic_write(path, lambda handle: _torch_save(obj, handle))


def atomic_save_many(obj, paths):
    """``torch.save`` once and put the same file at every path, in order, each replaced atomically.

    Hard links make the extra copies free (a later atomic rename over one path gives it a new
    file and leaves the others alone); a plain copy is used where links are not supported.
    """
    paths = [Path(p) for p in paths]
    source = _temp_name(paths[-1])
    try:
        with open(source, "wb") as handle:
            _torch_save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(source, FILE_MODE)
        for path in paths[:-1]:
            copy = _temp_name(path)
            try:
                os.link(source, copy)
            except OSError:
                shutil.copyfile(source, copy)
            os.replace(copy, path)
        os.replace(source, paths[-1])
    finally:
        if os.path.exists(source):
            os.unlink(source)


def _temp_name(path):
    """A fresh unused temporary file name beside ``path``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(name)
    return name


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- RNG


def capture_rng():
    """Every RNG state a training step draws from, as tensors/lists/ints only (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    """Put back the RNG states saved by :func:`capture_rng` (CUDA ones only where CUDA exists)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np.asarray(np_state["keys"], dtype=np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed):
    """Seed torch (CPU and CUDA), numpy and python ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- scheduler


def scheduler_state(scheduler):
    """The scheduler's state with MultiStepLR's ``Counter`` turned into a plain dict (older
    torch versions refuse a Counter under ``weights_only=True``)."""
    state = dict(scheduler.state_dict())
    if isinstance(state.get("milestones"), Counter):
        state["milestones"] = dict(state["milestones"])
    return state


def load_scheduler_state(scheduler, state):
    """Inverse of :func:`scheduler_state`."""
    state = dict(state)
    if isinstance(state.get("milestones"), dict):
        state["milestones"] = Counter(state["milestones"])
    scheduler.load_state_dict(state)


# ----------------------------------------------------------------------------- run directory


def check_run_dir(run_dir, overwrite=False, smoke=False):
    """Refuse, before anything is created or deleted, a ``run_dir`` that cannot take a new run:
    a file, an existing run without ``overwrite``, a folder with run-named files that is not a run
    of ours (no ``args.json``), or (for a smoke run) a run that is not a smoke run.
    Returns the run files that :func:`prepare_run_dir` would delete."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"{parent} exists and is not a directory; choose another --run-name or --out-dir")
    existing = sorted(p for p in run_dir.iterdir() if _is_run_file(p.name)) if run_dir.is_dir() else []
    if existing and not is_run_dir(run_dir):
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise RunDirError(f"{run_dir} holds files named like a run's ({names}) but no readable args.json, so it is "
                          f"not a run of this project and nothing there is replaced; choose another --run-name "
                          f"or --out-dir")
    if existing and smoke and not _is_smoke_run(run_dir):
        raise RunDirError(f"run directory {run_dir} holds a run that is not a smoke run, and a --smoke run never "
                          f"replaces one; choose another --run-name")
    if existing and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already holds a run; pass --resume {shlex.quote(str(run_dir))} to continue it, "
            f"--overwrite to replace it, or --run-name NAME to start a new one")
    return existing


def _read_args(run_dir):
    """The run's ``args.json`` as a dict, or None when it is missing or not a JSON object."""
    try:
        args = json.loads((Path(run_dir) / "args.json").read_text())
    except (OSError, ValueError):
        return None
    return args if isinstance(args, dict) else None


def is_run_dir(run_dir):
    """Whether ``run_dir`` is a run folder of this project: it holds an ``args.json`` object."""
    return _read_args(run_dir) is not None


def _is_smoke_run(run_dir):
    """Whether the run's ``args.json`` says it was a ``--smoke`` run."""
    return (_read_args(run_dir) or {}).get("smoke") is True


def prepare_run_dir(run_dir, overwrite=False, smoke=False):
    """Create ``run_dir`` for a new run after :func:`check_run_dir`; ``overwrite`` deletes only the
    run's own files (anything else in the folder is left alone)."""
    run_dir = Path(run_dir)
    for path in check_run_dir(run_dir, overwrite, smoke):
        path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _is_run_file(name):
    return name in RUN_FILES or bool(_EPOCH_FILE.match(name)) or _is_temp_file(name)


def _is_temp_file(name):
    """Whether ``name`` is a temporary file of our atomic writes of a run file (``.last.pt.ab12cd34.tmp``)."""
    match = _TEMP_FILE.match(name)
    return bool(match) and (match["target"] in RUN_FILES or bool(_EPOCH_FILE.match(match["target"])))


def remove_stale_temp_files(run_dir):
    """Delete the temporary files that interrupted atomic writes left in ``run_dir`` (call it
    only while holding the run folder's lock: a live writer's temporary file is not stale).
    Returns the names removed."""
    stale = sorted(p for p in Path(run_dir).iterdir() if _is_temp_file(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def resolve_resume(path):
    """``(run_dir, checkpoint_path)`` for ``--resume PATH``: a run directory (its last.pt) or a .pt
    file inside one. A resumed run writes into its folder, so the folder must be a run of ours."""
    path = Path(path)
    if path.is_dir():
        checkpoint = path / LAST
        if not checkpoint.is_file():
            raise CheckpointError(f"{path} holds no {LAST}, so there is nothing to resume; "
                                  f"pass a run directory that trained at least one epoch, or a .pt file")
        run_dir = path
    elif path.is_file():
        run_dir, checkpoint = path.parent, path
    else:
        raise CheckpointError(f"--resume {path}: no such run directory or checkpoint file")
    if not (run_dir / "args.json").is_file():
        raise CheckpointError(f"--resume {path}: {run_dir} is not a run folder (no args.json beside {checkpoint.name}) "
                              f"and a resumed run writes into its folder; resume a run folder or a checkpoint "
                              f"inside one")
    return run_dir, checkpoint


def load_training_checkpoint(path):
    """Read a checkpoint written by the training engine (``weights_only=True``), checking it has
    the optimizer/scheduler/RNG state that resuming needs."""
    payload = read_checkpoint(str(path))
    missing = [k for k in ("model", "model_config", "optimizer", "scheduler", "rng", "epoch", "args")
               if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (missing "
                              f"{', '.join(missing)}); resume from a run directory's last.pt or epoch_N.pt")
    saved_model_config(payload)  # malformed config or args: one sentence, not a traceback later
    saved_args(payload)
    return payload


def read_metrics(run_dir, up_to_epoch=None):
    """Epoch records of ``metrics.jsonl`` with ``epoch <= up_to_epoch`` (later ones belong to a
    future that a resume from an earlier checkpoint discards; None: all of them). A damaged file
    (a line that is not a JSON record with an integer ``epoch``) is a :class:`RunDirError`."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or type(record.get("epoch")) is not int:
            raise RunDirError(f"{path} is damaged (line {number} is not an epoch record); repair or delete that "
                              f"line, or move the file aside (its records are then lost), and resume again")
        records.append(record)
    return [r for r in records if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def write_metrics(run_dir, records):
    """Rewrite ``metrics.jsonl`` with ``records`` (atomically)."""
    atomic_write_text(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))

