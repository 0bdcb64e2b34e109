"""One writer per output folder: a lock file holding the owner's pid, host, start time and command.

``FolderLock(folder, what)`` is a context manager. Taking it creates ``folder/.lock`` atomically
(``O_CREAT | O_EXCL``); a second writer gets :class:`LockError` with one sentence naming the owner.
A lock left by a process that no longer runs on this host is stale: it is reported on stderr and
taken over. A lock of another host cannot be checked, so it is refused with the command that
removes it. The folder must exist before the lock is taken (create it only after validation).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """Another process writes into this folder; the message says who and what to do."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def read_lock(folder):
    """The owner record of ``folder``'s lock, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def lock_is_stale(record):
    """True when the lock's owner is a process of this host that no longer runs."""
    if not record or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    return not isinstance(pid, int) or pid <= 0 or not _alive(pid)


def check_unlocked(folder, what="this folder"):
    """Raise :class:`LockError` if a live process holds ``folder``'s lock; creates nothing."""
    record = read_lock(folder)
    if (Path(folder) / LOCK_NAME).exists() and not lock_is_stale(record):
        raise LockError(_busy_message(folder, what, record))


def _busy_message(folder, what, record):
    if not record:
        return (f"{folder} is locked by an unreadable {LOCK_NAME}; if no other process writes {what} there, "
                f"remove {Path(folder) / LOCK_NAME} and rerun")
    owner = f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}"
    if record.get("host") != socket.gethostname():
        return (f"{folder} is in use by {owner} (another host: cannot check it); if that run is over, "
                f"remove {Path(folder) / LOCK_NAME} and rerun")
    return f"{folder} is in use by {owner} ({record.get('command', '?')}); wait for it to finish or use another folder"


class FolderLock:
    """Exclusive lock of an output folder for the life of a ``with`` block (or until :meth:`release`)."""

    def __init__(self, folder, what="this folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                existing = read_lock(self.folder)
                if existing is None and self._young():
                    time.sleep(0.2)  # another writer is between creating and filling its lock
                    existing = read_lock(self.folder)
                if lock_is_stale(existing):
                    print(f"note: removing the stale lock of pid {existing.get('pid')} (no longer running) "
                          f"in {self.folder}", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                raise LockError(_busy_message(self.folder, self.what, existing)) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise LockError(f"could not take the lock of {self.folder}; another process keeps taking it")

    def _young(self):
        try:
            return time.time() - self.path.stat().st_mtime < 2
        except OSError:
            return False

    def release(self):
        if self.held:
            if (read_lock(self.folder) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
