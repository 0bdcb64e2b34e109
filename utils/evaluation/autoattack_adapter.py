"""Thin adapter over the AutoAttack package: standard AutoAttack, APGD and Square, with the
package's own log lines and check warnings captured so they can go into our report.

Uses ``pyautoattack`` when installed, else the original ``autoattack`` package. Nothing here
re-implements an attack: the figures come from the package's code.
"""
import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field

import torch


class AutoAttackUnavailable(RuntimeError):
    """Neither ``pyautoattack`` nor ``autoattack`` can be imported."""


@dataclass
class AutoAttackPackage:
    """The imported package: its name and the classes we use."""

    name: str
    AutoAttack: type
    APGDAttack: type
    APGDAttackTargeted: type
    SquareAttack: type


def import_autoattack():
    """Import ``pyautoattack`` (preferred) or the original ``autoattack``."""
    try:
        from pyautoattack import AutoAttack
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from pyautoattack.square import SquareAttack
        return AutoAttackPackage("pyautoattack", AutoAttack, APGDAttack, APGDAttack_targeted, SquareAttack)
    except ImportError:
        pass
    try:
        from autoattack import AutoAttack
        from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted
        from autoattack.square import SquareAttack
        return AutoAttackPackage("autoattack", AutoAttack, APGDAttack, APGDAttack_targeted, SquareAttack)
    except ImportError as err:
        raise AutoAttackUnavailable(
            "AutoAttack is not installed; `pip install pyautoattack` (or the original `autoattack`), "
            "or leave the autoattack/apgd/square attacks out of --attacks"
        ) from err


@dataclass
class CapturedLog:
    """Everything the package said while it ran: all lines, and the warnings among them."""

    lines: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def add_warning(self, text):
        text = text.strip()
        if text and text not in self.warnings:
            self.warnings.append(text)


class _ListHandler(logging.Handler):
    def __init__(self, log):
        super().__init__(logging.DEBUG)
        self.log = log

    def emit(self, record):
        message = record.getMessage()
        self.log.lines.append(message)
        if record.levelno >= logging.WARNING:
            self.log.add_warning(message)


def _package_folders():
    """Folders of the installed AutoAttack package(s): a warning counts as the package's own only
    when raised from a file inside one of them."""
    folders = []
    for name in ("pyautoattack", "autoattack"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        if getattr(module, "__file__", None):
            folders.append(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(folders)


def raised_by_package(item, folders=None):
    """True when the caught warning ``item`` was raised by the AutoAttack package's own code."""
    folders = _package_folders() if folders is None else folders
    return os.path.abspath(item.filename).startswith(folders) if folders else False


@contextlib.contextmanager
def capture_autoattack_output():
    """Collect the package's logger records, its own ``warnings.warn`` calls (warnings raised
    elsewhere, e.g. by the model's layers, are passed on untouched) and printed lines."""
    log = CapturedLog()
    logger = logging.getLogger("auto-attack")
    handler = _ListHandler(log)
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
            warnings.simplefilter("always")
            yield log
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    for line in printed.getvalue().splitlines():
        log.lines.append(line)
        if line.lower().startswith("warning"):
            log.add_warning(line)
    folders = _package_folders()
    for item in caught:
        if raised_by_package(item, folders):
            log.add_warning(str(item.message))
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


@contextlib.contextmanager
def _own_rng(device):
    """The package reseeds torch's global RNG; keep the caller's RNG state untouched."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


_ACCURACY = re.compile(r"(initial accuracy|robust accuracy after ([\w-]+)|robust accuracy):\s*([\d.]+)%")


def parse_accuracies(lines):
    """``{'clean': acc, 'APGD-CE': acc, ..., 'final': acc}`` from one run's log lines (fractions)."""
    names = {"initial accuracy": "clean", "robust accuracy": "final"}
    found = {}
    for line in lines:
        match = _ACCURACY.search(line)
        if match:
            found[match.group(2) or names[match.group(1)]] = float(match.group(3)) / 100
    return found


def reduce_autoattack(attack, reduced, num_classes):
    """Lower the built AutoAttack object's own settings: ``reduced`` holds ``("apgd.n_iter", 10)``
    style pairs naming the package's attributes (a target count never above C − 1). Refuses a
    name the package does not have, so a renamed attribute can never silently run full strength."""
    for path, value in reduced:
        owner_name, _, attribute = path.rpartition(".")
        owner = getattr(attack, owner_name) if owner_name else attack
        if not hasattr(owner, attribute):
            raise AttributeError(f"the AutoAttack package has no setting {path!r}")
        if attribute == "n_target_classes":
            value = min(value, num_classes - 1)
        setattr(owner, attribute, value)


def run_autoattack(model, x, y, eps, *, num_classes, seed=0, version="standard", reduced=()):
    """Run AutoAttack on one batch; returns ``(adversarial examples, predictions on them, info)``.

    AutoAttack standard uses 9 target classes; with fewer than 10 classes it uses C − 1 (the
    package would index past the last class otherwise). ``reduced`` lowers the package's own
    settings (:func:`reduce_autoattack`; the smoke budget), which makes the run no evaluation.
    ``info`` holds the package name, the number of target classes, the per-attack accuracies it logged, its warnings and its log.
    """
    package = import_autoattack()
    x = x.contiguous()  # a channels-last batch crashes APGD-T's reshapes
    targets = min(9, num_classes - 1)
    with _own_rng(x.device), capture_autoattack_output() as log:
        if package.name == "pyautoattack":
            attack = package.AutoAttack(model, eps=eps, norm="Linf", version=version, device=x.device, seed=seed)
        else:
            attack = package.AutoAttack(model, norm="Linf", eps=eps, version=version, device=x.device, seed=seed)
        attack.apgd_targeted.n_target_classes = targets
        attack.fab.n_target_classes = targets
        reduce_autoattack(attack, reduced, num_classes)
        if package.name == "pyautoattack":
            x_adv, y_adv = attack.run_standard_evaluation(x, y, batch_size=x.shape[0])
        else:
            x_adv, y_adv = attack.run_standard_evaluation(x, y, bs=x.shape[0], return_labels=True)
    info = {
        "package": package.name,
        "version": version,
        "target_classes": attack.apgd_targeted.n_target_classes,
        "reduced": dict(reduced),
        "accuracies": parse_accuracies(log.lines),
        "warnings": log.warnings,
        "log": log.lines,
    }
    return x_adv.detach(), y_adv.to(y.device), info


def run_apgd(model, x, y, eps, *, loss="ce", n_iter=100, restarts=1, seed=0):
    """APGD (CE or DLR) from the AutoAttack package on ``model``'s logits, run on *every* example
    (its ``best_loss`` mode: APGD otherwise skips examples that ``model`` already misclassifies,
    which for a surrogate head need not be the real model's errors). Returns
    ``(highest-loss points, warnings)``."""
    package = import_autoattack()
    x = x.contiguous()
    with _own_rng(x.device), capture_autoattack_output() as log:
        torch.manual_seed(seed)  # best_loss mode does not seed itself
        attack = package.APGDAttack(model, n_iter=n_iter, norm="Linf", n_restarts=restarts, eps=eps, seed=seed,
                                    loss=loss, device=x.device)
        x_adv = attack.perturb(x, y, best_loss=True)
    return x_adv.detach(), log.warnings


def run_square(model, x, y, eps, *, n_queries=10000, seed=0):
    """Square attack (black-box, margin loss) from the AutoAttack package, with AutoAttack's
    p_init = 0.8 and the square-size schedule spread over ``n_queries``; returns
    ``(adversarial examples, warnings)``."""
    package = import_autoattack()
    x = x.contiguous()
    with _own_rng(x.device), capture_autoattack_output() as log:
        attack = package.SquareAttack(model, norm="Linf", n_queries=n_queries, eps=eps, p_init=0.8, n_restarts=1,
                                      seed=seed, loss="margin", resc_schedule=True, device=x.device)
        x_adv = attack.perturb(x, y)
    return x_adv.detach(), log.warnings
