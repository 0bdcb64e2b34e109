"""The one training command line: ``train.py`` and the four paper scripts are the same entry
with different defaults (:class:`Defaults`).

Its options are the fields of the run's record, :class:`~utils.training.config.TrainConfig`
(help text kept as field metadata), plus those that choose the method or the run to continue:
``--method NAME`` takes any registered method with the ``-anc``, ``-ra`` or ``-ancra`` suffix
(``trades-ancra``; a paper script's bare name means its ANCRA variant), ``--no-anc`` / ``--no-ra``
take a part away, ``--depth/--widen`` are shorthand for ``--arch wrn-D-K``, ``--resume`` and
``--overwrite``. :func:`parse` makes the record once: the command's defaults (or the smoke settings,
or the resumed run's own record) with only the options on the command line applied, every
option that would change nothing refused (:data:`INERT`), before any folder is created or deleted.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

from models import CheckpointError, arch_info, canonical_arch
from utils import data, distributed, recipe
from utils.checkpoint import RunDirError, load_training_checkpoint, resolve_resume
from utils.cli import (
    InertOptionError,
    OneLineArgumentParser,
    OnlyWith,
    explicit_options,
    finite_float,
    flag,
    refuse_inert,
)
from utils.locks import LockError
from utils.training import resume
from utils.training.ancra import get_method, method_names, parse_method_name, split_method_suffix
from utils.training.config import BOOLEAN, FIELDS, MODEL, OPTIONS, PAPER, RUN, TrainConfig, read_record
from utils.training.errors import ConfigError, NonFiniteLossError, TrainingInterrupted
from utils.training.setup import check_resume, run

# 8 batches per epoch: two epochs of 2 batches left BatchNorm's running statistics at their
# initial values, so the eval-mode smoke model ignored its input
SMOKE_DEFAULTS = {"train_size": 64, "batch_size": 8, "epochs": 2, "milestones": (2,), "eval_size": 32, "eval_steps": 2,
                  "attack_steps": 2, "save_freq": 2, "awp_warmup": 0}  # with --awp-gamma, AWP runs from the first smoke epoch
SMOKE_REAL_DATA = {"train_size": 256, "eval_size": 64}  # --smoke --dataset NAME: a fixed subset of the real images


@dataclass(frozen=True)
class Defaults:
    """What one training command defaults to; every command takes every option.

    ``ancra``: a bare ``--method NAME`` means NAME with ANC and RA (the paper scripts, whose
    ``--no-anc`` / ``--no-ra`` give the ablations); otherwise a bare name is the vanilla method.
    ``smoke_image_size``: side of the synthetic images of ``--smoke``.
    """

    description: str
    arch: str = "resnet18"
    dataset: str = "cifar10"
    method: str = "trades-ancra"
    ancra: bool = False
    smoke_image_size: int = 16

    def method_parts(self, name):
        """``(method, anc, ra)`` of ``--method NAME`` for this command (a bare name: its default variant)."""
        method, anc, ra = parse_method_name(name)
        if self.ancra and split_method_suffix(name)[1] is None:
            anc, ra = get_method(method).allows_anc, True
        return method, anc, ra

    def record(self, smoke=False, dataset=None):
        """The record this command starts from: its defaults, or with ``smoke`` the smoke settings
        (synthetic images unless ``dataset`` names a real one: then a fixed subset of it)."""
        method, anc, ra = self.method_parts(self.method)
        base = TrainConfig(arch=self.arch, dataset=self.dataset, method=method, anc=anc, ra=ra)
        if not smoke:
            return base
        if dataset in (None, "synthetic"):
            return replace(base, **SMOKE_DEFAULTS, dataset="synthetic", image_size=self.smoke_image_size)
        return replace(base, **{**SMOKE_DEFAULTS, **SMOKE_REAL_DATA})


def method_type(text):
    """argparse type of ``--method``: a registered method, optionally with -anc, -ra or -ancra."""
    try:
        parse_method_name(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return str(text).lower()


def _add_option(group, name, default):
    """The command-line option of record field ``name`` (help and settings from its metadata)."""
    meta = dict(FIELDS[name].metadata)
    del meta["group"]
    kind = meta.pop("kind", None)
    if kind == BOOLEAN:
        meta["action"] = argparse.BooleanOptionalAction
    elif isinstance(default, bool):
        meta["action"] = "store_true"
    elif "type" not in meta and "choices" not in meta:
        meta["type"] = {int: int, float: finite_float, str: str}[type(default)]
    group.add_argument(flag(name), default=list(default) if isinstance(default, tuple) else default, **meta)


SPEED_OPTIONS = ("amp", "channels_last", "joint_attacks", "compile")


def add_options(parser, names, base=PAPER):
    """Add the record's options ``names`` to ``parser`` (e.g. the speed options, for a benchmark)."""
    for name in names:
        _add_option(parser, name, getattr(base, name))


def build_parser(defaults: Defaults):
    """The argument parser of a training command (errors are one line, exit code 2); the help shows
    the command's defaults."""
    parser = OneLineArgumentParser(description=defaults.description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    base, groups = defaults.record(), {}
    group = lambda title: groups.setdefault(title, parser.add_argument_group(title))
    model = group(MODEL)
    bare = "its ANCRA variant (--no-anc / --no-ra for the ablations)" if defaults.ancra else "the vanilla method"
    model.add_argument("--method", type=method_type, default=defaults.method,
                       help=f"training method: {', '.join(method_names())}, optionally with -anc, -ra or -ancra "
                            f"(e.g. trades-ancra); a bare name is {bare}")
    model.add_argument("--no-anc", action="store_true", help="without asymmetric negative contrast (ablation)")
    model.add_argument("--no-ra", action="store_true", help="plain model without reverse attention (ablation)")
    model.add_argument("--depth", type=int, default=None,
                       help="WRN depth (6n+4: 34, 28, ...); shorthand for --arch wrn-DEPTH-WIDEN (widen 10 unless given)")
    model.add_argument("--widen", type=int, default=None,
                       help="WRN widen factor; shorthand for --arch wrn-DEPTH-WIDEN (depth 34 unless given)")
    for name in OPTIONS:
        _add_option(group(FIELDS[name].metadata["group"]), name, getattr(base, name))
    group(RUN).add_argument("--resume", default=None, metavar="PATH",
                            help="continue a run: its directory (uses last.pt) or a checkpoint file; an interrupted "
                                 "epoch restarts from the epoch-end checkpoint. Options given with it apply to the "
                                 "rest of the run (--lr, --momentum, --weight-decay, --milestones from the next "
                                 "epoch); those that would change the run itself are refused")
    group(RUN).add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    return parser


def architecture(given, base):
    """The canonical architecture asked for: ``--arch``, or ``--depth/--widen`` as shorthand for
    ``wrn-DEPTH-WIDEN`` when ``--arch`` is not on the command line; else ``base``'s."""
    depth, widen = given.get("depth"), given.get("widen")
    arch = canonical_arch(given.get("arch", base.arch))
    if depth is None and widen is None:
        return arch
    if "arch" not in given:
        return f"wrn-{depth or 34}-{widen or 10}"
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", arch)
    if not match or depth not in (None, int(match[1])) or widen not in (None, int(match[2])):
        raise ConfigError(f"--arch {arch} disagrees with --depth {depth} / --widen {widen}; give one of them")
    return arch


def _with_defaults(config):
    """Fill the fields whose default depends on other options (a resumed record has them already)."""
    info = _arch_info(config.arch)
    filled = {}
    if config.weight_decay is None:
        filled["weight_decay"] = (recipe.TINY_IMAGENET_WEIGHT_DECAY if config.dataset == "tiny-imagenet"
                                  else info.weight_decay)
    if config.awp_warmup is None:
        filled["awp_warmup"] = get_method(config.method).awp_warmup
    if config.image_size is None:
        filled["image_size"] = data.image_size(config.dataset)
    if config.run_name is None:
        filled["run_name"] = run_name(config)
    return replace(config, **filled)


def run_name(config):
    """``[smoke_]<dataset>_<arch>_<method>[_sepbn][_awpG][_emaD]_s<seed>``: every option that changes
    what is trained beyond the paper's recipe has its mark, so such a run never takes the folder of
    the plain run (the paper's runs keep their names)."""
    marks = (["sepbn"] if config.separate_bn else []) + ([f"awp{config.awp_gamma:g}"] if config.awp_gamma else [])
    marks += [f"ema{config.ema:g}"] if config.ema else []
    parts = [config.dataset, config.arch, config.method_name, *marks, f"s{config.seed}"]
    return ("smoke_" if config.smoke else "") + "_".join(parts)


def _arch_info(arch):
    """The architecture's registry entry (an unknown name is a ConfigError)."""
    try:
        return arch_info(arch)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# Options that would change nothing, kept as data (utils.cli.refuse_inert). ``r.config`` is the record
# after the command line; ``r.named``: the (anc, ra) that --method named before --no-anc / --no-ra.
INERT = (
    OnlyWith(("strategy", "alpha", "zeta"), lambda r: r.config.anc, lambda r: f"ANC is off in {r.config.method_name}"),
    OnlyWith(("aux_weight", "separate_bn"), lambda r: r.config.ra,
             lambda r: f"{r.config.method_name} trains a plain model (no RA)"),
    OnlyWith(("no_anc",), lambda r: r.named[0], lambda r: f"{r.config.method_name} has no ANC to take away"),
    OnlyWith(("no_ra",), lambda r: r.named[1], lambda r: f"{r.config.method_name} has no RA to take away"),
    OnlyWith(("beta",), lambda r: get_method(r.config.method).default_beta != 0,
             lambda r: f"β weighs TRADES' and MART's robust term, and {r.config.method} has none"),
    OnlyWith(("attack_steps",), lambda r: get_method(r.config.method).attacked or r.config.anc,
             lambda r: f"{r.config.method_name} runs no training attack"),
    OnlyWith(("awp_warmup",), lambda r: r.config.awp_gamma > 0, "AWP is off; give --awp-gamma to turn it on"),
    OnlyWith(("joint_attacks",), lambda r: r.config.anc and r.config.strategy.endswith("_adv"),
             lambda r: f"{r.config.method_name} with --strategy {r.config.strategy} runs no second training attack "
                       f"to join"),
    OnlyWith(("image_size",), lambda r: r.config.dataset == "synthetic",
             lambda r: f"it sets the side of synthetic images, and {r.config.dataset} images are "
                       f"{data.image_size(r.config.dataset)} pixels wide"),
)


def _apply(defaults, base, given):
    """``base`` with the options in ``given`` (the command line's, by field name) applied."""
    changes = {name: value for name, value in given.items() if name in FIELDS}
    if "milestones" in changes:
        changes["milestones"] = tuple(changes["milestones"])
    named = (base.anc, base.ra)
    if "method" in given:
        changes["method"], *named = defaults.method_parts(given["method"])
    changes["anc"] = named[0] and "no_anc" not in given
    changes["ra"] = named[1] and "no_ra" not in given
    changes["arch"] = architecture(given, base)
    config = _with_defaults(replace(base, **changes))
    if config.ra and not _arch_info(config.arch).supports_ra:
        raise ConfigError(f"{config.arch} has no reverse-attention variant; train it without RA "
                          f"(--method {replace(config, ra=False).method_name} or --no-ra)")
    try:
        refuse_inert(INERT, SimpleNamespace(config=config, named=tuple(named)), set(given))
    except InertOptionError as err:
        raise ConfigError(str(err)) from None
    return config


def parse(defaults: Defaults, argv=None):
    """The run's :class:`TrainConfig` from ``argv``; returns ``(config, launch)`` where ``launch``
    holds ``payload`` and ``run_dir`` of a resumed run (else None) and ``overwrite``."""
    parser = build_parser(defaults)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in explicit_options(parser, argv)}
    given.pop("resume", None)
    launch = SimpleNamespace(payload=None, run_dir=None, overwrite=args.overwrite, resume=args.resume)
    if args.resume:
        launch.run_dir, checkpoint = resolve_resume(args.resume)
        launch.payload = load_training_checkpoint(checkpoint)
        saved = _with_defaults(read_record(launch.payload["args"], launch.payload["model_config"]))
        resume.refuse_folder_options(given, launch.run_dir, saved)
        config = _apply(defaults, saved, given)
        resume.refuse_identity_changes(saved, config)
        resume.refuse_split_changes(saved, config)
        launch.saved = saved
    else:
        config = _apply(defaults, defaults.record(args.smoke, given.get("dataset")), given)
    return config, launch


def main(defaults: Defaults, argv=None):
    """Entry point of train.py and the paper scripts; returns the process exit code."""
    finished = False
    try:
        config, launch = parse(defaults, argv)
        if launch.payload is not None:
            check_resume(launch.payload, config)
        run(config, launch)
        finished = True
    except (data.DatasetError, CheckpointError, RunDirError, ConfigError, LockError,
            distributed.DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("aborted without saving this epoch", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown(wait=finished)
    return 0
