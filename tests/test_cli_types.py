"""The generic argument types of utils/cli.py: the one ε parser every script uses, the numbers,
the batch size and the one ``--device`` option."""
import argparse

import pytest
import torch

from utils.cli import (
    OneLineArgumentParser,
    add_device_argument,
    batch_size_type,
    device_type,
    eps_type,
    nonnegative_float,
    positive_float,
    positive_float_list,
    positive_int,
    resolve_device,
)
from utils.evaluation.sweep import parse_eps_sweep


@pytest.mark.parametrize("text, eps", [("8/255", 8 / 255), ("0.031", 0.031), ("8", 8 / 255), ("255", 1.0),
                                       (" 4/255", 4 / 255)])
def test_eps_type_accepts_every_usual_spelling(text, eps):
    assert eps_type(text) == pytest.approx(eps)


@pytest.mark.parametrize("text", ["0", "-1", "-8/255", "256", "nan", "inf", "-inf", "1e400", "eight", "8/0", ""])
def test_eps_type_refuses_with_one_line_naming_the_spellings(text):
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        eps_type(text)
    message = str(refused.value)
    assert "\n" not in message and "8/255" in message and "0.031" in message


def test_eps_type_in_pixel_units_reads_values_below_one_as_pixels():
    assert eps_type("0.5", pixel_units=True) == pytest.approx(0.5 / 255)
    assert eps_type("8", pixel_units=True) == pytest.approx(8 / 255)


def test_the_eps_sweep_builds_on_eps_type():
    assert parse_eps_sweep("0,0.5,8/255") == (0.0, 0.5 / 255, 8 / 255)
    for bad in ("0,1e400", "0,nan", "0,-2", "0,256"):
        with pytest.raises(argparse.ArgumentTypeError, match="8/255"):
            parse_eps_sweep(bad)


def test_eps_option_errors_are_one_line():
    parser = OneLineArgumentParser()
    parser.add_argument("--eps", type=eps_type)
    assert parser.parse_args(["--eps", "8"]).eps == pytest.approx(8 / 255)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--eps", "-8/255"])
    assert stop.value.code == 2


def test_number_types():
    assert positive_int("3") == 3 and batch_size_type("auto") == "auto" and batch_size_type("7") == 7
    assert nonnegative_float("0") == 0.0 and positive_float("0.5") == 0.5
    assert positive_float_list("0.5, 2,8") == (0.5, 2.0, 8.0)
    for parse, text in [(positive_int, "0"), (positive_int, "x"), (batch_size_type, "0"), (nonnegative_float, "-1"),
                        (nonnegative_float, "nan"), (positive_float, "0"), (positive_float, "inf"),
                        (positive_float_list, ","), (positive_float_list, "1,-2")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:7"])
def test_device_type_checks_only_the_spelling(text):
    assert device_type(text) == text


@pytest.mark.parametrize("text", ["tpu", "gpu", "cuda:", "cuda:x", "CPU", ""])
def test_device_type_refuses_other_spellings(text):
    with pytest.raises(argparse.ArgumentTypeError, match="auto"):
        device_type(text)


def test_add_device_argument_defaults_to_auto_and_refuses_tpu():
    parser = OneLineArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--device", "tpu"])
    assert stop.value.code == 2


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cuda:7"):
        resolve_device("cuda:7" if torch.cuda.device_count() < 8 else "cuda:99")


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_train_step_benchmark_refuses_a_device_that_is_not_here(capsys):
    from benchmarks.train_step import main

    with pytest.raises(SystemExit) as stop:
        main(["--device", "cuda:7", "--steps", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "cuda:7" in err
    with pytest.raises(SystemExit) as stop:
        main(["--device", "tpu"])
    assert stop.value.code == 2


def test_refuse_inert_names_the_given_option_and_why():
    import argparse

    from utils.cli import InertOptionError, OnlyWith, explicit_options, refuse_inert

    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="trades")
    parser.add_argument("--beta", type=float, default=None)
    rules = [OnlyWith(("beta",), lambda a: a.method in ("trades", "mart"),
                      lambda a: f"only TRADES and MART weigh a robust term, {a.method} has none")]
    argv = ["--method", "pgd-at", "--beta", "5"]
    args = parser.parse_args(argv)
    explicit = explicit_options(parser, argv)
    assert explicit == {"method", "beta"}
    with pytest.raises(InertOptionError, match=r"^--beta would change nothing here: only TRADES and MART .* "
                                               r"pgd-at has none; drop --beta$"):
        refuse_inert(rules, args, explicit)
    refuse_inert(rules, parser.parse_args(["--method", "pgd-at"]), {"method"})  # not given: nothing to refuse
    refuse_inert(rules, parser.parse_args(["--beta", "5"]), {"beta"})  # applies: accepted
