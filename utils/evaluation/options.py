"""Command-line pieces of the evaluation and figure scripts: argument types that refuse nonsense
with a hint, and output checks done before any long work starts (the one-line parser is
``utils.cli.OneLineArgumentParser``)."""
import argparse
import json
import math
import os
from pathlib import Path

import torch

from utils.checkpoint import atomic_write_bytes
from utils.cli import eps_fraction, finite_float, fraction


class OutputError(ValueError):
    """An output path cannot be written; the message says which and what to do."""


def threat_eps(text):
    """ε in [0, 1] (``8/255``, ``0.031``) or pixel units 1..255 (``8`` → 8/255); > 0."""
    try:
        value = fraction(text)
    except OverflowError:  # Fraction("1e400") is exact but too large for a float
        value = math.inf
    if not 0 < value <= 255:
        raise argparse.ArgumentTypeError(f"ε must be > 0 and at most 255 pixel units (e.g. 8/255, 0.031 or 8), "
                                         f"got {text!r}")
    return eps_fraction(value)


def device_type(text):
    """A torch device string that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(device)


def batch_size_type(text):
    """``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"batch size must be 'auto' or a positive integer, got {text!r}") from None


def positive_int(text):
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_float(text):
    """argparse type: a finite number ≥ 0 (nan and ±inf are refused)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def positive_float(text):
    """argparse type: a finite number > 0 (nan and ±inf are refused)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_float_list(text):
    """argparse type: comma-separated finite numbers > 0 (``0.5,2,8``); at least one."""
    values = tuple(positive_float(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {text!r}")
    return values


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
