"""The one record of a training run: :class:`TrainConfig`, a frozen flat dataclass whose fields are
the options of ``train.py`` (their help text is field metadata) and whose defaults are the paper's
recipe (:mod:`utils.recipe`). ``args.json`` and every checkpoint's ``args`` are this record as it
is (:func:`dataclasses.asdict`); :func:`read_record` reads one back, old records included.

The command line (:mod:`utils.training.cli`) fills the few fields whose default depends on other
options (``weight_decay``, ``awp_warmup``, ``image_size``, ``run_name``); the step, the trainer,
the per-epoch check and the optimiser read the record itself.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace

import torch

from models import arch_help
from utils import data, recipe
from utils.cli import DEVICE_HELP, device_type, eps_fraction, eps_type, finite_float, flag
from utils.training.ancra import STRATEGIES, SUFFIXES, format_method_name, get_method
from utils.training.errors import ConfigError

MODEL = "model and method"
RECIPE = "training recipe (defaults: the paper's, docs/protocol.md section 5)"
UPDATE = "weight update (beyond the paper; both off by default)"
DATA = "data and evaluation"
RUN = "run directory"
SEVERAL = "several processes (launch with torchrun --nproc_per_node=N)"
SPEED = "speed (same mathematics; defaults: bf16 on CUDA, fp32 on CPU; channels-last with bf16)"
BOOLEAN = "boolean"  # a --flag / --no-flag pair (argparse.BooleanOptionalAction)


def option(default, group, help, **parser):
    """A field that is a command-line option: its default, its help group and text, and any
    argparse setting the default's type does not imply (``type``, ``choices``, ``metavar``, ``kind``)."""
    return field(default=default, metadata={"group": group, "help": help, **parser})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run computes and where it goes, made once from the command line
    (:func:`utils.training.cli.parse`) and saved as it is. ``method`` is a registered base name
    (``trades``); ``anc`` and ``ra`` are ANCRA's two parts; ``beta=None`` is the method's own β;
    ``eps`` is a fraction of the pixel range. ``amp`` / ``channels_last`` = None: the device's
    default (:meth:`on`). ``data_seed`` and ``world_size`` are recorded, not options."""

    # --- model and method (--method, --no-anc, --no-ra set method/anc/ra)
    arch: str = option("resnet18", MODEL, f"architecture: {arch_help()}")
    method: str = "trades"
    anc: bool = True
    ra: bool = True
    strategy: str = option("random_adv", MODEL, "ANC: negative (other-class example) strategy; non-random ones "
                           f"use random for epochs <= {recipe.NEGATIVE_WARMUP_EPOCHS}", choices=STRATEGIES)
    alpha: float = option(recipe.ALPHA, MODEL, "ANC asymmetry (1: only the negative moves)")
    zeta: float = option(recipe.ZETA, MODEL, "ANC: weight of the ANC term")
    aux_weight: float = option(recipe.AUX_WEIGHT, MODEL,
                               "RA: lambda, weight of the RA heads in losses and training attacks")
    separate_bn: bool = option(False, MODEL, "RA ablation (WRN, PreActResNet-18): each RA block gets its own "
                               "BatchNorm instead of sharing the network's final one (the reference shares it)")
    beta: float | None = option(None, MODEL, "TRADES/MART robust-term weight (default 6 / 5)", type=finite_float)
    # --- the paper's recipe
    epochs: int = option(recipe.EPOCHS, RECIPE, "training epochs")
    batch_size: int = option(recipe.BATCH_SIZE, RECIPE, "global batch size")
    lr: float = option(recipe.LR, RECIPE, "initial learning rate (the paper's 0.01 for every dataset; the "
                       "reference Tiny-ImageNet script used 0.1)")
    momentum: float = option(recipe.MOMENTUM, RECIPE, "SGD momentum")
    weight_decay: float | None = option(None, RECIPE, "default: the architecture's (2e-4 for ResNet-18 and WRNs, "
                                        "5e-4 for PreActResNet-18) and 5e-4 on Tiny-ImageNet", type=finite_float)
    milestones: tuple = option(recipe.MILESTONES, RECIPE, "epochs after which the lr is multiplied by 0.1",
                               type=int, nargs="*")
    eps: float = option(recipe.EPS, RECIPE, "L-inf radius: 8/255 (default), 0.031 or 8 (pixel units); at most 255 "
                        "pixel units", type=eps_type)
    step_size: float = option(recipe.STEP_SIZE, RECIPE, "PGD step of training attacks and evaluation")
    attack_steps: int = option(recipe.TRAIN_ATTACK_STEPS, RECIPE, "PGD steps of the training attacks")
    # --- weight update beyond the paper
    awp_gamma: float = option(0.0, UPDATE, "adversarial weight perturbation (Wu et al. 2020) of relative size "
                              "gamma; 0 = off; their defaults: 5e-3 for TRADES, 1e-2 for PGD-AT")
    awp_warmup: int | None = option(None, UPDATE, "AWP starts after this many epochs (default as in their code: 10 "
                                    "for TRADES, else 0)", type=int)
    ema: float = option(0.0, UPDATE, "keep an exponential moving average of the weights with this decay (e.g. "
                        "0.999); 0 = off. When on, the per-epoch check and best.pt use the averaged weights",
                        metavar="DECAY")
    # --- data and the per-epoch check
    dataset: str = option("cifar10", DATA, "any registered dataset (utils/data.py)", choices=data.DATASETS)
    data_dir: str = option(data.DEFAULT_DATA_DIR, DATA, "where datasets live (CIFAR downloads here)")
    train_size: int | None = option(None, DATA, "train on a fixed random subset of this many images (synthetic: "
                                    "generate this many)", type=int)
    image_size: int | None = option(None, DATA, "side of the synthetic images (synthetic only)", type=int)
    eval_size: int = option(1000, DATA, "fixed test subset evaluated every epoch (0: the whole test set)")
    eval_steps: int = option(recipe.EVAL_STEPS, DATA, "steps of the per-epoch PGD evaluation")
    val_size: int = option(0, DATA, "hold out this many training images to choose best.pt (0: choose on the test "
                           "subset)")
    # --- the run folder and how the run is driven
    out_dir: str = option("runs", RUN, "parent folder of run directories")
    run_name: str | None = option(None, RUN, "default: <dataset>_<arch>_<method>[_sepbn][_awpG][_emaD]_s<seed>",
                                  type=str)
    save_freq: int = option(10, RUN, "also keep epoch_N.pt every this many epochs")
    seed: int = option(0, RUN, "seeds torch, numpy and python random")
    device: str = option("auto", RUN, DEVICE_HELP, type=device_type)
    quiet: bool = option(False, RUN, "no progress bars")
    smoke: bool = option(False, RUN, "a quick run of the whole pipeline (2 epochs, a few batches, 2-step attacks): "
                         "tiny synthetic data, or with --dataset NAME a fixed subset of 256 training and 64 test "
                         "images of that dataset; replaces its own run directory, never a run that is not a smoke run")
    # --- several processes
    per_rank_batch: bool = option(False, SEVERAL, "--batch-size is per process (global batch = N x --batch-size); "
                                  "by default --batch-size is the global batch, split across the N processes")
    sync_bn: bool = option(False, SEVERAL, "SyncBatchNorm: training BN statistics over the global batch instead of "
                           "each shard")
    # --- speed: how a step is executed, never what it computes
    amp: bool | None = option(None, SPEED, "bf16 autocast for attacks, losses and the per-epoch evaluation (default: "
                              "on for CUDA)", kind=BOOLEAN)
    channels_last: bool | None = option(None, SPEED, "NHWC memory format for weights and inputs (default: with bf16)",
                                        kind=BOOLEAN)
    joint_attacks: bool = option(True, SPEED, "run the adversarial and the negatives' targeted attack as one 2B "
                                 "batch", kind=BOOLEAN)
    compile: bool = option(False, SPEED, "compiled training step: attacks, negatives and loss through torch.compile, "
                           "CUDA graphs on CUDA (docs/training.md#compiled-step; off until measured; minutes of "
                           "warm-up)", kind=BOOLEAN)
    # --- recorded, not options
    data_seed: int = 0   # draws the synthetic data and the fixed subsets (read back by the evaluation)
    world_size: int = 1  # processes of the launch that wrote the record

    def __post_init__(self):
        object.__setattr__(self, "milestones", tuple(self.milestones))
        _check(self)

    @property
    def method_name(self):
        """``trades-ancra``, ``trades-anc``, ``trades-ra`` or ``trades``."""
        return format_method_name(self.method, self.anc, self.ra)

    def on(self, device):
        """This record with the speed defaults of ``device`` filled in: bf16 on CUDA, fp32 on CPU,
        channels-last with bf16."""
        amp = torch.device(device).type == "cuda" if self.amp is None else self.amp
        return replace(self, amp=amp, channels_last=amp if self.channels_last is None else self.channels_last)

    def autocast(self, device):
        """bf16 autocast on ``device`` with ``amp``, else a no-op context."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(self.amp))

    def memory_format(self):
        """NHWC with ``channels_last``, else the default layout."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe_speed(self):
        """One line for the run log."""
        flags = [("bf16 autocast" if self.amp else "fp32"), ("channels-last" if self.channels_last else "NCHW"),
                 ("joint 2B attack batch" if self.joint_attacks else "separate attack batches")]
        return ", ".join(flags + (["compiled step"] if self.compile else []))

    def model_config(self, num_classes):
        """The checkpoint's ``model_config`` (read back by ``models.load_model``)."""
        return {"arch": self.arch, "num_classes": num_classes, "reverse_attention": self.ra,
                "image_size": self.image_size, **({"separate_bn": True} if self.separate_bn else {})}


FIELDS = {f.name: f for f in fields(TrainConfig)}
OPTIONS = tuple(name for name, f in FIELDS.items() if "help" in f.metadata)  # the record's command-line options
FLOATS = ("lr", "momentum", "weight_decay", "step_size", "eps", "awp_gamma", "ema", "alpha", "zeta", "aux_weight",
          "beta")
NON_NEGATIVE = ("zeta", "aux_weight", "beta")


def _check(c: TrainConfig):
    """Every range and combination of one record; each message names the option and what it accepts."""
    method = get_method(c.method)
    if c.strategy not in STRATEGIES:
        raise ConfigError(f"unknown negative strategy {c.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if c.anc and not method.allows_anc:
        raise ConfigError(f"--method {method.name} takes no negatives; turn ANC off (--no-anc)")
    for name in FLOATS:
        value = getattr(c, name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ConfigError(f"{flag(name)} must be a finite number, got {value!r}")
        if name in NON_NEGATIVE and value is not None and value < 0:
            raise ConfigError(f"{flag(name)} is a loss weight and must be >= 0, got {value}")
    if not 0.0 <= c.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in [0, 1], got {c.alpha}")
    for name in ("batch_size", "epochs", "attack_steps", "eval_steps"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{flag(name)} must be at least 1")
    if c.eps <= 0 or c.step_size <= 0:
        raise ConfigError("the training attack needs positive --eps and --step-size")
    if c.eval_size < 0 or c.val_size < 0 or (c.train_size is not None and c.train_size < 1):
        raise ConfigError("--eval-size and --val-size must be >= 0 and --train-size >= 1")
    milestones = list(c.milestones)
    if any(b <= a for a, b in zip(milestones, milestones[1:])) or any(m < 1 for m in milestones):
        raise ConfigError(f"--milestones must be strictly increasing positive epochs (each decays the lr once), "
                          f"got {' '.join(map(str, milestones))}")
    if c.lr <= 0 or (c.weight_decay is not None and c.weight_decay < 0):
        raise ConfigError("need --lr > 0 and --weight-decay >= 0")
    if not 0 <= c.momentum < 1:
        raise ConfigError(f"--momentum must lie in [0, 1), got {c.momentum}")
    if c.awp_gamma < 0 or (c.awp_warmup is not None and c.awp_warmup < 0):
        raise ConfigError("--awp-gamma and --awp-warmup must be >= 0 (0 turns AWP off)")
    if not 0 <= c.ema < 1:
        raise ConfigError(f"--ema is a decay in [0, 1) such as 0.999 (0 = off), got {c.ema}")
    if c.image_size is not None and c.image_size < 1:
        raise ConfigError("--image-size must be at least 1")
    if c.run_name is not None:
        check_run_name(c.run_name)


def check_run_name(name):
    """A run name is one plain folder name: not empty, no path separator, not ``.`` or ``..``."""
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if not name or name in (".", "..") or any(sep in name for sep in separators) or name != name.strip():
        raise ConfigError(f"--run-name {name!r} is not a plain folder name; give a name such as my_run "
                          f"(no '/', not empty, '.' or '..'): the run folder is --out-dir/NAME")


PAPER = TrainConfig()  # the paper's recipe (TRADES-ANCRA, ResNet-18 on CIFAR-10, PGD-20 check)


def as_record(config: TrainConfig):
    """``args.json`` and the checkpoint's ``args``: the record as it is."""
    return asdict(config)


# Spellings older versions accepted or saved; read from old records only (the command line takes the
# registered names).
OLD_METHOD_NAMES = {"pgdat": "pgd-at", "at": "pgd-at", "pgd": "pgd-at"}  # after "_" -> "-"
OLD_KEYS = {"reverse_attention": "ra"}


def saved_method_name(name):
    """``(method, anc or None, ra or None)`` of a saved method spelling (``pgd_at``, ``trades_ancra``)."""
    name, parts = str(name).lower().replace("_", "-"), (None, None)
    for suffix, flags in SUFFIXES.items():
        if name.endswith(suffix):
            name, parts = name[: -len(suffix)], flags
            break
    return (OLD_METHOD_NAMES.get(name, name), *parts)


def read_record(saved, model_config=None):
    """The :class:`TrainConfig` of a saved ``args`` record (``args.json`` / a checkpoint's ``args``).

    Records of earlier versions are normalised: ``reverse_attention`` is ``ra``; old method spellings
    (``pgd_at``, ``trades_ancra``) are the registered names; ε in pixel units (8.0) is a fraction;
    options that did not exist yet take the defaults they had before (AWP and EMA off); the model's
    own ``model_config`` gives the architecture, RA, image size and BatchNorm layout; keys no longer
    in the record (``attack_loss``, ``method_name``, ``resume``, ...) are dropped, and a saved attack
    loss other than the one the method uses is refused (the run could not go on as it was trained)."""
    saved = {OLD_KEYS.get(key, key): value for key, value in dict(saved).items()}
    model = model_config or {}
    method, anc, ra = saved_method_name(saved.get("method", ""))
    record = {key: value for key, value in saved.items() if key in FIELDS}
    record.update(method=method, anc=bool(saved.get("anc", anc or False)),
                  ra=bool(model.get("reverse_attention", saved.get("ra", ra or False))),
                  separate_bn=bool(model.get("separate_bn", saved.get("separate_bn", False))))
    if model.get("arch") or "arch" not in saved:
        record["arch"] = model.get("arch") or f"wrn-{saved.get('depth') or 34}-{saved.get('widen') or 10}"
    if model.get("image_size"):
        record["image_size"] = model["image_size"]
    if "eps" in record:
        record["eps"] = eps_fraction(record["eps"])  # runs saved before ε was stored as a fraction: pixel units
    try:
        config = TrainConfig(**record)
    except (TypeError, ValueError) as err:  # a value of the wrong type: a damaged or hand-edited record
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"the run's saved options are damaged ({type(err).__name__}: {err}); the run cannot be "
                          f"continued as it was trained: start a new run") from None
    attack_loss, uses = saved.get("attack_loss"), get_method(method).attack_loss(config.anc, config.ra)
    if attack_loss is not None and attack_loss != uses:
        raise ConfigError(f"the run was trained with --attack-loss {attack_loss}, an option this version no longer has "
                          f"({config.method_name} attacks with {uses}), so it cannot go on as it was trained; start "
                          f"a new run")
    return config
