"""Plug-ins of the training step's weight update (:class:`~utils.training.ancra.WeightUpdate`):
they may perturb the weights while the loss is computed (:class:`AWP`) and act after each
optimizer step (:class:`EMA`); those with a ``checkpoint_key`` are saved in the checkpoint under
that key and restored on resume. Beyond the paper; both off by default.
"""
import copy
from contextlib import contextmanager, nullcontext

import torch

from models import unwrap
from utils.training.ancra import WeightUpdate


class UpdatePlugin:
    """Base plug-in: does nothing. ``loss_fn(model) -> (loss, metrics)`` is the step's training loss."""

    checkpoint_key = None

    def perturbed(self, model, loss_fn, epoch):
        """A context during which the loss is computed and back-propagated."""
        return nullcontext()

    def after_step(self, model):
        """Called after every optimizer step."""

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s result (None: the checkpoint had none)."""


class AWP(UpdatePlugin):
    """Adversarial weight perturbation (Wu et al. 2020, "Adversarial Weight Perturbation Helps
    Robust Generalization"): the loss is computed at ``w + v`` with, for every weight W_l of
    dimension > 1, ``v_l = γ·‖W_l‖·g_l/‖g_l‖``, g_l the gradient of the method's own training
    loss on a proxy copy of the model (their one SGD ascent step on the proxy; its lr cancels in
    the normalisation). The gradient taken at ``w + v`` then updates the saved ``w``: the
    perturbation is removed by copying ``w`` back before the optimizer step. Off for epochs
    <= ``warmup`` (their code: 0 for PGD-AT, 10 for TRADES; γ = 1e-2 for PGD-AT, 5e-3 for
    TRADES). Under DDP the bare module is perturbed (each rank from its own shard's gradient);
    the training gradients still average through the DDP forward.
    """

    def __init__(self, gamma, warmup=0):
        self.gamma = gamma
        self.warmup = warmup
        self.proxy = None

    def active(self, epoch):
        """AWP runs once more than ``warmup`` epochs are done (``epoch`` is 1-based)."""
        return self.gamma > 0 and epoch > self.warmup

    def perturbation(self, bare, loss_fn):
        """``{name: v_l}`` for the weights of dimension > 1 that the loss depends on."""
        if self.proxy is None:
            self.proxy = copy.deepcopy(bare)
        self.proxy.load_state_dict(bare.state_dict())
        self.proxy.train(bare.training)
        named = [(n, p) for n, p in self.proxy.named_parameters() if p.dim() > 1 and p.requires_grad]
        loss, _ = loss_fn(self.proxy)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        weights = dict(bare.named_parameters())
        return {name: self.gamma * weights[name].detach().norm() / (g.norm() + 1e-20) * g
                for (name, _), g in zip(named, grads) if g is not None}

    @contextmanager
    def perturbed(self, model, loss_fn, epoch):
        if not self.active(epoch):
            yield
            return
        bare = unwrap(model)
        perturbation = self.perturbation(bare, loss_fn)
        weights = dict(bare.named_parameters())
        saved = {name: weights[name].detach().clone() for name in perturbation}
        with torch.no_grad():
            for name, v in perturbation.items():
                weights[name].add_(v.to(weights[name].dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    weights[name].copy_(w)


class EMA(UpdatePlugin):
    """Exponential moving average of the weights: after every optimizer step
    ``ema = decay·ema + (1 − decay)·w`` for each floating-point parameter; buffers (BatchNorm
    statistics, counters) are copied as they are. Saved as ``payload["ema"] = {"decay", "updates",
    "state_dict"}`` (a full model state dict, which ``models.load_model`` uses by default)."""

    checkpoint_key = "ema"

    def __init__(self, model, decay):
        self.source = unwrap(model)
        self.decay = decay
        self.updates = 0
        self.state = self._copy_of_source()
        self.averaged = {name for name, p in self.source.named_parameters() if p.is_floating_point()}
        self.eval_model = None

    def _copy_of_source(self):
        return {k: v.detach().clone() for k, v in self.source.state_dict().items()}

    @torch.no_grad()
    def after_step(self, model):
        current = unwrap(model).state_dict()
        averaged = [name for name in current if name in self.averaged]
        ema = [self.state[name] for name in averaged]
        torch._foreach_mul_(ema, self.decay)  # one fused update of all parameters on GPUs
        torch._foreach_add_(ema, [current[name].detach() for name in averaged], alpha=1.0 - self.decay)
        for name, value in current.items():
            if name not in self.averaged:
                self.state[name].copy_(value)
        self.updates += 1

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "state_dict": self.state}

    def load_state_dict(self, state):
        """Take the saved average (bit for bit); without one the average starts from the current weights."""
        if state is None:
            self.state, self.updates = self._copy_of_source(), 0
            return
        for name, value in state["state_dict"].items():
            self.state[name].copy_(value)
        self.updates = int(state["updates"])

    def model(self, template):
        """A copy of ``template``'s bare module holding the averaged weights (for evaluation)."""
        if self.eval_model is None:
            self.eval_model = copy.deepcopy(unwrap(template))
        self.eval_model.load_state_dict(self.state)
        return self.eval_model


def build_update(optimizer, model, *, awp_gamma=0.0, awp_warmup=0, ema_decay=0.0):
    """The step's :class:`WeightUpdate` with AWP and/or EMA when their settings are non-zero."""
    plugins = []
    if awp_gamma > 0:
        plugins.append(AWP(awp_gamma, awp_warmup))
    if ema_decay > 0:
        plugins.append(EMA(model, ema_decay))
    return WeightUpdate(optimizer, plugins)
