"""Adaptive attacks on reverse-attention models (SPEC §8): attacks that see through the argmax
that picks each RA mask, plus the black-box Square attack.

Each attack differentiates a *surrogate* view of the model (one auxiliary head, a logit
ensemble, the straight-through / fixed / identity mask policy, the label-mask path) but is
always judged on the **real** model: an example counts as broken when the real model
misclassifies any point the attack queried (or the point it returns). Every function returns a
bool tensor "still correct on the real model" and the AutoAttack package's warnings, if any.
"""
import torch
import torch.nn as nn

from models import ra_policy
from utils.attacks import attack_mode, pgd
from utils.evaluation.autoattack_adapter import run_apgd, run_square


# ---------------------------------------------------------------- surrogate views of an RA model

class HeadView(nn.Module):
    """Logits of auxiliary head ``head`` only (so APGD/PGD attack that head alone)."""

    def __init__(self, model, head):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x):
        return self.model(x, return_aux=True)[1][self.head]

    def extra_repr(self):
        return f"head={self.head}"


class EnsembleView(nn.Module):
    """Logits ``final + weight · mean_k aux_k``: a single-logit surrogate of the joint ("with p")
    objective, for attacks such as APGD and AutoAttack that only take a logits function."""

    def __init__(self, model, weight):
        super().__init__()
        self.model, self.weight = model, weight

    def forward(self, x):
        logits, aux = self.model(x, return_aux=True)
        return logits + self.weight * torch.stack(aux).mean(0)


class PolicyView(nn.Module):
    """The model with its RA masks chosen by another policy (``ra_policy``) during this forward
    only, so the real model elsewhere keeps its argmax masks."""

    def __init__(self, model, kind, tau=1.0, classes=None):
        super().__init__()
        self.model, self.kind, self.tau, self.classes = model, kind, tau, classes

    def forward(self, x, return_aux=False):
        with ra_policy(self.model, self.kind, self.classes, self.tau):
            return self.model(x, return_aux=return_aux)


class LabelMaskView(nn.Module):
    """The training-mode mask path ``model(x, labels)`` (label-selected masks; BatchNorm as set)."""

    def __init__(self, model, labels):
        super().__init__()
        self.model, self.labels = model, labels

    def forward(self, x, return_aux=False):
        return self.model(x, self.labels, return_aux=return_aux)


class RealModelRecorder(nn.Module):
    """Passes queries to ``surrogate`` and marks every example the real model misclassifies at
    that query, so the best iterate counts even when the attack returns another one.

    With ``real=None`` the surrogate *is* the real model and its own logits are used.
    """

    def __init__(self, surrogate, y, real=None):
        super().__init__()
        self.surrogate, self.real, self.y = surrogate, real, y
        self.fooled = torch.zeros_like(y, dtype=torch.bool)

    def forward(self, x, *args, **kwargs):
        out = self.surrogate(x, *args, **kwargs)
        if x.shape[0] == self.y.shape[0]:  # APGD/Square query subsets; those are judged on their output
            logits = out[0] if isinstance(out, tuple) else out
            if self.real is not None:
                with torch.no_grad():
                    logits = self.real(x)
            self.fooled |= logits.detach().argmax(1) != self.y
        return out


@torch.no_grad()
def still_correct(model, x_adv, y):
    """Real model's prediction on ``x_adv`` equals ``y`` (eval mode)."""
    with attack_mode(model):
        return model(x_adv).argmax(1) == y


def pgd_judged_on_model(model, surrogate, x, y, *, eps, steps, step_size, loss="ce", aux_weight=0.0,
                        target=None, init="uniform", restarts=1, generator=None):
    """PGD on ``surrogate`` — toward ``target`` when given — judged on ``model`` at every
    iterate; returns ``(correct at every iterate, correct at the last iterate)``."""
    recorder = RealModelRecorder(surrogate, y, real=None if surrogate is model else model)
    goal = y if target is None else target
    x_adv = pgd(recorder, x, goal, eps, step_size, steps, loss=loss, targeted=target is not None, init=init,
                restarts=restarts, aux_weight=aux_weight, keep="last", generator=generator)
    last = still_correct(model, x_adv, y)
    return last & ~recorder.fooled, last


# ---------------------------------------------------------------- the attacks

def head_pgd(model, x, y, *, head, eps, steps, step_size, loss="ce", generator=None):
    """PGD on auxiliary head ``head`` alone."""
    correct, _ = pgd_judged_on_model(model, HeadView(model, head), x, y, eps=eps, steps=steps, step_size=step_size,
                                     loss=loss, generator=generator)
    return correct, []


def apgd_on(model, surrogate, x, y, *, eps, loss, n_iter, seed):
    """APGD (AutoAttack package) on ``surrogate``'s logits, judged on the real model."""
    recorder = RealModelRecorder(surrogate, y, real=None if surrogate is model else model)
    with attack_mode(model):
        x_adv, warnings = run_apgd(recorder, x, y, eps, loss=loss, n_iter=n_iter, seed=seed)
    return still_correct(model, x_adv, y) & ~recorder.fooled, warnings


def head_apgd(model, x, y, *, head, eps, loss, n_iter, seed):
    """APGD-CE / APGD-DLR on auxiliary head ``head`` alone."""
    return apgd_on(model, HeadView(model, head), x, y, eps=eps, loss=loss, n_iter=n_iter, seed=seed)


def joint_pgd(model, x, y, *, weight, eps, steps, step_size, loss="ce", generator=None):
    """PGD on the joint loss ``L(final) + weight · mean_k L(p_k)``."""
    correct, _ = pgd_judged_on_model(model, model, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss,
                                     aux_weight=weight, generator=generator)
    return correct, []


def ensemble_apgd(model, x, y, *, weight, eps, loss, n_iter, seed):
    """APGD on the logit ensemble ``final + weight · mean_k aux_k``."""
    return apgd_on(model, EnsembleView(model, weight), x, y, eps=eps, loss=loss, n_iter=n_iter, seed=seed)


def straight_through_pgd(model, x, y, *, tau, eps, steps, step_size, loss="ce", generator=None):
    """PGD on the final logits, forward with the argmax masks, backward through softmax(p_k/τ)·Ω."""
    view = PolicyView(model, "straight_through", tau)
    correct, _ = pgd_judged_on_model(model, view, x, y, eps=eps, steps=steps, step_size=step_size, loss=loss,
                                     generator=generator)
    return correct, []


def straight_through_apgd(model, x, y, *, tau, eps, loss, n_iter, seed):
    """APGD through the straight-through masks."""
    return apgd_on(model, PolicyView(model, "straight_through", tau), x, y, eps=eps, loss=loss, n_iter=n_iter,
                   seed=seed)


@torch.no_grad()
def candidate_classes(model, x, y, top_k):
    """Per example, the ``top_k`` classes other than ``y`` ranked by the summed softmax of the
    final and auxiliary heads on the clean input (N × top_k)."""
    with attack_mode(model):
        logits, aux = model(x, return_aux=True)
    score = sum(torch.softmax(out.float(), 1) for out in [logits, *aux])
    score = score.scatter(1, y[:, None], float("-inf"))
    return score.topk(min(top_k, score.shape[1] - 1), dim=1).indices


def mask_enumeration(model, x, y, *, top_k, eps, steps, step_size, aux_weight, generator=None):
    """For each candidate class t: fix every RA mask to Ω[t] and run a targeted margin PGD toward
    t (on the final logits plus ``aux_weight`` · mean over the heads); an example is broken when
    the real model's prediction on any iterate differs from y."""
    correct = torch.ones_like(y, dtype=torch.bool)
    for targets in candidate_classes(model, x, y, top_k).unbind(1):
        view = PolicyView(model, "fixed", classes=targets)
        still, _ = pgd_judged_on_model(model, view, x, y, eps=eps, steps=steps, step_size=step_size, loss="margin",
                                       aux_weight=aux_weight, target=targets, generator=generator)
        correct &= still
    return correct, []


def transfer_label_mask(model, x, y, *, eps, steps, step_size, generator=None):
    """PGD-CE on the label-mask path ``model(x, y)``, evaluated on the real model."""
    correct, _ = pgd_judged_on_model(model, LabelMaskView(model, y), x, y, eps=eps, steps=steps,
                                     step_size=step_size, generator=generator)
    return correct, []


def transfer_without_ra(model, x, y, *, eps, steps, step_size, generator=None):
    """PGD-CE on the model with RA removed (masks of ones), evaluated on the real model."""
    correct, _ = pgd_judged_on_model(model, PolicyView(model, "identity"), x, y, eps=eps, steps=steps,
                                     step_size=step_size, generator=generator)
    return correct, []


def square(model, x, y, *, eps, n_queries, seed):
    """Black-box Square attack (margin loss) on the real model's logits."""
    with attack_mode(model):
        x_adv, warnings = run_square(model, x, y, eps, n_queries=n_queries, seed=seed)
    return still_correct(model, x_adv, y), warnings
