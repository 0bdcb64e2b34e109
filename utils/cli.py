"""Small pieces every command-line script shares: the one-line argument parser, the generic
argument types (ε, numbers, batch size, device), the speed flags and the ``main`` wrapper that
turns the library's expected errors into ``error: ...`` and exit code 2."""
import argparse
import math
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Union

import torch

_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf$|infinity$)", re.IGNORECASE)  # -inf: refused by the type, not misread


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line ``error: ...`` on stderr and exit code 2 (no usage block),
    and which reads a negative number after a one-value option as its value
    (``--eps -8/255`` is ``--eps=-8/255``, so the option's own check explains the range)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._attach_negative_values(args), namespace)

    def _attach_negative_values(self, args):
        """Join ``--opt -1`` into ``--opt=-1`` for options that take exactly one value."""
        single = {option for action in self._actions if action.nargs is None and action.option_strings
                  for option in action.option_strings}
        joined, i = [], 0
        while i < len(args):
            if args[i] in single and i + 1 < len(args) and _NEGATIVE_VALUE.match(args[i + 1]):
                joined.append(f"{args[i]}={args[i + 1]}")
                i += 2
            else:
                joined.append(args[i])
                i += 1
        return joined


_ABSENT = object()  # the default of a positional while explicit_options parses (a string would meet its choices)


def explicit_options(parser, argv):
    """The destinations of the options written on the command line ``argv`` (defaults ignored)."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS if action.option_strings else _ABSENT
        return {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not _ABSENT}
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]


def flag(dest):
    """``step_size`` -> ``--step-size``."""
    return "--" + dest.replace("_", "-")


class InertOptionError(ValueError):
    """An option was given that would change nothing in this command (one sentence)."""


@dataclass(frozen=True)
class OnlyWith:
    """A rule kept as data: the options ``options`` (argparse destinations) change something only
    when ``applies(args)`` holds; ``why`` (a string, or a function of ``args`` returning one) says
    what they need, e.g. "β weighs TRADES' and MART's robust term; pgd-at has none".

    The one mechanism by which every script refuses an option that would change nothing
    (:func:`refuse_inert`)."""

    options: tuple
    applies: Callable
    why: Union[str, Callable]


def refuse_inert(rules, args, explicit):
    """Raise :class:`InertOptionError` for the first rule whose options were written on the command
    line (``explicit``, see :func:`explicit_options`) although ``applies(args)`` is false."""
    for rule in rules:
        given = [dest for dest in rule.options if dest in explicit]
        if given and not rule.applies(args):
            names = " and ".join(flag(dest) for dest in given)
            why = rule.why(args) if callable(rule.why) else rule.why
            raise InertOptionError(f"{names} would change nothing here: {why}; drop {names}")


def fraction(text):
    """argparse type for a number written as a fraction (``8/255``) or a decimal (``0.031``)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 8/255 or 0.031, got {text!r}") from None


def finite_float(text):
    """argparse type: a real number; nan and ±inf are refused (they would silently disable a term)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def eps_fraction(value):
    """An L∞ radius as a fraction of the [0, 1] pixel range: values >= 1 are pixel units (8 → 8/255)."""
    return value / 255 if value >= 1 else value


EPS_SPELLINGS = "a fraction of the pixel range (8/255, 0.031) or pixel units (8)"


def eps_type(text, *, pixel_units=False):
    """argparse type of every ``--eps``: ``8/255``, ``0.031`` or pixel units ``8`` (→ 8/255).

    ε must be > 0 (an attack or a training run of radius 0 is a mistake) and at most 255 pixel
    units; nan, ±inf and numbers too large for a float are refused. Returns a fraction of [0, 1].
    ``pixel_units=True`` reads every value in pixel units, also those below 1 (a list such as
    ``0.5,2,8/255``)."""
    try:
        value = fraction(text)
    except OverflowError:  # Fraction("1e400") is exact but too large for a float
        value = math.inf
    if not 0 < value <= 255:
        raise argparse.ArgumentTypeError(f"ε must be above 0 and at most 255 pixel units: {EPS_SPELLINGS}, got {text!r}")
    return value / 255 if pixel_units else eps_fraction(value)


def positive_int(text):
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def batch_size_type(text):
    """argparse type: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"batch size must be 'auto' or a positive integer, got {text!r}") from None


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


DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
_DEVICE_SPELLING = re.compile(r"auto|cpu|cuda|cuda:\d+")


def device_type(text):
    """argparse type of every script's ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Only the spelling is checked here; :func:`resolve_device` checks that the device exists (a
    checkpoint's saved ``auto`` resolves on the machine that resumes it)."""
    if _DEVICE_SPELLING.fullmatch(text or ""):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use {DEVICE_HELP}")


def resolve_device(name="auto"):
    """The ``torch.device`` for a ``--device`` value; ValueError (one sentence) when it is not here."""
    if not _DEVICE_SPELLING.fullmatch(str(name)):
        raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for but this machine has no usable CUDA GPU; use --device cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0 "
                             f"to cuda:{torch.cuda.device_count() - 1}")
    return device


def add_device_argument(parser, default="auto"):
    """The one ``--device`` option of every script (see :func:`device_type`)."""
    parser.add_argument("--device", type=device_type, default=default, help=DEVICE_HELP)


def add_speed_arguments(group):
    """--amp / --channels-last / --joint-attacks / --compile (utils.training.config.SpeedConfig)."""
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for attacks, losses and the per-epoch evaluation (default: on for CUDA)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format for weights and inputs (default: with bf16)")
    group.add_argument("--joint-attacks", action=argparse.BooleanOptionalAction, default=True,
                       help="run the adversarial and the negatives' targeted attack as one 2B batch")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="compiled training step: attacks, negatives and loss through torch.compile, CUDA graphs "
                            "on CUDA (docs/training.md#compiled-step; off until measured; minutes of warm-up)")


@contextmanager
def sigterm_as_interrupt():
    """For the duration, SIGTERM (a scheduler's or ``kill``'s stop) raises KeyboardInterrupt as
    Ctrl-C does, so the command's interrupt path saves, unlocks and says how to resume
    (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(run, parse_args, errors, argv=None):
    """``run(parse_args(argv))``; an error of the ``errors`` types prints one line and returns 2."""
    args = parse_args(argv)
    try:
        run(args)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
