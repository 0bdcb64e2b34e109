"""What a study's folders already hold (trained epochs, finished evaluations) and the small
state file where reproduce.py records failures and commits; the files themselves stay the truth."""
import hashlib
import json
import os
import re
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch

from models.loading import load_error_text
from utils.checkpoint import LAST, atomic_write_json

try:
    import fcntl
except ImportError:  # not POSIX: one process per study folder
    fcntl = None

_CACHE = {}
RESULTS, PARTIAL = "results.json", "results.partial.json"  # test_white_attack.py's finished and partial files
EVALUATED = "checkpoint.json"   # which best.pt an evaluation folder's results are of (size, mtime, sha256)
_WEIGHTS = re.compile(r"^(best\.pt|epoch_\d+\.pt)$")


class RunStateError(RuntimeError):
    """A run folder's files cannot be read (a corrupt last.pt, ...)."""

_CACHE_LOCK = threading.Lock()


def _load_light(path):
    """``torch.load(weights_only=True)``, memory-mapped where the torch version allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (TypeError, RuntimeError):
        return torch.load(path, map_location="cpu", weights_only=True)


def training_progress(run_dir):
    """``(completed epochs, epochs the run was started for)`` from ``last.pt``, or None without one;
    RunStateError when it cannot be read. Cached per file version, so a large checkpoint is read once."""
    path = Path(run_dir) / LAST
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    try:
        payload = _load_light(path)
        args = payload.get("args") or {}
        progress = (int(payload["epoch"]), int(args.get("epochs", payload["epoch"])))
    except Exception as err:  # corrupt or foreign file: say which, never start over it
        raise RunStateError(f"cannot read {path} ({type(err).__name__}: {load_error_text(err)}); resume "
                            f"the run by hand from an epoch_N.pt or move the folder away") from err
    with _CACHE_LOCK:
        _CACHE[key] = progress
    return progress


def read_json(path):
    """The JSON object in ``path``, or None when it is missing or unreadable (a half-written file)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def finished_results(eval_dir):
    """``results.json`` of a finished evaluation in ``eval_dir`` (whose name holds the requested size and
    budget), else None. A results.json marked ``"complete": false`` is a partial one."""
    results = read_json(Path(eval_dir) / RESULTS)
    if not isinstance(results, dict) or any(k not in results for k in ("clean", "attacks", "worst_case")):
        return None
    return None if results.get("complete") is False else results


def unreadable_results(eval_dir):
    """The evaluation's results files in ``eval_dir`` that exist but hold no JSON object (cut off
    while being written, or emptied): test_white_attack.py could neither resume nor replace them."""
    broken = []
    for name in (RESULTS, PARTIAL):
        path = Path(eval_dir) / name
        if path.exists() and not isinstance(read_json(path), dict):
            broken.append(path)
    return broken


def has_results(eval_dir):
    """Whether ``eval_dir`` holds results of test_white_attack.py (finished or partial) to resume."""
    return any((Path(eval_dir) / name).is_file() for name in (RESULTS, PARTIAL))


_HASHES = {}


def fingerprint(path):
    """``{"size", "mtime_ns", "sha256"}`` of a file (the hash cached per file version)."""
    stat = Path(path).stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        digest = _HASHES.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        with _CACHE_LOCK:
            _HASHES[key] = digest
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def record_evaluated_checkpoint(eval_dir, checkpoint):
    """Write which checkpoint the evaluation in ``eval_dir`` is about to measure."""
    atomic_write_json(Path(eval_dir) / EVALUATED, {"checkpoint": str(checkpoint), **fingerprint(checkpoint)})


def evaluates_checkpoint(eval_dir, checkpoint):
    """Whether the results in ``eval_dir`` are of ``checkpoint`` as it is now: same size and mtime as
    recorded, else the same sha256. An evaluation without a record (written before records existed)
    counts only when its results are newer than the checkpoint. False when the checkpoint is missing."""
    try:
        stat = Path(checkpoint).stat()
    except OSError:
        return False
    record = read_json(Path(eval_dir) / EVALUATED)
    if not isinstance(record, dict):
        results = [Path(eval_dir) / name for name in (RESULTS, PARTIAL) if (Path(eval_dir) / name).exists()]
        return bool(results) and all(p.stat().st_mtime_ns >= stat.st_mtime_ns for p in results)
    if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return record.get("sha256") == fingerprint(checkpoint)["sha256"]


def move_aside(path, why):
    """Rename ``path`` to ``<name>.<why>-<time>`` beside it (never deleted); returns the new path."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d_%H%M%S')}")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%d_%H%M%S')}-{counter}")
    os.replace(path, target)
    return target


def trained_files(run_dir):
    """Files of ``run_dir`` that a new run started over it would delete and that hold training:
    best.pt, epoch_N.pt, a non-empty metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = sorted(p.name for p in run_dir.iterdir() if _WEIGHTS.match(p.name))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics.name)
    return found


def git_commit(root):
    """``git rev-parse HEAD`` of ``root`` (``+dirty`` when tracked files changed), or "unknown"."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


STATE_LOCK = "state.json.lock"  # serialises every read-modify-write of a study's shared records


@contextmanager
def study_lock(folder):
    """Exclusive lock of a study folder's shared records (state.json, table.json/.md) across
    processes, for a short read-modify-write: ``flock`` on ``folder/state.json.lock`` (waits for the
    other holder; released when the block ends or the process dies). No-op where ``fcntl`` is missing."""
    if fcntl is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class StateFile:
    """``state.json`` of a study: per row its last status, error and commits. Every update re-reads
    the file and merges one row's fields under :func:`study_lock`, so several reproduce.py
    invocations on one folder keep each other's records; every read sees the file as it is now."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()

    @contextmanager
    def locked(self):
        """The threads of this process, then the other processes, one at a time."""
        with self._lock, study_lock(self.path.parent):
            yield

    def _read(self):
        loaded = read_json(self.path)
        rows = loaded.get("rows") if isinstance(loaded, dict) else None
        return rows if isinstance(rows, dict) else {}

    @property
    def rows(self):
        """Every row's entry, as the file holds them now."""
        return self._read()

    def get(self, row):
        """A copy of ``row``'s entry (empty when it has none); the file is replaced atomically, so a
        read without the lock sees one whole version."""
        entry = self._read().get(row, {})
        return dict(entry) if isinstance(entry, dict) else {}

    def update(self, row, **fields):
        """Merge ``fields`` into ``row``'s entry as the file holds it now, and save (under the lock)."""
        with self.locked():
            rows = self._read()
            entry = rows.get(row) if isinstance(rows.get(row), dict) else {}
            entry.update(fields, updated=datetime.now().isoformat(timespec="seconds"))
            rows[row] = entry
            atomic_write_json(self.path, {"rows": rows})
