"""The optimiser and its learning-rate schedule (docs/protocol.md §5): SGD with momentum and a
step decay (×0.1) at milestone epochs, and the rebuild that lets a resumed run change them.
``config`` is the run's :class:`~utils.training.config.TrainConfig` (``lr``, ``momentum``,
``weight_decay``, ``milestones``)."""
from collections import Counter

import torch

from utils import recipe


def lr_after(config, completed_epochs):
    """The lr of the epoch after ``completed_epochs`` (closed form of MultiStepLR)."""
    passed = sum(1 for m in config.milestones if m <= completed_epochs)
    return config.lr * recipe.LR_GAMMA ** passed


def build_optimizer(model, config):
    """SGD over the model's parameters with the config's lr, momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def build_scheduler(optimizer, config):
    """MultiStepLR at the config's milestones (one ``step()`` per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), recipe.LR_GAMMA)


def reschedule(optimizer, config, completed_epochs):
    """Apply ``config``'s schedule to a restored ``optimizer`` after ``completed_epochs`` epochs and
    return a new MultiStepLR that continues from there: momentum, weight decay and the lr the new
    schedule gives at this point go into every parameter group (momentum buffers are kept)."""
    for group in optimizer.param_groups:
        group.update(lr=config.lr, initial_lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, config)
    lr = lr_after(config, completed_epochs)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scheduler.last_epoch = completed_epochs
    scheduler.milestones = Counter(config.milestones)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler
