"""Output pieces of the evaluation and figure scripts: output checks done before any long work
starts (:class:`OutputError`) and atomic ``write_*`` helpers. The generic argument types (ε,
numbers, batch size, device) and the one-line parser live in ``utils.cli``."""
import json
import os
from pathlib import Path

from utils.checkpoint import atomic_write_bytes


class OutputError(ValueError):
    """An output path cannot be written; the message says which and what to do."""


def check_output_dir(path):
    """Refuse, before any work, an output folder that is a file or cannot be created or written.
    Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {path} is a file; pass another --out-dir")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create output folder {path}: {probe} is a file; pass another --out-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {probe} is not writable; pass another --out-dir")
    return path


def create_output_dir(path):
    """Create the checked folder and prove it writable with a probe file (removed again)."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to output folder {path} ({err.strerror}); pass another --out-dir") from None
    return path


def create_unique_dir(path):
    """Create a new folder ``path``, or ``path_2``, ``path_3``, ... when that name is taken, so two
    runs started in the same second (the default ``eval_<timestamp>``) never share a folder."""
    path = check_output_dir(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
            try:
                candidate.mkdir()
            except FileExistsError:
                continue
            return create_output_dir(candidate)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path} ({err.strerror}); pass another --out-dir") from None
    raise OutputError(f"999 folders named {path.name}_N exist already; pass an --out-dir")


def write_bytes(path, data):
    """Write an output file atomically (temporary file beside it, fsync, rename): a failure such as
    a full disk raises :class:`OutputError` and leaves the previous file as it was."""
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or err}); the previous file is unchanged: free some "
                          "space or pass another output folder") from None
    return Path(path)


def write_text(path, text):
    """:func:`write_bytes` of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    """:func:`write_bytes` of indented JSON (the format of ``utils.checkpoint.atomic_write_json``)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output_file(path):
    """Refuse an output file whose folder cannot be written, or that is a folder. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    check_output_dir(path.parent)
    return path
