"""The optimiser and its learning-rate schedule (docs/protocol.md §5): SGD with momentum and a
step decay at milestone epochs, and the rebuild that lets a resumed run change them."""
import math
from collections import Counter
from dataclasses import dataclass

import torch

from utils import recipe
from utils.training.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """SGD with momentum, lr ×``gamma`` after each milestone epoch, stepped once per epoch."""

    lr: float = recipe.LR
    momentum: float = recipe.MOMENTUM
    weight_decay: float = 2e-4
    milestones: tuple = recipe.MILESTONES
    gamma: float = recipe.LR_GAMMA

    def __post_init__(self):
        if not all(math.isfinite(v) for v in (self.lr, self.momentum, self.weight_decay, self.gamma)):
            raise ConfigError("--lr, --momentum and --weight-decay must be finite numbers")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("need --lr > 0 and --weight-decay >= 0")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must lie in [0, 1), got {self.momentum}")

    def lr_after(self, completed_epochs):
        """The lr of the epoch after ``completed_epochs`` (closed form of MultiStepLR)."""
        passed = sum(1 for m in self.milestones if m <= completed_epochs)
        return self.lr * self.gamma ** passed


def build_optimizer(model, schedule: Schedule):
    """SGD over the model's parameters with the schedule's momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=schedule.lr, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay)


def build_scheduler(optimizer, schedule: Schedule):
    """MultiStepLR at the schedule's milestones (one ``step()`` per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(schedule.milestones), schedule.gamma)


def reschedule(optimizer, schedule: Schedule, completed_epochs):
    """Apply ``schedule`` to a restored ``optimizer`` after ``completed_epochs`` epochs and return
    a new MultiStepLR that continues from there: momentum, weight decay and the lr the new
    schedule gives at this point go into every parameter group (momentum buffers are kept)."""
    for group in optimizer.param_groups:
        group.update(lr=schedule.lr, initial_lr=schedule.lr, momentum=schedule.momentum,
                     weight_decay=schedule.weight_decay)
    scheduler = build_scheduler(optimizer, schedule)
    lr = schedule.lr_after(completed_epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scheduler.last_epoch = completed_epochs
    scheduler.milestones = Counter(schedule.milestones)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler
