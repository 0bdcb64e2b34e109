"""L∞ PGD (docs/protocol.md §2): untargeted / targeted, CE / C&W-margin / TRADES-KL / DLR objectives,
with or without the RA heads; FGSM and C&W∞ are presets of it (utils/evaluation/catalogue.py).

Every attack runs the model in eval mode inside :func:`attack_mode`, takes gradients with
respect to the input only, and returns images inside the ε-ball around ``x`` and in [0, 1].
"""
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F

from utils import recipe

EPS = recipe.EPS
INITS = ("none", "normal", "uniform")
LOSSES = ("ce", "cw", "cw-batchsum", "kl", "dlr", "margin")


@contextmanager
def attack_mode(model):
    """Eval mode and frozen parameters for the duration of an attack; both restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _other_max(logits, y):
    """max_{j≠y} logits_j per row."""
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


def per_example_loss(name, logits, y, clean_probs=None):
    """Loss each example's attack ascends (untargeted) or descends (targeted, y = target).

    ``ce``: cross-entropy; ``cw``: −relu(z_y − max_{j≠y} z_j) per example (the paper protocol's
    C&W∞); ``cw-batchsum``: −relu(Σ_batch (z_y − max_{j≠y} z_j)), the reference evaluation
    script's form, spread evenly over the rows so that ``.sum()`` gives it (its gradient vanishes
    for every example once the summed margin is negative; reproduction only, docs/protocol.md §2);
    ``margin``: max_{j≠y} z_j − z_y (un-clipped margin); ``kl``: KL(clean ‖ adv) as in TRADES;
    ``dlr``: −(z_y − max_{j≠y} z_j)/(z_π1 − z_π3) (Croce & Hein).
    """
    if name == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if name == "cw":
        return -F.relu(logits.gather(1, y[:, None])[:, 0] - _other_max(logits, y))
    if name == "cw-batchsum":
        total = F.relu((logits.gather(1, y[:, None])[:, 0] - _other_max(logits, y)).sum())
        return (-total / logits.shape[0]).expand(logits.shape[0])
    if name == "margin":
        return _other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]
    if name == "kl":
        if clean_probs is None:
            raise ValueError("the 'kl' attack loss needs the clean probabilities")
        logp = F.log_softmax(logits.float(), dim=1)
        return (clean_probs * (clean_probs.clamp_min(1e-12).log() - logp)).sum(1)
    if name == "dlr":
        top = logits.sort(1, descending=True).values
        gap = (top[:, 0] - top[:, 2]).clamp_min(1e-12)
        return -(logits.gather(1, y[:, None])[:, 0] - _other_max(logits, y)) / gap
    raise ValueError(f"unknown attack loss {name!r}; choose one of {', '.join(LOSSES)}")


def attack_objective(model, x, y, loss="ce", aux_weight=0.0, clean=None):
    """Per-example objective on the final logits, plus ``aux_weight``·mean_k on the RA heads
    ("with p" protocol). Returns ``(objective, final logits)``. ``clean`` holds per-head clean
    probabilities for the KL loss."""
    if aux_weight:
        logits, aux = model(x, return_aux=True)
    else:
        logits, aux = model(x), []
    final_clean = clean[0] if clean is not None else None
    obj = per_example_loss(loss, logits, y, final_clean)
    if aux_weight and aux:
        heads = [per_example_loss(loss, p, y, clean[k + 1] if clean is not None else None) for k, p in enumerate(aux)]
        obj = obj + aux_weight * torch.stack(heads).mean(0)
    return obj, logits


def _clean_probs(model, x, aux_weight):
    """Clean probabilities of the final and auxiliary heads, for the KL loss."""
    with torch.no_grad():
        if aux_weight:
            logits, aux = model(x, return_aux=True)
            return [F.softmax(o.float(), 1) for o in [logits, *aux]]
        return [F.softmax(model(x).float(), 1)]


def random_start(x, eps, init, generator=None, uniform=None, normal=None):
    """PGD's starting point: ``x`` itself, x + 0.001·N(0,1) or x + U(−ε, ε), clipped to [0, 1].

    ``uniform`` (a U[0, 1) draw shaped like ``x``) replaces the ``uniform`` start's own draw, so
    a caller can fix each example's noise whatever batch it lands in; ``normal`` (a N(0, 1) draw
    shaped like ``x``) does the same for the ``normal`` start (the compiled training step draws
    its random numbers outside the compiled region)."""
    if init == "none":
        return x.clone()
    if init == "normal":
        if normal is None:
            normal = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = recipe.START_NOISE * normal
    elif init == "uniform":
        if uniform is None:
            uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = (uniform.to(x.dtype) * 2 - 1) * eps
    else:
        raise ValueError(f"unknown PGD init {init!r}; choose one of {', '.join(INITS)}")
    return (x + noise).clamp(0, 1)


def _rows(mask):
    """Per-example bool mask shaped to broadcast over N×C×H×W."""
    return mask.view(-1, 1, 1, 1)


def _success(logits, y, targeted):
    pred = logits.argmax(1)
    return torch.where(targeted, pred == y, pred != y)


def _compiling():
    """Whether torch.compile is tracing the caller (torch >= 2.3: torch.compiler.is_compiling)."""
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return check()


def input_gradient(model, x_adv, y, loss="ce", aux_weight=0.0, clean=None):
    """``(∇_x Σ objective, objective, final logits)`` at ``x_adv`` (model in :func:`attack_mode`).
    Eager code uses ``torch.autograd.grad``; under torch.compile the same gradient comes from
    ``torch.func.grad``, which the compiler traces into the graph (``autograd.grad`` would break it)."""
    if _compiling():
        def total(point):
            obj, logits = attack_objective(model, point, y, loss, aux_weight, clean)
            return obj.sum(), (obj.detach(), logits.detach())
        grad, (obj, logits) = torch.func.grad(total, has_aux=True)(x_adv)
        return grad, obj, logits
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        obj, logits = attack_objective(model, x_adv, y, loss, aux_weight, clean)
        grad, = torch.autograd.grad(obj.sum(), x_adv)
    return grad, obj.detach(), logits.detach()


def _targeted_mask(targeted, x):
    """A bool or per-example mask as a bool tensor of x's batch size on x's device."""
    if not torch.is_tensor(targeted):  # a fill, not a host-to-device copy
        targeted = torch.full((x.shape[0],), bool(targeted), dtype=torch.bool, device=x.device)
    return targeted.to(device=x.device, dtype=torch.bool).expand(x.shape[0])


def pgd_steps(model, x, y, start, eps, step_size, steps, *, loss="ce", targeted=False, aux_weight=0.0, track=False,
              record=None):
    """The one PGD loop (training, evaluation and the compiled step run it): ``steps`` iterations
    ``x ← clamp(x ± step·sign ∇ Σ objective, B(x, ε) ∩ [0, 1])`` from ``start``, ascending for
    untargeted rows and descending toward ``y`` for targeted ones (``targeted``: a bool or a
    per-example mask), with the model already in :func:`attack_mode`. No RNG and no host
    synchronisation, so torch.compile traces it whole.

    Returns ``(last iterate, found, found_x)``. With ``track``, ``found`` marks the examples whose
    model was fooled (or reached the target) at some iterate and ``found_x`` holds the first such
    iterate; without it ``found`` is all False and ``found_x`` is the start. ``record``, when given,
    is called as ``record(step, x_adv, objective, logits, grad)`` at every iterate before the step
    is taken, with detached tensors; it only observes.
    """
    targeted = _targeted_mask(targeted, x)
    x = x.detach()
    low, high = (x - eps).clamp_min(0), (x + eps).clamp_max(1)
    step = torch.where(targeted, -step_size, step_size).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    clean = _clean_probs(model, x, aux_weight) if loss == "kl" else None
    x_adv = start.detach()
    found, found_x = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device), x_adv
    for index in range(steps):
        grad, obj, logits = input_gradient(model, x_adv, y, loss, aux_weight, clean)
        x_adv = x_adv.detach()
        if record is not None:
            record(index, x_adv, obj, logits, grad)
        if track:
            hit = _success(logits, y, targeted) & ~found
            found_x = torch.where(_rows(hit), x_adv, found_x)
            found = found | hit
        x_adv = torch.clamp(x_adv.addcmul(step, grad.sign()), low, high)
    return x_adv.detach(), found, found_x


def pgd(model, x, y, eps=EPS, step_size=recipe.STEP_SIZE, steps=recipe.TRAIN_ATTACK_STEPS, *, loss="ce", targeted=False,
        init="normal", restarts=1, aux_weight=0.0, keep="last", generator=None, start=None, record=None):
    """L∞ PGD (:func:`pgd_steps`) from a random start, in :func:`attack_mode`.

    ``targeted`` may be a bool or a per-example bool tensor. ``keep="last"`` returns the last
    iterate (the paper's protocol); ``keep="success"`` returns, per example, the first iterate that
    fooled the model (or reached the target), which can only lower robust accuracy. With
    ``restarts > 1`` an example keeps the first restart that succeeded. ``start`` replaces the
    random start (one restart only), so callers can draw several starts in a fixed RNG order.
    FGSM is one step of size ε from ``init="none"``; the paper's C&W∞ is ``loss="cw"`` from a
    uniform start (the attack catalogue, utils/evaluation/catalogue.py).

    ``record`` (optional) is called as ``record(restart, step, x_adv, objective, logits, grad)``
    at every iterate: the per-iterate trace the indicators of attack failure read
    (utils/evaluation/indicators.py). It only observes: the returned point is the same without it.
    """
    if keep not in ("last", "success"):
        raise ValueError(f"keep must be 'last' or 'success', got {keep!r}")
    if start is not None and restarts != 1:
        raise ValueError("an explicit PGD start allows only one restart")
    targeted = _targeted_mask(targeted, x)
    x = x.detach()
    with attack_mode(model):
        best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(restarts):
            begin = random_start(x, eps, init, generator) if start is None else start
            observe = None if record is None else partial(record, restart)
            x_adv, found, found_x = pgd_steps(model, x, y, begin, eps, step_size, steps, loss=loss, targeted=targeted,
                                              aux_weight=aux_weight, track=keep == "success", record=observe)
            if keep == "success" or restarts > 1:
                with torch.no_grad():
                    hit = _success(model(x_adv), y, targeted) & ~found
                found_x = torch.where(_rows(hit), x_adv, found_x)
                found = found | hit
                if keep == "success":
                    x_adv = torch.where(_rows(found), found_x, x_adv)
            best = torch.where(_rows(~done), x_adv, best)
            done = done | found  # every restart runs: no host sync to test whether all are done
    return best.detach()
