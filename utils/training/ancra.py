"""ANCRA's training method on one page (docs/protocol.md §2–4; paper Eq. 1–7).

One step of TRADES-ANCRA reads top to bottom through :class:`TrainStep`: draw the step's random
numbers → choose one negative (other-class example) per anchor → PGD on x (untargeted) and on
the negatives (targeted toward the anchor's label; utils/attacks.py) → the method's loss in
reverse-attention form, ``CE + β·KL`` for TRADES, plus ``ζ·ANC`` → one optimizer step. The
RA forward itself is models/reverse_attention.py.

The parts, in the order the step uses them: the method registry (data: names, default β, which
methods take negatives, AWP warm-up), the loss terms, one small class per method, the negatives,
the weight update, the step. Adding a method is one class with ``@register_method`` (see
:class:`PGDAT`). The speed options (autocast, channels-last, ``--compile``) wrap the step from
outside (utils/training/fast.py); AWP and EMA are plug-ins of the update (utils/training/updates.py).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import has_reverse_attention, unwrap
from utils import recipe
from utils.attacks import attack_mode, pgd_steps, random_start
from utils.training.errors import ConfigError

# ---------------------------------------------------------------- the registry (data)

SUFFIXES = {"-ancra": (True, True), "-anc": (True, False), "-ra": (False, True)}  # name suffix -> (ANC, RA)
BASE_STRATEGIES = ("random", "soft", "hard", "easy")
STRATEGIES = BASE_STRATEGIES + tuple(f"{s}_adv" for s in BASE_STRATEGIES)  # *_adv: negatives attacked too
WARMUP_EPOCHS = recipe.NEGATIVE_WARMUP_EPOCHS  # non-random strategies use `random` until then
_REGISTRY = {}


class Method:
    """A training method: class attributes (its registry entry) and :meth:`loss`.

    ``attacked``: trains on adversarial examples (else no training attack); ``uses_natural``:
    needs the natural forward even without ANC; ``allows_anc``: may take negatives; ``aliases``:
    other spellings accepted in old labels (``pgd_at``); ``awp_warmup``: epochs before AWP starts
    by default (as in the AWP authors' code for the method).
    """

    name, label, aliases = "", "", ()
    default_beta = 0.0
    attacked = uses_natural = allows_anc = True
    awp_warmup = 0

    def attack_loss(self, anc, ra):
        """Loss of the training attack: CE (every ANCRA variant follows the reference's CE attack)."""
        return "ce"

    def loss(self, out, y, *, beta, aux_weight):
        """``(loss, metrics)`` from ``out`` = {'adv': Outputs, 'nat': Outputs} (those the method needs)."""
        raise NotImplementedError


def register_method(cls):
    """Class decorator: add a :class:`Method` subclass to the registry under ``cls.name``."""
    method = cls()
    if not method.name or "-" + method.name.rsplit("-", 1)[-1] in SUFFIXES:
        raise ValueError(f"method name {method.name!r} must be non-empty and not end in -anc/-ra/-ancra")
    _REGISTRY[method.name] = method
    return cls


def method_names():
    """Names of every registered method, in registration order."""
    return tuple(_REGISTRY)


def find_method(name):
    """The method called ``name`` or with that alias (case-insensitive), else None."""
    name = str(name).lower()
    return _REGISTRY.get(name) or next((m for m in _REGISTRY.values() if name in m.aliases), None)


def get_method(name):
    """The registered method called ``name`` (or one of its aliases); a Method is returned as is."""
    found = name if isinstance(name, Method) else find_method(name)
    if found is None:
        raise ConfigError(f"unknown training method {name!r}; choose one of {', '.join(method_names())}")
    return found


def split_method_suffix(name):
    """``(base, suffix or None)``: ``trades-ancra`` → (``trades``, ``ancra``); ``_`` also separates."""
    name = str(name).lower()
    if find_method(name) is None:
        for suffix in SUFFIXES:
            for spelling in (suffix, "_" + suffix[1:]):
                if name.endswith(spelling):
                    return name[: -len(spelling)], suffix[1:]
    return name, None


def parse_method_name(name):
    """``trades-ancra`` → (``trades``, anc=True, ra=True); a plain name is the vanilla method."""
    base, suffix = split_method_suffix(name)
    method = find_method(base)
    anc, ra = SUFFIXES.get(f"-{suffix}", (False, False))
    if method is None or (anc and not method.allows_anc):
        raise ConfigError(f"unknown method {name!r}; use {', '.join(method_names())}, optionally with "
                          f"-anc, -ra or -ancra (e.g. trades-ancra)")
    return method.name, anc, ra


def format_method_name(method, anc, ra):
    """Method name as in the paper's tables: ``trades-ancra``, ``trades-anc``, ``trades-ra``, ``trades``."""
    suffix = {flags: s for s, flags in SUFFIXES.items()}.get((bool(anc), bool(ra)), "")
    return get_method(method).name + suffix


def method_label(method, anc, ra):
    """Legend label: ``TRADES-ANCRA``, ``MART-ANC``, ``PGD-AT``; unknown methods in upper case."""
    found = find_method(method)
    base = found.label if found is not None else str(method).upper()
    tail = "ANCRA" if anc and ra else "ANC" if anc else "RA" if ra else ""
    return f"{base}-{tail}" if tail else base


# ---------------------------------------------------------------- loss terms (pure functions of logits)

def kl_per_example(nat_logits, adv_logits):
    """KL_i(x‖x_a) = Σ_j pn_ij (log pn_ij − log pa_ij); gradient flows through both sides."""
    log_pn, log_pa = F.log_softmax(nat_logits.float(), 1), F.log_softmax(adv_logits.float(), 1)
    return (log_pn.exp() * (log_pn - log_pa)).sum(1)


def trades_kl(nat_logits, adv_logits):
    """TRADES robust term: batch mean of KL_i(x‖x_a)."""
    return kl_per_example(nat_logits, adv_logits).mean()


def mart_bce(adv_logits, y):
    """MART's boosted CE: CE(x_a, y) − log(1 − max_{j≠y} pa_j), batch mean."""
    probs = F.softmax(adv_logits.float(), 1)
    other = probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), 0.0).amax(1)
    boost = -torch.log((1.0 - other).clamp_min(1e-12))
    return F.cross_entropy(adv_logits.float(), y) + boost.mean()


def mart_kl(nat_logits, adv_logits, y):
    """MART robust term: (1/B) Σ_i KL_i(x‖x_a)·(1 − pn_i[y_i])."""
    p_true = F.softmax(nat_logits.float(), 1).gather(1, y[:, None])[:, 0]
    return (kl_per_example(nat_logits, adv_logits) * (1.0 - p_true)).mean()


def anc_fired(nat_logits, neg_logits, valid=None):
    """ANC's indicator: the natural example and its negative get the same predicted class."""
    fired = F.softmax(nat_logits.float(), 1).argmax(1) == F.softmax(neg_logits.float(), 1).argmax(1)
    return fired & valid if valid is not None else fired


def anc(nat_logits, neg_logits, alpha=1.0, valid=None):
    """Asymmetric negative contrast (Eq. 4): mean of 1[fired]·sqrt(pn_h·po_h), h = argmax pn.
    Returns ``(value, fired)``; invalid anchors never fire. α = 1 pushes only the negative
    (natural probabilities stop-gradient), α = 0 only the natural example."""
    pn, po = F.softmax(nat_logits.float(), 1), F.softmax(neg_logits.float(), 1)
    h = pn.argmax(1)[:, None]
    fired = anc_fired(nat_logits, neg_logits, valid)
    pn_h, po_h = pn.gather(1, h)[:, 0], po.gather(1, h)[:, 0]
    value = torch.zeros_like(pn_h)
    if alpha != 0:
        value = value + alpha * (pn_h.detach() * po_h).clamp_min(1e-20).sqrt()
    if alpha != 1:
        value = value + (1 - alpha) * (pn_h * po_h.detach()).clamp_min(1e-20).sqrt()
    return (value * fired).mean(), fired


@dataclass
class Outputs:
    """Logits of one train-mode forward: the final head and the RA heads (empty for plain models)."""

    final: torch.Tensor
    aux: list

    @classmethod
    def of(cls, model, x, y, ra):
        """Forward ``x``; RA models select their masks by the label ``y`` (paper §3.2)."""
        if ra:
            logits, aux = model(x, y, return_aux=True)
            return cls(logits, list(aux))
        return cls(model(x), [])

    def accuracy(self, y):
        """Training accuracy without label leakage: the label-selected masks make the final RA
        head right almost by construction, so RA models report the first RA head (before every mask)."""
        head = self.aux[0] if self.aux else self.final
        return (head.argmax(1) == y).float().mean().detach()


def ra_form(term, *outputs, aux_weight):
    """Reverse-attention form of a term: ``term(final…) + λ·mean_k term(aux_k…)`` over the matching
    heads of each of ``outputs``; plain models (no RA heads) give ``term(final…)`` alone."""
    value = term(*(o.final for o in outputs))
    aux = list(zip(*(o.aux for o in outputs)))
    if aux:
        value = value + aux_weight * torch.stack([term(*heads) for heads in aux]).mean()
    return value


# ---------------------------------------------------------------- the methods: one small class each

def _ce(y):
    return lambda logits: F.cross_entropy(logits.float(), y)


@register_method
class Standard(Method):
    """Standard training, the non-robust reference: ``CE(x, y)`` on clean images, no attack, no negatives."""

    name, label = "standard", "Standard"
    attacked, allows_anc = False, False

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["nat"], aux_weight=aux_weight)
        return ce, {"ce_nat": ce.detach()}


@register_method
class PGDAT(Method):
    """PGD-AT (Madry et al. 2018): ``CE(x_a, y)``, x_a from PGD on the CE loss (paper Eq. 2). The
    natural forward runs only to feed ANC (docs/protocol.md §4). AWP's default γ for it: 1e-2."""

    name, label, aliases = "pgd-at", "PGD-AT", ("pgdat", "pgd_at", "at", "pgd")
    uses_natural = False

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["adv"], aux_weight=aux_weight)
        return ce, {"ce_adv": ce.detach()}


@register_method
class TRADES(Method):
    """TRADES (Zhang et al. 2019; paper Eq. 1): ``CE(x, y) + β·KL(x‖x_a)``, β = 6. Vanilla TRADES
    attacks with its KL loss; every ANC/RA variant with CE, as the reference. AWP's default γ: 5e-3."""

    name, label, default_beta, awp_warmup = "trades", "TRADES", recipe.BETA["trades"], 10

    def attack_loss(self, anc, ra):
        return "ce" if anc or ra else "kl"

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["nat"], aux_weight=aux_weight)
        kl = ra_form(trades_kl, out["nat"], out["adv"], aux_weight=aux_weight)
        return ce + beta * kl, {"ce_nat": ce.detach(), "kl": kl.detach()}


@register_method
class MART(Method):
    """MART (Wang et al. 2020): ``BCE(x_a, y) + β·(1/B)·Σ_i KL_i(x‖x_a)·(1 − p_i(x)[y_i])``, β = 5."""

    name, label, default_beta = "mart", "MART", recipe.BETA["mart"]

    def loss(self, out, y, *, beta, aux_weight):
        bce = ra_form(lambda a: mart_bce(a, y), out["adv"], aux_weight=aux_weight)
        kl = ra_form(lambda n, a: mart_kl(n, a, y), out["nat"], out["adv"], aux_weight=aux_weight)
        return bce + beta * kl, {"bce_adv": bce.detach(), "kl": kl.detach()}


class Negatives(NamedTuple):
    """One negative per anchor: images, their true labels, source indices, which anchors have one."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor


def training_loss(method, model, x, y, x_adv, neg: Negatives | None = None, *, ra, beta=None, zeta=recipe.ZETA,
                  alpha=recipe.ALPHA, aux_weight=recipe.AUX_WEIGHT):
    """Loss of one training batch and its detached metrics: the method's terms in RA form (``ra``:
    the model has RA heads) plus ζ·ANC when negatives are given and ζ > 0. ``beta=None`` takes the
    method's default. Metrics: each term, the accuracies on x / x_adv / negatives (see
    :meth:`Outputs.accuracy`), and with ANC the fraction fired and the fraction of anchors with a negative."""
    method = get_method(method)
    beta = method.default_beta if beta is None else beta
    use_anc = neg is not None and zeta > 0
    w = aux_weight if ra else 0.0
    out, metrics = {}, {}
    if method.attacked:
        out["adv"] = Outputs.of(model, x_adv, y, ra)
        metrics["acc_adv"] = out["adv"].accuracy(y)
    if method.uses_natural or use_anc:
        out["nat"] = Outputs.of(model, x, y, ra)
        metrics["acc_nat"] = out["nat"].accuracy(y)
    loss, terms = method.loss(out, y, beta=beta, aux_weight=w)
    metrics.update(terms)
    if use_anc:
        nat, other = out["nat"], Outputs.of(model, neg.x, neg.y, ra)
        value = ra_form(lambda n, o: anc(n, o, alpha=alpha, valid=neg.valid)[0], nat, other, aux_weight=w)
        metrics.update(anc=value.detach(), anc_fired=anc_fired(nat.final, other.final, neg.valid).float().mean().detach(),
                       acc_neg=other.accuracy(neg.y), neg_valid=neg.valid.float().mean().detach())
        loss = loss + zeta * value
    metrics["loss"] = loss.detach()
    return loss, metrics


# ---------------------------------------------------------------- negatives (docs/protocol.md §3, Eq. 5)

def check_strategy(strategy):
    """Raise a clear error for an unknown strategy name (the one check every caller uses)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown negative strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def effective_strategy(strategy, epoch=None):
    """The base rule used at ``epoch`` (1-based): non-random rules warm up with `random`."""
    check_strategy(strategy)
    return "random" if epoch is not None and epoch <= WARMUP_EPOCHS else strategy.removesuffix("_adv")


def _pick(scores, allowed):
    """Row-wise argmax of ``scores`` among ``allowed`` columns, and whether any was allowed."""
    return scores.masked_fill(~allowed, float("-inf")).argmax(1), allowed.any(1)


def negative_scores(n, num_classes, device, generator=None):
    """The random rule's two draws for a batch of ``n``: U[0, 1) class scores (n×C), then example scores (n×n)."""
    return (torch.rand((n, num_classes), generator=generator, device=device),
            torch.rand((n, n), generator=generator, device=device))


def random_negatives(y, num_classes, generator=None, scores=None):
    """For each anchor: a class ≠ y_i uniformly among the classes present, then a uniformly random
    example of that class. Returns ``(index, valid)``; ``scores`` are :func:`negative_scores`' draws."""
    n = y.shape[0]
    present = torch.zeros(num_classes, dtype=torch.bool, device=y.device)
    present[y] = True
    classes = torch.arange(num_classes, device=y.device)
    class_scores, example_scores = negative_scores(n, num_classes, y.device, generator) if scores is None else scores
    chosen_class, valid = _pick(class_scores, present[None, :] & (classes[None, :] != y[:, None]))
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
    """``(index, valid)`` of each anchor's negative under a base strategy. Non-random rules rank the
    batch's eval-mode ``logits``: among the allowed candidates the largest logit for the anchor's
    label, falling back to `random` where none is left. Single-class batches: ``valid`` all False."""
    index, valid = random_negatives(y, num_classes, generator, scores)
    if strategy == "random":
        return index, valid
    if logits is None:
        raise ValueError(f"strategy {strategy!r} needs the batch's eval-mode logits")
    picked, has_candidate = _pick(logits[:, y].t().float(), candidate_mask(strategy, y, logits.argmax(1)))
    return torch.where(has_candidate, picked, index), valid


def selection_logits(base, model, x):
    """The eval-mode logits a non-random rule ranks by (None for `random`); ``model`` in attack mode."""
    if base == "random":
        return None
    with torch.no_grad():
        return model(x)


# ---------------------------------------------------------------- the weight update and the step

class WeightUpdate:
    """``zero_grad``, ``backward``, ``optimizer.step()`` on ``loss_fn(model)``. Plug-ins
    (utils/training/updates.py: AWP, EMA) may perturb the weights while the loss is computed and
    back-propagated (removed before the optimizer step) and act after each step; those with a
    ``checkpoint_key`` are saved in the checkpoint under that key."""

    def __init__(self, optimizer, plugins=()):
        self.optimizer = optimizer
        self.plugins = list(plugins)

    def __call__(self, model, loss_fn, epoch):
        """Update ``model``'s weights; returns the loss's metrics."""
        with ExitStack() as stack:
            for plugin in self.plugins:
                stack.enter_context(plugin.perturbed(model, loss_fn, epoch))
            loss, metrics = loss_fn(model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        for plugin in self.plugins:
            plugin.after_step(model)
        return metrics

    def find(self, kind):
        """The plug-in of class ``kind``, or None."""
        return next((p for p in self.plugins if isinstance(p, kind)), None)

    def state_dict(self):
        """``{checkpoint_key: state}`` of the plug-ins that keep state."""
        return {p.checkpoint_key: p.state_dict() for p in self.plugins if p.checkpoint_key}

    def load_state_dict(self, payload):
        """Give every stateful plug-in its entry of ``payload`` (None when the checkpoint has none)."""
        for plugin in self.plugins:
            if plugin.checkpoint_key:
                plugin.load_state_dict(payload.get(plugin.checkpoint_key))


class TrainStep:
    """One optimisation step: ``step(x, y, epoch)`` returns the batch's metrics as detached 0-dim
    tensors on the device (no host synchronisation). ``model`` may be wrapped (DDP); the attacks
    run on the bare module. ``config`` gives ``method, anc, ra, strategy, alpha, zeta, beta,
    aux_weight, eps, step_size, attack_steps``; ``epoch`` (1-based) decides the negatives' warm-up
    (and AWP's, in ``update``: a :class:`WeightUpdate`, by default a plain optimizer step).
    :meth:`examples` and :meth:`loss` are pure (no RNG, no host sync): utils/training/fast.py runs
    them under autocast or torch.compile from outside."""

    joint_attacks = True  # both attacks as one 2B batch when they can (same numbers; a speed option)

    def __init__(self, model, optimizer, config, num_classes, update=None):
        if bool(config.ra) != has_reverse_attention(model):
            raise ValueError(f"config.ra is {config.ra} but the model {'has no' if config.ra else 'has'} RA heads")
        self.model, self.attack_model = model, unwrap(model)  # attacks bypass DDP: no gradient sync
        self.optimizer, self.config, self.num_classes = optimizer, config, num_classes
        self.update = update if update is not None else WeightUpdate(optimizer)
        self.method = get_method(config.method)
        self.attack_loss = self.method.attack_loss(config.anc, config.ra)
        self.attacks_negatives = config.anc and config.strategy.endswith("_adv")

    def joins(self):
        """Whether both attacks share one batch: both attacked, with the same loss (CE)."""
        return self.joint_attacks and self.attacks_negatives and self.method.attacked and self.attack_loss == "ce"

    def draw(self, x):
        """The step's random numbers, first and in a fixed order: the adversarial start's N(0,1),
        the random rule's class and example scores, the negatives' start N(0,1) (None if unused)."""
        normal = lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype)  # as random_start draws it
        start = normal() if self.method.attacked else None
        scores = negative_scores(x.shape[0], self.num_classes, x.device) if self.config.anc else None
        return start, scores, normal() if self.attacks_negatives else None

    def examples(self, x, y, rule, start, scores, neg_start):
        """``(x_adv, Negatives or None)`` with the model in attack mode: x_adv is x itself for a
        method without an attack; negatives by the base ``rule`` in force, attacked toward the
        anchor's label for ``*_adv`` strategies (docs/protocol.md §2–3)."""
        cfg, model = self.config, self.attack_model
        settings = {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.attack_steps,
                    "aux_weight": cfg.aux_weight if cfg.ra else 0.0}
        neg = None
        if cfg.anc:
            index, valid = choose_negatives(rule, y, self.num_classes, selection_logits(rule, model, x), scores=scores)
            neg = Negatives(x[index], y[index], index, valid)
        if self.joins():  # untargeted on x, targeted on the negatives, as one 2B batch
            begin = torch.cat([random_start(x, cfg.eps, "normal", normal=start),
                               random_start(neg.x, cfg.eps, "normal", normal=neg_start)])
            targeted = torch.arange(2 * x.shape[0], device=x.device) >= x.shape[0]
            both, _, _ = pgd_steps(model, torch.cat([x, neg.x]), torch.cat([y, y]), begin, loss="ce",
                                   targeted=targeted, **settings)
            x_adv, x_neg = both.split(x.shape[0])
            return x_adv, Negatives(x_neg, neg.y, neg.index, neg.valid)
        x_adv = x
        if self.method.attacked:
            x_adv, _, _ = pgd_steps(model, x, y, random_start(x, cfg.eps, "normal", normal=start),
                                    loss=self.attack_loss, **settings)
        if self.attacks_negatives:
            x_neg, _, _ = pgd_steps(model, neg.x, y, random_start(neg.x, cfg.eps, "normal", normal=neg_start),
                                    loss="ce", targeted=True, **settings)
            neg = Negatives(x_neg, neg.y, neg.index, neg.valid)
        return x_adv, neg

    def loss(self, model, x, y, x_adv, neg):
        """``(loss, metrics)`` of the batch for ``model`` (the update may pass a perturbed copy)."""
        cfg = self.config
        return training_loss(self.method, model, x, y, x_adv, neg, ra=cfg.ra, beta=cfg.beta, zeta=cfg.zeta,
                             alpha=cfg.alpha, aux_weight=cfg.aux_weight)

    def __call__(self, x, y, epoch):
        start, scores, neg_start = self.draw(x)
        with attack_mode(self.attack_model):
            x_adv, neg = self.examples(x, y, effective_strategy(self.config.strategy, epoch), start, scores, neg_start)
        self.model.train()
        return self.update(self.model, lambda model: self.loss(model, x, y, x_adv, neg), epoch)
