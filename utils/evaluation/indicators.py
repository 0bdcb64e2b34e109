"""Indicators of attack failure (Pintor et al., "Indicators of Attack Failure: Debugging and Improving
Optimization of Adversarial Examples", NeurIPS 2022), computed per attack of our own PGD and per
model, and reported beside the sanity checks. docs/evaluation.md ("Indicators of attack failure") says what each one means and
what to do when it fires.

Per attack (read off the per-iterate trace our PGD hands to its ``record`` hook, re-running the
attack from the same per-example start as the evaluation, in fp32, on the first clean-correct
examples; the PGDs whose iterates the real model classifies: paper, sanity, joint and
straight-through): silent success, incomplete optimisation, unavailable gradients. Per model: unstable
predictions, batch dependence. Each returns the sanity checks' dict ``{"name", "status", "numbers",
"message"}`` plus ``"attack"`` and ``"doc"`` (the docs/ anchor).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from utils.attacks import attack_mode, pgd, random_start
from utils.evaluation.adaptive import PolicyView
from utils.evaluation.context import AttackContext, full_precision
from utils.evaluation.runner import attack_seed
from utils.evaluation.stats import BINOMIAL_TEST, above_rate, binomial_upper_tail

DOC = "docs/evaluation.md"
TAIL_FRACTION = 0.1           # "the last 10 % of steps"
RISE_TOLERANCE = 0.01         # a best-so-far loss rise above 1 % (relative, floor 0.01) counts as still rising
INCOMPLETE_SHARE = 0.1        # FLAG when more than 10 % of the unbroken examples still rise (beyond noise)
TOLERATED_SHARE = 0.005       # the other indicators FLAG when their share is beyond 0.5 % (beyond noise)
NOISE_FRACTION = 0.1          # unstable predictions: uniform noise of radius ε/10
NOISE_DRAWS = 4
MEANINGS = {
    "silent success": "an iterate broke the example but the point the attack returns does not",
    "incomplete optimisation": "the loss still rises over the last 10 % of steps: more steps would break more",
    "unavailable gradients": "zero, NaN or infinite input gradients at the start point: the attack cannot move",
    "unstable predictions": "the prediction changes under small random noise inside the ε-ball",
    "batch dependence": "predictions depend on the batch size or order (BatchNorm in train mode, leakage)",
}


def _anchor(name):
    return f"{DOC}#{name.replace(' ', '-')}"


def _indicator(name, attack, status, numbers, message, evidence=None):
    """One indicator's record; ``evidence`` ``(count, n, share)``: the exact test behind its status,
    named in the message of a FLAG (and its p-value kept in ``numbers``)."""
    if evidence is not None and evidence[1] > 0:
        count, n, share = evidence
        p_value = binomial_upper_tail(count, n, share)
        numbers = dict(numbers, p_value=p_value, tolerated_share=share)
        if status == "FLAG" and noticeable(count, n, share):
            message += (f" FLAG: the share is above {100 * share:g} % beyond noise ({BINOMIAL_TEST}, "
                        f"p = {p_value:.2g}).")
    return {"name": name, "attack": attack, "status": status, "numbers": numbers, "message": message,
            "meaning": MEANINGS[name], "doc": _anchor(name)}


def noticeable(count, n, share=TOLERATED_SHARE):
    """``count`` of ``n`` examples is evidence that the indicator's true share exceeds ``share``: an
    exact one-sided binomial test at level 0.05 (stats.above_rate), so that a few examples of noise
    at small n raise no FLAG."""
    return above_rate(count, n, share)


# ---------------------------------------------------------------- the per-iterate trace

class PGDTrace:
    """``record`` hook of :func:`utils.attacks.pgd`: the objective and whether the model was fooled
    at every iterate of the first restart, and the input gradient at the start point."""

    def __init__(self, y):
        self.y = y
        self.losses, self.fooled = [], []
        self.start_grad = None

    def __call__(self, restart, step, x_adv, objective, logits, grad):
        if restart:
            return
        if step == 0:
            self.start_grad = grad.detach().flatten(1).float()
        self.losses.append(objective.detach().float())
        self.fooled.append(logits.detach().argmax(1) != self.y)

    def loss_matrix(self):
        """Steps × examples objective (ascended by the attack)."""
        return torch.stack(self.losses) if self.losses else torch.zeros(0, self.y.shape[0])

    def fooled_any(self):
        return torch.stack(self.fooled).any(0) if self.fooled else torch.zeros_like(self.y, dtype=torch.bool)


# ---------------------------------------------------------------- pure rules (tested on hand tensors)

def silent_successes(fooled_any, returned_correct):
    """Examples some iterate fooled while the returned point is still classified correctly."""
    return fooled_any & returned_correct


def still_rising(losses, tail=TAIL_FRACTION, rel=RISE_TOLERANCE):
    """Per example: the best-so-far loss gained more than ``rel`` (relative, floor 0.01 absolute)
    during the last ``tail`` share of the steps. ``losses`` is steps × examples; fewer than 10
    steps give all False (nothing to compare)."""
    steps = losses.shape[0]
    if steps < 10:
        return torch.zeros(losses.shape[1], dtype=torch.bool)
    window = max(1, math.ceil(tail * steps))
    best = losses.cummax(0).values
    before, after = best[steps - window - 1], best[-1]
    return (after - before) > rel * before.abs().clamp_min(1.0)


def bad_gradients(grad):
    """Per example (rows of a flattened gradient): every entry zero, or any entry NaN / infinite."""
    return (grad == 0).all(1) | ~torch.isfinite(grad).all(1)


# ---------------------------------------------------------------- per attack

def pgd_target(spec, model):
    """``(module our PGD differentiates, aux weight)`` for the attacks whose forward logits are the
    real model's — the paper and sanity PGDs, the joint PGDs, the straight-through PGDs — else None
    (a head, a transfer surrogate or fixed masks: their iterates are not the model's predictions)."""
    p = spec.params
    if "steps" not in p or spec.needs_autoattack:
        return None
    if spec.family in ("paper", "sanity") and "loss" in p:
        return model, p.get("aux_weight", 0.0)
    if spec.family == "joint":
        return model, p["weight"]
    if spec.family == "straight-through":
        return PolicyView(model, "straight_through", p["tau"]), 0.0
    return None


def traced_pgd(model, spec, x, y, index, seed):
    """Re-run the PGD of catalogue entry ``spec`` (first restart, fp32) from the evaluation's own
    per-example start; returns ``(trace, returned point)``."""
    p = spec.params
    target, aux_weight = pgd_target(spec, model)
    ctx = AttackContext(attack_seed(seed, spec.name), index)
    init = p.get("init", "uniform")
    start = random_start(x, p["eps"], init, uniform=ctx.uniform(x) if init == "uniform" else None,
                         generator=torch.Generator(device=x.device).manual_seed(ctx.seed))
    trace = PGDTrace(y)
    with full_precision(x.device):
        x_adv = pgd(target, x, y, p["eps"], p["step_size"], p["steps"], loss=p.get("loss", "ce"),
                    aux_weight=aux_weight, keep="last", start=start, record=trace)
    return trace, x_adv


@torch.no_grad()
def _correct(model, x, y):
    with attack_mode(model), full_precision(x.device):
        return model(x.float()).argmax(1) == y


def traceable(spec, eps):
    """Catalogue attacks inside the threat model that are runs of our PGD judged by their own iterates."""
    return spec.in_threat_model(eps) and pgd_target(spec, torch.nn.Identity()) is not None


def attack_indicators(name, trace, returned_correct):
    """The three per-attack indicators from one traced run on clean-correct examples."""
    n = int(returned_correct.numel())
    silent = int(silent_successes(trace.fooled_any(), returned_correct).sum())
    losses = trace.loss_matrix()
    # examples an iterate broke are done; "still rising" matters for the ones the attack left standing
    standing = ~trace.fooled_any() & returned_correct
    rising = int((still_rising(losses) & standing).sum())
    n_standing = int(standing.sum())
    bad = bad_gradients(trace.start_grad) if trace.start_grad is not None else torch.zeros(n, dtype=torch.bool)
    nan = int((~torch.isfinite(trace.start_grad).all(1)).sum()) if trace.start_grad is not None else 0
    out = [
        _indicator("silent success", name, "FLAG" if noticeable(silent, n) else "pass" if n else "n/a",
                   {"examples": n, "silent": silent},
                   f"{silent}/{n} examples were fooled at an iterate the attack did not return"
                   + (" (the worst case judges every iterate and counts them; the attack's own last-iterate "
                      "figure misses them)." if silent else "."), evidence=(silent, n, TOLERATED_SHARE)),
    ]
    if losses.shape[0] < 10:
        out.append(_indicator("incomplete optimisation", name, "n/a", {"steps": int(losses.shape[0])},
                              "fewer than 10 steps: nothing to read off the loss trace."))
    elif n_standing == 0:
        out.append(_indicator("incomplete optimisation", name, "n/a", {"standing": 0, "rising": 0},
                              "the attack left no example standing: no loss trace to read."))
    else:
        share = rising / n_standing
        flag = noticeable(rising, n_standing, INCOMPLETE_SHARE)
        out.append(_indicator("incomplete optimisation", name, "FLAG" if flag else "pass",
                              {"standing": n_standing, "rising": rising, "share": share, "limit": INCOMPLETE_SHARE},
                              f"the loss still rose over the last 10 % of steps for {rising}/{n_standing} examples "
                              f"the attack left standing (limit {100 * INCOMPLETE_SHARE:.0f} %).",
                              evidence=(rising, n_standing, INCOMPLETE_SHARE)))
    count = int(bad.sum())
    status = "FLAG" if noticeable(count, n) or nan else "pass" if n and trace.start_grad is not None else "n/a"
    out.append(_indicator("unavailable gradients", name, status,
                          {"examples": n, "bad": count, "non_finite": nan},
                          f"{count}/{n} examples had a zero, NaN or infinite input gradient at the start point"
                          + (f" ({nan} not finite: a FLAG on its own)." if nan else "."),
                          evidence=(count, n, TOLERATED_SHARE)))
    return out


# ---------------------------------------------------------------- per model

@torch.no_grad()
def unstable_predictions(model, x, y, eps, seed=0, draws=NOISE_DRAWS):
    """Share of examples whose prediction changes when the same input is classified again or under
    uniform noise of radius ε/10 (a few draws)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    base = _predict(model, x)
    changed = _predict(model, x) != base
    for _ in range(draws):
        noise = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * NOISE_FRACTION * eps
        changed |= _predict(model, (x + noise).clamp(0, 1)) != base
    n, count = int(y.numel()), int(changed.sum())
    return _indicator("unstable predictions", "model", "FLAG" if noticeable(count, n) else "pass" if n else "n/a",
                      {"examples": n, "changed": count, "radius": NOISE_FRACTION * eps, "draws": draws},
                      f"{count}/{n} predictions changed when classified again or under {draws} draws of noise of "
                      f"radius ε/10.", evidence=(count, n, TOLERATED_SHARE))


def _predict(model, x, batch_size=None, order=None):
    """Predictions (eval mode, fp32) in batches of ``batch_size`` taken in ``order``."""
    order = torch.arange(x.shape[0]) if order is None else order
    size = batch_size or x.shape[0]
    pred = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    with attack_mode(model), full_precision(x.device):
        for i in range(0, x.shape[0], size):
            rows = order[i:i + size].to(x.device)
            pred[rows] = model(x[rows].float()).argmax(1)
    return pred


@torch.no_grad()
def batch_dependence(model, x, y, batch_size):
    """Predictions in batches of ``batch_size`` against reversed order in batches of another size."""
    n = int(y.numel())
    other = max(1, (batch_size + 1) // 2) if batch_size > 1 else 2
    first = _predict(model, x, batch_size)
    second = _predict(model, x, other, torch.arange(n - 1, -1, -1))
    count = int((first != second).sum())
    return _indicator("batch dependence", "model", "FLAG" if noticeable(count, n) else "pass" if n else "n/a",
                      {"examples": n, "differ": count, "batch_sizes": [batch_size, other]},
                      f"{count}/{n} predictions differ between batches of {batch_size} and reversed batches of {other}.",
                      evidence=(count, n, TOLERATED_SHARE))


# ---------------------------------------------------------------- over an evaluation

def run_indicators(model, x, y, specs, *, clean, eps, seed=0, n_examples=100, batch_size=128, device="cpu"):
    """Every indicator: per traceable attack in ``specs`` on the first ``n_examples`` clean-correct
    examples, then per model on the first ``n_examples`` examples. ``clean`` is the evaluation's
    clean-correct mask (numpy bool)."""
    picked = np.flatnonzero(clean)[:n_examples]
    out = []
    if len(picked):
        index = torch.from_numpy(picked)
        for spec in (s for s in specs if traceable(s, eps)):
            traces, returned = [], []
            for i in range(0, len(index), batch_size):
                idx = index[i:i + batch_size]
                xb, yb = x[idx].to(device), y[idx].to(device)
                trace, x_adv = traced_pgd(model, spec, xb, yb, idx, seed)
                traces.append(trace)
                returned.append(_correct(model, x_adv, yb))
            out += attack_indicators(spec.name, _merge(traces), torch.cat(returned).cpu())
    head = torch.arange(min(n_examples, len(y)))
    xm, ym = x[head].to(device), y[head].to(device)
    out.append(unstable_predictions(model, xm, ym, eps, seed))
    out.append(batch_dependence(model, xm, ym, min(batch_size, len(head))))
    return out


def _merge(traces):
    """One trace over the batches of a run."""
    merged = PGDTrace(torch.cat([t.y.cpu() for t in traces]))
    steps = len(traces[0].losses)
    merged.losses = [torch.cat([t.losses[s].cpu() for t in traces]) for s in range(steps)]
    merged.fooled = [torch.cat([t.fooled[s].cpu() for t in traces]) for s in range(steps)]
    if traces[0].start_grad is not None:
        merged.start_grad = torch.cat([t.start_grad.cpu() for t in traces])
    return merged


def flagged(indicators):
    return [i for i in indicators if i["status"] == "FLAG"]
