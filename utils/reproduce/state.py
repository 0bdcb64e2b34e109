"""What a study's folders already hold (trained epochs, finished evaluations) and the small
state file where reproduce.py records failures and commits; the files themselves stay the truth."""
import json
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import torch

from utils.checkpoint import LAST, atomic_write_json

_CACHE = {}


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
        raise RunStateError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); resume "
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
    results = read_json(Path(eval_dir) / "results.json")
    if not isinstance(results, dict) or any(k not in results for k in ("clean", "attacks", "worst_case")):
        return None
    return None if results.get("complete") is False else results


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


class StateFile:
    """``state.json`` of a study: per row its last status, error and commits (written atomically)."""

    def __init__(self, path):
        self.path = Path(path)
        loaded = read_json(self.path) or {}
        self.rows = loaded.get("rows", {}) if isinstance(loaded, dict) else {}
        self._lock = threading.Lock()

    def get(self, row):
        """A copy of ``row``'s entry (empty when it has none)."""
        with self._lock:
            return dict(self.rows.get(row, {}))

    def update(self, row, **fields):
        """Merge ``fields`` into ``row``'s entry and save."""
        with self._lock:
            entry = self.rows.setdefault(row, {})
            entry.update(fields, updated=datetime.now().isoformat(timespec="seconds"))
            atomic_write_json(self.path, {"rows": self.rows})
