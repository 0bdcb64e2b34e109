"""Small pieces every command-line script shares: the ε argument type, the speed flags and the
``main`` wrapper that turns the library's expected errors into ``error: ...`` and exit code 2."""
import argparse
import sys
from fractions import Fraction


def fraction(text):
    """argparse type for a number written as a fraction (``8/255``) or a decimal (``0.031``)."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 8/255 or 0.031, got {text!r}") from None


def eps_fraction(value):
    """An L∞ radius as a fraction of the [0, 1] pixel range: values >= 1 are pixel units (8 → 8/255)."""
    return value / 255 if value >= 1 else value


def eps_type(text):
    """argparse type for ε in any of the usual spellings: ``8/255``, ``0.031`` or pixel units ``8``."""
    value = fraction(text)
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"--eps must be >= 0, e.g. 8/255, 0.031 or 8 (pixel units), got {text!r}")
    return eps_fraction(value)


def add_speed_arguments(group):
    """--amp / --channels-last / --joint-attacks / --compile (utils.training.config.SpeedConfig)."""
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for attacks, losses and the per-epoch evaluation (default: on for CUDA)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory format for weights and inputs (default: with bf16)")
    group.add_argument("--joint-attacks", action=argparse.BooleanOptionalAction, default=True,
                       help="run the adversarial and the negatives' targeted attack as one 2B batch")
    group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model (pays off on GPUs for long runs; minutes of warm-up)")


def run_cli(run, parse_args, errors, argv=None):
    """``run(parse_args(argv))``; an error of the ``errors`` types prints one line and returns 2."""
    args = parse_args(argv)
    try:
        run(args)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
