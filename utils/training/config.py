"""What a training run computes and how, as frozen dataclasses made once from the command line:
the method, the model, the data, the schedule, the speed options, the per-epoch check and the
run folder (:class:`TrainConfig` holds one of each)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils import recipe
from utils.training.ancra import check_strategy, format_method_name, get_method
from utils.training.errors import ConfigError
from utils.training.schedule import Schedule


@dataclass(frozen=True)
class MethodConfig:
    """What one training batch computes (docs/protocol.md §2–4).

    ``method`` is a registered method name (:mod:`utils.training.ancra`), which also decides the
    loss of its training attack; ``ra``: the model has reverse-attention heads. ``aux_weight`` (λ)
    enters the losses and the training attacks ("with p") of RA models only; ``beta=None``
    takes the method's default.
    """

    method: str = "trades"
    anc: bool = True
    ra: bool = True
    strategy: str = "random_adv"
    alpha: float = recipe.ALPHA
    zeta: float = recipe.ZETA
    beta: float | None = None
    aux_weight: float = recipe.AUX_WEIGHT
    eps: float = recipe.EPS
    step_size: float = recipe.STEP_SIZE
    attack_steps: int = recipe.TRAIN_ATTACK_STEPS

    def __post_init__(self):
        method = get_method(self.method)
        try:
            check_strategy(self.strategy)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.anc and not method.allows_anc:
            raise ConfigError(f"--method {method.name} takes no negatives; turn ANC off (--no-anc)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.attack_steps < 1 or self.eps <= 0 or self.step_size <= 0:
            raise ConfigError("the training attack needs --attack-steps >= 1 and positive --eps and --step-size")

    @property
    def unit(self):
        """The registered :class:`~utils.training.ancra.Method`."""
        return get_method(self.method)

    def name(self, reverse_attention):
        """Method name as in the paper: ``trades-ancra``, ``trades-anc``, ``trades-ra`` or ``trades``."""
        return format_method_name(self.method, self.anc, reverse_attention)


@dataclass(frozen=True)
class SpeedConfig:
    """How a step is executed, never what it computes (the same mathematics in every combination).

    ``joint_attacks``: the adversarial examples and the targeted negatives (both eval mode, both
    CE from x + 0.001·N(0,1)) run as one PGD batch of 2B with a per-example direction;
    ``amp``: bf16 autocast for every forward (attacks, losses, evaluation); ``channels_last``:
    NHWC weights and inputs; ``compile``: the compiled step (:mod:`utils.training.fast`: the
    attacks, the negative choice and the training forward/backward through ``torch.compile``,
    CUDA graphs on CUDA), compiled by ``compile_backend`` (tests use ``aot_eager``).
    :meth:`for_device` gives the defaults: bf16 on CUDA, fp32 on CPU, channels-last with bf16
    (on CPU it pays only there); the compiled step stays off until measured (docs/training.md).
    """

    joint_attacks: bool = True
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"

    @classmethod
    def for_device(cls, device, **overrides):
        """Defaults for ``device`` with ``overrides`` (None values keep the default)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        amp = overrides.pop("amp", torch.device(device).type == "cuda")
        return cls(**{"amp": amp, "channels_last": amp, **overrides})

    def autocast(self, device):
        """bf16 autocast on ``device`` when ``amp`` is set, else a no-op context."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=self.amp)

    def memory_format(self):
        """NHWC with ``channels_last``, else the default layout."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self):
        """One line for the run log."""
        flags = [("bf16 autocast" if self.amp else "fp32"), ("channels-last" if self.channels_last else "NCHW"),
                 ("joint 2B attack batch" if self.joint_attacks else "separate attack batches")]
        if self.compile:
            flags.append("compiled step")
        return ", ".join(flags)


PLAIN_SPEED = SpeedConfig()  # fp32, NCHW, joint attacks: the reference execution


def prepare_model(model, speed: SpeedConfig):
    """Apply ``speed``'s memory format to ``model`` in place (before the optimizer and DDP see it)."""
    return model.to(memory_format=speed.memory_format())


@dataclass(frozen=True)
class EvalConfig:
    """The per-epoch robustness check: PGD (CE, uniform start) with a fixed noise seed."""

    eps: float = recipe.EPS
    step_size: float = recipe.STEP_SIZE
    steps: int = recipe.EVAL_STEPS
    seed: int = 0

    @property
    def attack_name(self):
        return f"PGD-{self.steps}"


RECIPE_CHECK = EvalConfig()  # PGD-20 at 8/255 with step 0.007


@dataclass(frozen=True)
class SpeedOptions:
    """The speed flags as asked for on the command line (``None``: the device's default); the
    resolved :class:`SpeedConfig` depends on the device the run lands on (:meth:`on`)."""

    amp: bool | None = None
    channels_last: bool | None = None
    joint_attacks: bool = True
    compile: bool = False

    def on(self, device):
        """The :class:`SpeedConfig` for ``device``."""
        return SpeedConfig.for_device(device, amp=self.amp, channels_last=self.channels_last,
                                      joint_attacks=self.joint_attacks, compile=self.compile)


@dataclass(frozen=True)
class ModelConfig:
    """The network a run trains; :meth:`as_dict` is the checkpoint's ``model_config``
    (read back by ``models.load_model``)."""

    arch: str
    num_classes: int
    reverse_attention: bool
    image_size: int
    separate_bn: bool = False

    def as_dict(self):
        options = {"separate_bn": True} if self.separate_bn else {}
        return {"arch": self.arch, "num_classes": self.num_classes, "reverse_attention": self.reverse_attention,
                "image_size": self.image_size, **options}


@dataclass(frozen=True)
class DataConfig:
    """Which images a run trains and checks on. ``seed`` draws the synthetic data and the fixed
    subsets (read back by the evaluation); the validation split is drawn with the run's seed."""

    dataset: str
    data_dir: str
    image_size: int
    train_size: int | None = None  # a fixed random subset (synthetic: generate this many)
    eval_size: int = 1000          # fixed test subset of the per-epoch check (0: the whole test set)
    val_size: int = 0              # held-out training images that choose best.pt (0: the test subset does)
    seed: int = 0


@dataclass(frozen=True)
class ScheduleConfig:
    """How long and with what steps: epochs, the global batch, the SGD schedule and the optional
    weight updates beyond the paper (AWP, EMA)."""

    epochs: int
    batch_size: int
    optimizer: Schedule            # lr, momentum, weight decay, milestones
    per_rank_batch: bool = False   # --batch-size is per process instead of global
    awp_gamma: float = 0.0
    awp_warmup: int = 0
    ema: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """Where the run goes and how it is driven."""

    out_dir: str
    run_name: str
    seed: int = 0
    device: str = "auto"
    save_freq: int = 10
    resume: str | None = None
    overwrite: bool = False
    smoke: bool = False
    quiet: bool = False
    sync_bn: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, made once from the command line
    (:func:`utils.training.cli.resolve`). :meth:`as_args` is the flat record kept in
    ``args.json`` and in every checkpoint (the format resume and the evaluation read back)."""

    method: MethodConfig
    model: ModelConfig
    data: DataConfig
    schedule: ScheduleConfig
    speed: SpeedOptions
    evaluation: EvalConfig
    run: RunConfig

    @property
    def method_name(self):
        """``trades-ancra``, ``trades-anc``, ``trades-ra`` or ``trades``."""
        return self.method.name(self.model.reverse_attention)

    def as_args(self, world_size=1):
        """The flat ``args`` record (same keys and meaning as every earlier run's args.json)."""
        m, model, d, s, opt, r = self.method, self.model, self.data, self.schedule, self.schedule.optimizer, self.run
        return {
            "method": m.method, "method_name": self.method_name, "anc": m.anc, "reverse_attention":
            model.reverse_attention, "strategy": m.strategy, "alpha": m.alpha, "zeta": m.zeta, "beta": m.beta,
            "aux_weight": m.aux_weight, "attack_loss": m.unit.attack_loss(m.anc, m.ra), "eps": m.eps,
            "step_size": m.step_size, "attack_steps": m.attack_steps, "arch": model.arch, "separate_bn": model.separate_bn,
            "dataset": d.dataset, "data_dir": d.data_dir, "image_size": d.image_size, "train_size": d.train_size,
            "eval_size": d.eval_size, "val_size": d.val_size, "data_seed": d.seed,
            "epochs": s.epochs, "batch_size": s.batch_size, "per_rank_batch": s.per_rank_batch, "lr": opt.lr,
            "momentum": opt.momentum, "weight_decay": opt.weight_decay, "milestones": list(opt.milestones),
            "awp_gamma": s.awp_gamma, "awp_warmup": s.awp_warmup, "ema": s.ema,
            "amp": self.speed.amp, "channels_last": self.speed.channels_last,
            "joint_attacks": self.speed.joint_attacks, "compile": self.speed.compile,
            "eval_steps": self.evaluation.steps,
            "out_dir": r.out_dir, "run_name": r.run_name, "seed": r.seed, "device": r.device,
            "save_freq": r.save_freq, "resume": r.resume, "overwrite": r.overwrite, "smoke": r.smoke,
            "quiet": r.quiet, "sync_bn": r.sync_bn, "world_size": world_size,
        }
