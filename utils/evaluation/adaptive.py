"""Adaptive attacks on reverse-attention models (docs/protocol.md §8): attacks that see through
the argmax that picks each RA mask, plus the black-box Square attack.

Each attack differentiates a *surrogate* view of the model (one auxiliary head, a logit
ensemble, the straight-through / fixed / identity mask policy, the label-mask path) but is
always judged on the **real** model: an example counts as broken when the real model
misclassifies any point the attack queried (or the point it returns). Every attack has the one
signature ``attack(model, x, y, ctx, **params) -> Outcome`` (``ctx``: :class:`AttackContext`).
"""
import torch
from torch import nn

from models import ra_policy
from utils.attacks import attack_mode, pgd, random_start
from utils.evaluation.autoattack_adapter import run_apgd, run_square
from utils.evaluation.context import full_precision
from utils.evaluation.results import Outcome

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
    """Passes queries to ``surrogate`` and marks every example the real model misclassifies at a
    full-batch query, so the best iterate counts even when the attack returns another one.

    With ``real=None`` the surrogate *is* the real model and its own logits are used. With
    ``verify`` (queries under bf16 autocast) a misclassification only nominates the query as a
    candidate; :meth:`fooled` re-judges the latest candidate of each example in fp32, so a
    rounding error can never count as a break (the figure stays an upper bound).
    """

    def __init__(self, surrogate, y, real=None, verify=False):
        super().__init__()
        self.surrogate, self.real, self.y, self.verify = surrogate, real, y, verify
        self.hit = torch.zeros_like(y, dtype=torch.bool)
        self.candidate = None

    def forward(self, x, *args, **kwargs):
        out = self.surrogate(x, *args, **kwargs)
        if x.shape[0] == self.y.shape[0]:  # APGD/Square query subsets; those are judged on their output
            logits = out[0] if isinstance(out, tuple) else out
            if self.real is not None:
                with torch.no_grad():
                    logits = self.real(x)
            hit = logits.detach().argmax(1) != self.y
            if self.verify:
                base = x.detach() if self.candidate is None else self.candidate
                self.candidate = torch.where(hit.view(-1, *([1] * (x.dim() - 1))), x.detach(), base)
            self.hit = self.hit | hit
        return out

    def fooled(self, model):
        """Examples the real model misclassifies (in fp32 when verifying) at a recorded query."""
        if not self.verify or self.candidate is None:
            return self.hit
        return self.hit & ~still_correct(model, self.candidate, self.y)


@torch.no_grad()
def still_correct(model, x_adv, y):
    """Real model's fp32 prediction on ``x_adv`` equals ``y`` (eval mode, autocast off)."""
    with attack_mode(model), full_precision(x_adv.device):
        return model(x_adv.float()).argmax(1) == y


def pgd_judged_on_model(model, surrogate, x, y, ctx, *, eps, steps, step_size, loss="ce", aux_weight=0.0,
                        target=None, init="uniform", restarts=1, draw=0):
    """PGD on ``surrogate`` — toward ``target`` when given — judged on ``model`` at every
    iterate; returns ``(correct at every iterate, correct at the last iterate of the first
    restart)``. Restart r starts from the example's own noise draw ``draw + r``."""
    goal = y if target is None else target
    correct, last = torch.ones_like(y, dtype=torch.bool), None
    for restart in range(restarts):
        recorder = RealModelRecorder(surrogate, y, real=None if surrogate is model else model, verify=ctx.bf16)
        start = random_start(x, eps, init, uniform=ctx.uniform(x, draw + restart) if init == "uniform" else None)
        with ctx.precision(x.device):
            x_adv = pgd(recorder, x, goal, eps, step_size, steps, loss=loss, targeted=target is not None,
                        aux_weight=aux_weight, keep="last", start=start)
        still = still_correct(model, x_adv, y)
        last = still if last is None else last
        correct &= still & ~recorder.fooled(model)
    return correct, last


# ---------------------------------------------------------------- the attacks

def head_pgd(model, x, y, ctx, *, head, eps, steps, step_size, loss="ce"):
    """PGD on auxiliary head ``head`` alone."""
    correct, _ = pgd_judged_on_model(model, HeadView(model, head), x, y, ctx, eps=eps, steps=steps,
                                     step_size=step_size, loss=loss)
    return Outcome(correct)


def apgd_on(model, surrogate, x, y, ctx, *, eps, loss, n_iter):
    """APGD (AutoAttack package, fp32) on ``surrogate``'s logits, judged on the real model."""
    recorder = RealModelRecorder(surrogate, y, real=None if surrogate is model else model)
    with attack_mode(model):
        x_adv, warnings = run_apgd(recorder, x, y, eps, loss=loss, n_iter=n_iter, seed=ctx.seed)
    return Outcome(still_correct(model, x_adv, y) & ~recorder.fooled(model), warnings=warnings)


def head_apgd(model, x, y, ctx, *, head, eps, loss, n_iter):
    """APGD-CE / APGD-DLR on auxiliary head ``head`` alone."""
    return apgd_on(model, HeadView(model, head), x, y, ctx, eps=eps, loss=loss, n_iter=n_iter)


def joint_pgd(model, x, y, ctx, *, weight, eps, steps, step_size, loss="ce"):
    """PGD on the joint loss ``L(final) + weight · mean_k L(p_k)``."""
    correct, _ = pgd_judged_on_model(model, model, x, y, ctx, eps=eps, steps=steps, step_size=step_size, loss=loss,
                                     aux_weight=weight)
    return Outcome(correct)


def ensemble_apgd(model, x, y, ctx, *, weight, eps, loss, n_iter):
    """APGD on the logit ensemble ``final + weight · mean_k aux_k``."""
    return apgd_on(model, EnsembleView(model, weight), x, y, ctx, eps=eps, loss=loss, n_iter=n_iter)


def straight_through_pgd(model, x, y, ctx, *, tau, eps, steps, step_size, loss="ce"):
    """PGD on the final logits, forward with the argmax masks, backward through softmax(p_k/τ)·Ω."""
    view = PolicyView(model, "straight_through", tau)
    correct, _ = pgd_judged_on_model(model, view, x, y, ctx, eps=eps, steps=steps, step_size=step_size, loss=loss)
    return Outcome(correct)


def straight_through_apgd(model, x, y, ctx, *, tau, eps, loss, n_iter):
    """APGD through the straight-through masks."""
    return apgd_on(model, PolicyView(model, "straight_through", tau), x, y, ctx, eps=eps, loss=loss, n_iter=n_iter)


@torch.no_grad()
def candidate_classes(model, x, y, top_k):
    """Per example, the ``top_k`` classes other than ``y`` ranked by the summed softmax of the
    final and auxiliary heads on the clean input (N × top_k)."""
    with attack_mode(model), full_precision(x.device):
        logits, aux = model(x, return_aux=True)
    score = sum(torch.softmax(out.float(), 1) for out in [logits, *aux])
    score = score.scatter(1, y[:, None], float("-inf"))
    return score.topk(min(top_k, score.shape[1] - 1), dim=1).indices


def mask_enumeration(model, x, y, ctx, *, top_k, eps, steps, step_size, aux_weight):
    """For each candidate class t: fix every RA mask to Ω[t] and run a targeted margin PGD toward
    t (on the final logits plus ``aux_weight`` · mean over the heads); an example is broken when
    the real model's prediction on any iterate differs from y."""
    correct = torch.ones_like(y, dtype=torch.bool)
    for rank, targets in enumerate(candidate_classes(model, x, y, top_k).unbind(1)):
        view = PolicyView(model, "fixed", classes=targets)
        still, _ = pgd_judged_on_model(model, view, x, y, ctx, eps=eps, steps=steps, step_size=step_size,
                                       loss="margin", aux_weight=aux_weight, target=targets, draw=rank)
        correct &= still
    return Outcome(correct)


def transfer_label_mask(model, x, y, ctx, *, eps, steps, step_size):
    """PGD-CE on the label-mask path ``model(x, y)``, evaluated on the real model."""
    correct, _ = pgd_judged_on_model(model, LabelMaskView(model, y), x, y, ctx, eps=eps, steps=steps,
                                     step_size=step_size)
    return Outcome(correct)


def transfer_without_ra(model, x, y, ctx, *, eps, steps, step_size):
    """PGD-CE on the model with RA removed (masks of ones), evaluated on the real model."""
    correct, _ = pgd_judged_on_model(model, PolicyView(model, "identity"), x, y, ctx, eps=eps, steps=steps,
                                     step_size=step_size)
    return Outcome(correct)


def square(model, x, y, ctx, *, eps, n_queries):
    """Black-box Square attack (margin loss, AutoAttack package, fp32) on the real model's logits."""
    with attack_mode(model):
        x_adv, warnings = run_square(model, x, y, eps, n_queries=n_queries, seed=ctx.seed)
    return Outcome(still_correct(model, x_adv, y), warnings=warnings)
