"""What a training run computes and how: the method's settings, the speed options, the
per-epoch check and the device. Frozen dataclasses that validate themselves."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from utils import recipe
from utils.training.errors import ConfigError
from utils.training.methods import format_method_name, get_method
from utils.training.negatives import check_strategy

DEVICES = ("auto", "cpu", "cuda")
ATTACK_LOSSES = ("ce", "kl")


def resolve_device(name="auto"):
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a ConfigError."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but this machine has no usable CUDA GPU; use --device cpu")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class MethodConfig:
    """What one training batch computes (docs/protocol.md §2–4).

    ``method`` is a registered method name (:mod:`utils.training.methods`). ``attack_loss`` is the
    loss of the training adversarial examples (see ``Method.attack_loss``). ``aux_weight`` (λ)
    enters the losses and the training attacks ("with p") of RA models only; ``beta=None``
    takes the method's default.
    """

    method: str = "trades"
    anc: bool = True
    strategy: str = "random_adv"
    alpha: float = recipe.ALPHA
    zeta: float = recipe.ZETA
    beta: float | None = None
    aux_weight: float = recipe.AUX_WEIGHT
    attack_loss: str = "ce"
    eps: float = recipe.EPS
    step_size: float = recipe.STEP_SIZE
    steps: int = recipe.TRAIN_ATTACK_STEPS

    def __post_init__(self):
        method = get_method(self.method)
        try:
            check_strategy(self.strategy)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.attack_loss not in ATTACK_LOSSES:
            raise ConfigError(f"unknown attack loss {self.attack_loss!r}; choose one of {', '.join(ATTACK_LOSSES)}")
        if self.anc and not method.allows_anc:
            raise ConfigError(f"--method {method.name} takes no negatives; turn ANC off (--no-anc)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1], got {self.alpha}")
        if self.steps < 1 or self.eps <= 0 or self.step_size <= 0:
            raise ConfigError("the training attack needs --attack-steps >= 1 and positive --eps and --step-size")

    @property
    def unit(self):
        """The registered :class:`~utils.training.methods.Method`."""
        return get_method(self.method)

    @property
    def resolved_beta(self):
        """β actually used (the method's default unless given)."""
        return self.unit.default_beta if self.beta is None else self.beta

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
