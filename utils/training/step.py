"""One training step: adversarial examples, negatives (ANC), the method's loss, the weight update.

Nothing in the step waits for the device: the metrics come back as 0-dim device tensors.
"""
import torch

from models import has_reverse_attention, unwrap
from utils.attacks import pgd, pgd_train, random_start
from utils.training.config import PLAIN_SPEED, MethodConfig, SpeedConfig, compiled
from utils.training.methods import training_loss
from utils.training.negatives import Negatives, make_negatives, select_negatives
from utils.training.updates import WeightUpdate


class TrainStep:
    """One optimisation step on a batch: adversarial examples, negatives (ANC), loss, update.

    ``step(x, y, epoch)`` returns the batch's metrics as detached 0-dim tensors on the device
    (no host synchronisation). ``model`` may be wrapped (DDP); the attacks run on the bare
    module. ``epoch`` is 1-based and decides the warm-up of non-random negative strategies
    and of AWP. ``update`` is the :class:`~utils.training.updates.WeightUpdate` (default: a
    plain optimizer step).
    """

    def __init__(self, model, optimizer, config: MethodConfig, num_classes, speed: SpeedConfig = PLAIN_SPEED,
                 update=None):
        self.model = compiled(model, speed)
        self.attack_model = compiled(unwrap(model), speed)  # attacks bypass DDP: no gradient sync, no parameter grads
        self.optimizer = optimizer
        self.config = config
        self.method = config.unit
        self.num_classes = num_classes
        self.speed = speed
        self.update = update if update is not None else WeightUpdate(optimizer)
        self.reverse_attention = has_reverse_attention(unwrap(model))
        self.attack_aux_weight = config.aux_weight if self.reverse_attention else 0.0

    def _pgd_args(self):
        cfg = self.config
        return {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.steps, "aux_weight": self.attack_aux_weight}

    def adversarial(self, x, y):
        """Training adversarial examples (x itself for a method without an attack)."""
        if not self.method.attacked:
            return x
        return pgd_train(self.attack_model, x, y, loss=self.config.attack_loss, **self._pgd_args())

    def negatives(self, x, y, epoch):
        """One negative per anchor (docs/protocol.md §3), or None when ANC is off."""
        cfg = self.config
        if not cfg.anc:
            return None
        return make_negatives(cfg.strategy, self.attack_model, x, y, self.num_classes, epoch=epoch,
                              **self._pgd_args())

    def can_join(self):
        """Whether both attacks can share one batch: same loss (CE) and both attacked."""
        cfg = self.config
        return (self.speed.joint_attacks and cfg.anc and cfg.strategy.endswith("_adv")
                and cfg.attack_loss == "ce" and self.method.attacked)

    def joint_attack(self, x, y, epoch):
        """Adversarial examples and negatives from one PGD batch of 2B. The random starts and the
        negative choice draw from the RNG in the same order as the separate attacks, so the
        result is the one of :meth:`adversarial` + :meth:`negatives`."""
        cfg = self.config
        start_adv = random_start(x, cfg.eps, "normal")
        index, valid = select_negatives(cfg.strategy, self.attack_model, x, y, self.num_classes, epoch=epoch)
        x_neg = x[index]
        start = torch.cat([start_adv, random_start(x_neg, cfg.eps, "normal")])
        batch = x.shape[0]
        targeted = torch.arange(2 * batch, device=x.device) >= batch
        both = pgd(self.attack_model, torch.cat([x, x_neg]), torch.cat([y, y]), loss="ce", targeted=targeted,
                   start=start, **self._pgd_args())
        x_adv, x_neg = both.split(batch)
        return x_adv, Negatives(x_neg, y[index], index, valid)

    def examples(self, x, y, epoch):
        """``(x_adv, negatives or None)`` for the batch, jointly when possible."""
        if self.can_join():
            return self.joint_attack(x, y, epoch)
        return self.adversarial(x, y), self.negatives(x, y, epoch)

    def loss_fn(self, x, y, x_adv, neg):
        """The batch's training loss as a function of the model (the update may evaluate it on a
        perturbed copy): ``loss_fn(model) -> (loss, metrics)``, in the step's autocast."""
        cfg = self.config

        def loss(model):
            with self.speed.autocast(x.device):
                return training_loss(self.method, model, x, y, x_adv, None if neg is None else neg.x,
                                     None if neg is None else neg.y, beta=cfg.resolved_beta, zeta=cfg.zeta,
                                     alpha=cfg.alpha, aux_weight=cfg.aux_weight,
                                     neg_valid=None if neg is None else neg.valid)
        return loss

    def __call__(self, x, y, epoch):
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.speed.autocast(x.device):
            x_adv, neg = self.examples(x, y, epoch)
        self.model.train()
        return self.update(self.model, self.loss_fn(x, y, x_adv, neg), epoch)
