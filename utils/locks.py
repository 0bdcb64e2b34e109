"""One writer per output folder: a lock file holding the owner's pid, host, start time and command.

``FolderLock(folder, what)`` is a context manager. Taking it creates ``folder/.lock`` atomically
(``O_CREAT | O_EXCL``); a second writer gets :class:`LockError` with one sentence naming the owner.
A lock left by a process that no longer runs on this host is stale: it is reported on stderr and
taken over. So is a lock whose pid now belongs to another process (the pid was reused after a crash
or a reboot): the record holds the owner's boot id and process start time, and a live pid whose
start time or boot differs is not the owner. A lock that cannot be verified (another host, or a
record without those fields) is refused with the lock file to remove when no command runs there.
The folder must exist before the lock is taken (create it only after validation).
"""
from __future__ import annotations

import json
import os
import shlex
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


def boot_id():
    """This boot's id (Linux), or None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid):
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc/PID/stat``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def owner_record():
    """The lock record of this process: pid, host, boot id, process start time, start, command."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(), "pid_start": process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def read_lock(folder):
    """The owner record of ``folder``'s lock, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def lock_is_stale(record):
    """True when the lock's owner is a process of this host that no longer runs: its pid is gone,
    or now belongs to another process (another boot, or another start time)."""
    if not record or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return True
    if record.get("boot_id") and boot_id() and record["boot_id"] != boot_id():
        return True
    start = process_start(pid)
    return record.get("pid_start") is not None and start is not None and record["pid_start"] != start


def owner_verified(record):
    """Whether the live owner of a non-stale lock is known to be the process that wrote it (same
    host, and the record's process start time matches the pid's)."""
    return bool(record and record.get("host") == socket.gethostname() and record.get("pid_start") is not None
                and process_start(record.get("pid")) == record["pid_start"])


def removal_hint(folder, what="this folder"):
    """How to free a lock whose owner cannot be verified: the lock file and the command that removes it."""
    path = Path(folder) / LOCK_NAME
    return f"if no ANCRA command writes {what} there any more, remove the lock file: rm {shlex.quote(str(path))}"


def check_unlocked(folder, what="this folder"):
    """Raise :class:`LockError` if a live process holds ``folder``'s lock; creates nothing."""
    record = read_lock(folder)
    if (Path(folder) / LOCK_NAME).exists() and not lock_is_stale(record):
        raise LockError(busy_message(folder, what, record))


def owner_text(record):
    """``pid N on HOST since TIME`` of a lock record."""
    return f"pid {record.get('pid')} on {record.get('host')} since {record.get('started')}"


def busy_message(folder, what, record):
    """One sentence for a folder whose lock is held: the owner, and what to do (wait, or remove the
    lock file when its owner cannot be verified)."""
    if not record:
        return f"{folder} is locked by an unreadable {LOCK_NAME}; {removal_hint(folder, what)}, then rerun"
    owner = owner_text(record)
    if record.get("host") != socket.gethostname():
        return f"{folder} is in use by {owner} (another host: cannot check it); {removal_hint(folder, what)}, then rerun"
    if not owner_verified(record):
        return (f"{folder} is in use by {owner} ({record.get('command', '?')}), a live pid that cannot be shown to be "
                f"that command (it may be reused after a crash or a reboot); wait for it to finish, or "
                f"{removal_hint(folder, what)}")
    return (f"{folder} is in use by {owner} ({record.get('command', '?')}); wait for it to finish or use another "
            f"folder")


class FolderLock:
    """Exclusive lock of an output folder for the life of a ``with`` block (or until :meth:`release`)."""

    def __init__(self, folder, what="this folder"):
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_NAME
        self.held = False

    def acquire(self):
        record = owner_record()
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
                raise LockError(busy_message(self.folder, self.what, existing)) from None
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
