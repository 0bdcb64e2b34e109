"""One training step: adversarial examples, negatives (ANC), the method's loss, the weight update.

Nothing in the step waits for the device: the metrics come back as 0-dim device tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models import has_reverse_attention, unwrap
from utils.attacks import attack_mode, random_start, training_attack
from utils.training.config import TrainConfig
from utils.training.fast import FastPath
from utils.training.methods import get_method, training_loss
from utils.training.negatives import (
    Negatives,
    choose_negatives,
    effective_strategy,
    negative_scores,
    selection_logits,
)
from utils.training.updates import WeightUpdate


@dataclass
class Draws:
    """A step's random numbers, drawn before any computation in the order the step has always
    drawn them: the adversarial start's N(0,1), the random rule's class and example scores, the
    negatives' start N(0,1) (None where the step needs no such draw). Drawing them first keeps the
    RNG out of the compiled region, so the compiled and the eager step see the same numbers."""

    start: torch.Tensor | None
    scores: tuple | None
    neg_start: torch.Tensor | None


class TrainStep:
    """One optimisation step on a batch: adversarial examples, negatives (ANC), loss, update.

    ``step(x, y, epoch)`` returns the batch's metrics as detached 0-dim tensors on the device
    (no host synchronisation). ``model`` may be wrapped (DDP); the attacks run on the bare
    module. ``epoch`` is 1-based and decides the warm-up of non-random negative strategies
    and of AWP. ``update`` is the :class:`~utils.training.updates.WeightUpdate` (default: a
    plain optimizer step). ``config`` is the run's record (:class:`~utils.training.config.TrainConfig`
    with the device's speed filled in, ``config.on(device)``); its ``ra`` must match the model. With
    ``config.compile`` the attacks, the negative choice and the training forward/backward run
    compiled (:class:`~utils.training.fast.FastPath` with ``compile_backend``, docs/training.md).
    """

    def __init__(self, model, optimizer, config: TrainConfig, num_classes, update=None, *,
                 compile_backend="inductor"):
        if config.ra != has_reverse_attention(unwrap(model)):
            raise ValueError(f"config.ra is {config.ra} but the model {'has' if not config.ra else 'has no'} RA heads")
        self.model = model
        self.attack_model = unwrap(model)  # attacks bypass DDP: no gradient sync, no parameter grads
        self.optimizer = optimizer
        self.config = config
        self.method = get_method(config.method)
        self.attack_loss = self.method.attack_loss(config.anc, config.ra)
        self.num_classes = num_classes
        self.update = update if update is not None else WeightUpdate(optimizer)
        self.attack_aux_weight = config.aux_weight if config.ra else 0.0
        self.fast = FastPath(compile_backend) if config.compile else None

    def _attack_args(self):
        cfg = self.config
        return {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.attack_steps,
                "aux_weight": self.attack_aux_weight}

    def can_join(self):
        """Whether both attacks can share one batch: same loss (CE) and both attacked."""
        cfg = self.config
        return (cfg.joint_attacks and cfg.anc and cfg.strategy.endswith("_adv")
                and self.attack_loss == "ce" and self.method.attacked)

    def draw(self, x):
        """The step's :class:`Draws` for batch ``x`` from the global RNG."""
        cfg = self.config
        normal = lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype)  # as random_start draws it
        start = normal() if self.method.attacked else None
        scores = negative_scores(x.shape[0], self.num_classes, x.device) if cfg.anc else None
        neg_start = normal() if cfg.anc and cfg.strategy.endswith("_adv") else None
        return Draws(start, scores, neg_start)

    def _examples(self, x, y, draws: Draws, base):
        """``(x_adv, negatives as a tuple or None)`` from the draws, the model in attack mode:
        no RNG, no host synchronisation (what the fast path compiles). ``base`` is the negative
        rule in force this epoch; the two attacks share one 2B batch when :meth:`can_join`."""
        cfg, model, args = self.config, self.attack_model, self._attack_args()
        neg = None
        if cfg.anc:
            index, valid = choose_negatives(base, y, self.num_classes, selection_logits(base, model, x),
                                            scores=draws.scores)
            neg = [x[index], y[index], index, valid]
        if self.can_join():
            start = torch.cat([random_start(x, cfg.eps, "normal", normal=draws.start),
                               random_start(neg[0], cfg.eps, "normal", normal=draws.neg_start)])
            batch = x.shape[0]
            targeted = torch.arange(2 * batch, device=x.device) >= batch
            both = training_attack(model, torch.cat([x, neg[0]]), torch.cat([y, y]), start, loss="ce",
                                   targeted=targeted, **args)
            x_adv, neg[0] = both.split(batch)
            return x_adv, tuple(neg)
        x_adv = x
        if self.method.attacked:
            x_adv = training_attack(model, x, y, random_start(x, cfg.eps, "normal", normal=draws.start),
                                    loss=self.attack_loss, **args)
        if neg is not None and draws.neg_start is not None:
            neg[0] = training_attack(model, neg[0], y, random_start(neg[0], cfg.eps, "normal", normal=draws.neg_start),
                                     loss="ce", targeted=True, **args)
        return x_adv, None if neg is None else tuple(neg)

    def examples(self, x, y, epoch, compiled=False):
        """``(x_adv, Negatives or None)`` for the batch (docs/protocol.md §2–3): x itself for a
        method without an attack; one negative per anchor when ANC is on."""
        draws = self.draw(x)
        base = effective_strategy(self.config.strategy, epoch)
        with attack_mode(self.attack_model):
            if compiled:
                x_adv, neg = self.fast.call("examples", x.device, self._examples, x, y, draws, base)
            else:
                x_adv, neg = self._examples(x, y, draws, base)
        return x_adv, None if neg is None else Negatives(*neg)

    def loss_fn(self, x, y, x_adv, neg, compiled=False):
        """The batch's training loss as a function of the model (the update may evaluate it on a
        perturbed copy): ``loss_fn(model) -> (loss, metrics)``, in the step's autocast."""
        cfg = self.config

        def loss(model):
            beta = self.method.default_beta if cfg.beta is None else cfg.beta
            kwargs = {"beta": beta, "zeta": cfg.zeta, "alpha": cfg.alpha, "aux_weight": cfg.aux_weight,
                      "neg_valid": None if neg is None else neg.valid}
            args = (self.method, model, x, y, x_adv, None if neg is None else neg.x, None if neg is None else neg.y)
            with self.config.autocast(x.device):
                if compiled:
                    return self.fast.call("loss", x.device, training_loss, *args, **kwargs)
                return training_loss(*args, **kwargs)
        return loss

    def __call__(self, x, y, epoch):
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self.fast is not None and self.fast.takes(x)
        with self.config.autocast(x.device):
            x_adv, neg = self.examples(x, y, epoch, compiled)
        self.model.train()
        return self.update(self.model, self.loss_fn(x, y, x_adv, neg, compiled), epoch)

    def take_compile_seconds(self):
        """Seconds spent in calls that compiled a graph since the last call (None without --compile)."""
        return None if self.fast is None else self.fast.take_seconds()
