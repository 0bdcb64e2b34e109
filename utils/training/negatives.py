"""Other-class examples (negatives, OEs) for ANC, one per anchor (docs/protocol.md §3, paper Eq. 5),
fully vectorised.

``choose_negatives`` picks, for each anchor, an index into the same batch; ``make_negatives``
also runs the targeted attack of the ``*_adv`` strategies. Anchors that have no example of
another class in the batch (a single-class batch) get ``valid = False`` and ANC skips them.
"""
from dataclasses import dataclass

import torch

from utils import recipe
from utils.attacks import attack_mode, pgd

BASE_STRATEGIES = ("random", "soft", "hard", "easy")
STRATEGIES = BASE_STRATEGIES + tuple(f"{s}_adv" for s in BASE_STRATEGIES)
WARMUP_EPOCHS = recipe.NEGATIVE_WARMUP_EPOCHS  # non-random strategies use `random` until then


@dataclass
class Negatives:
    """Negatives for a batch: images, their true labels, source indices and which anchors have one."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor


def check_strategy(strategy):
    """Raise a clear error for an unknown strategy name (the one check every caller uses)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown negative strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def effective_strategy(strategy, epoch=None):
    """The base rule used at ``epoch`` (1-based): non-random rules warm up with `random`."""
    check_strategy(strategy)
    base = strategy.removesuffix("_adv")
    if epoch is not None and epoch <= WARMUP_EPOCHS:
        return "random"
    return base


def _pick(scores, allowed):
    """Row-wise argmax of ``scores`` among ``allowed`` columns, and whether any was allowed."""
    masked = scores.masked_fill(~allowed, float("-inf"))
    return masked.argmax(1), allowed.any(1)


def negative_scores(n, num_classes, device, generator=None):
    """The random rule's two draws for a batch of ``n``: U[0, 1) class scores (n×C), then example
    scores (n×n), in that order (:func:`random_negatives` draws them so when not given them)."""
    return (torch.rand((n, num_classes), generator=generator, device=device),
            torch.rand((n, n), generator=generator, device=device))


def random_negatives(y, num_classes, generator=None, scores=None):
    """For each anchor: a class ≠ y_i uniformly among the classes present, then a uniformly
    random example of that class. Returns ``(index, valid)``. ``scores`` replaces the draws of
    :func:`negative_scores` (the compiled training step draws them outside the compiled region)."""
    n = y.shape[0]
    present = torch.zeros(num_classes, dtype=torch.bool, device=y.device)
    present[y] = True
    classes = torch.arange(num_classes, device=y.device)
    allowed_class = present[None, :] & (classes[None, :] != y[:, None])
    class_scores, example_scores = negative_scores(n, num_classes, y.device, generator) if scores is None else scores
    chosen_class, valid = _pick(class_scores, allowed_class)
    index, _ = _pick(example_scores, y[None, :] == chosen_class[:, None])
    return torch.where(valid, index, torch.arange(n, device=y.device)), valid


def candidate_mask(strategy, y, pred):
    """N×N matrix: may example j serve as anchor i's negative under ``strategy`` (soft/hard/easy)."""
    anchor_pred, anchor_label, cand_pred = pred[:, None], y[:, None], pred[None, :]
    if strategy == "soft":
        allowed = cand_pred == anchor_pred
    elif strategy == "hard":
        allowed = cand_pred == anchor_label
    elif strategy == "easy":
        allowed = (cand_pred != anchor_label) & (cand_pred != anchor_pred)
    else:
        raise ValueError(f"no candidate rule for {strategy!r}")
    return allowed & (y[None, :] != anchor_label)


def choose_negatives(strategy, y, num_classes, logits=None, generator=None, scores=None):
    """Indices of each anchor's negative for a base strategy. Non-random rules need the batch's
    eval-mode ``logits``: among the allowed candidates take the one with the largest logit for
    the anchor's label, falling back to `random` where no candidate is left."""
    index, valid = random_negatives(y, num_classes, generator, scores)
    if strategy == "random":
        return index, valid
    if logits is None:
        raise ValueError(f"strategy {strategy!r} needs the batch's eval-mode logits")
    allowed = candidate_mask(strategy, y, logits.argmax(1))
    scores = logits[:, y].t().float()  # scores[i, j] = logit of example j for class y_i
    picked, has_candidate = _pick(scores, allowed)
    return torch.where(has_candidate, picked, index), valid


def selection_logits(base, model, x):
    """The eval-mode logits a non-random rule ranks by (None for `random`); ``model`` already in
    :func:`~utils.attacks.attack_mode`."""
    if base == "random":
        return None
    with torch.no_grad():
        return model(x)


def select_negatives(strategy, model, x, y, num_classes, *, epoch=None, generator=None, scores=None):
    """``(index, valid)`` of each anchor's negative under ``strategy`` at ``epoch``; the
    selection logits of non-random rules come from an eval-mode forward."""
    base = effective_strategy(strategy, epoch)
    with attack_mode(model):
        logits = selection_logits(base, model, x)
    return choose_negatives(base, y, num_classes, logits, generator, scores)


def make_negatives(strategy, model, x, y, num_classes, *, epoch=None, eps=recipe.EPS, step_size=recipe.STEP_SIZE,
                   steps=recipe.TRAIN_ATTACK_STEPS, aux_weight=0.0, generator=None):
    """Select (and for ``*_adv`` strategies, attack toward the anchor's label) one negative per
    anchor. Selection logits and the attack use eval mode; ``y`` of the negative stays its
    true label."""
    index, valid = select_negatives(strategy, model, x, y, num_classes, epoch=epoch, generator=generator)
    x_neg, y_neg = x[index], y[index]
    if strategy.endswith("_adv"):
        x_neg = pgd(model, x_neg, y, eps, step_size, steps, loss="ce", targeted=True, init="normal",
                    aux_weight=aux_weight, generator=generator)
    return Negatives(x_neg, y_neg, index, valid)
