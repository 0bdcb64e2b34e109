"""Training methods as a registry: one small class per method, and the one place where method
names like ``trades-ancra`` are parsed and formatted.

A method says which forwards it needs (adversarial and/or natural), its default β, the loss of
its training attack and how it combines the logits into a loss. ANC (paper Eq. 4) and the RA
form of every term (``T(final) + λ·mean_k T(p_k)``) are added by :func:`training_loss` for
every method alike. Adding a method = one class with ``@register_method`` (see :class:`PGDAT`).
"""
import torch.nn.functional as F

from models import has_reverse_attention
from utils import recipe
from utils.training.errors import ConfigError
from utils.training.losses import (
    Outputs,
    anc_loss,
    mart_bce,
    mart_kl,
    ra_form,
    trades_kl,
)

SUFFIXES = {"-ancra": (True, True), "-anc": (True, False), "-ra": (False, True)}
_REGISTRY = {}


class Method:
    """Base of a training method. Subclasses set the class attributes and write :meth:`loss`.

    ``attacked``: trains on adversarial examples (else the training attack is skipped);
    ``uses_natural``: needs the natural forward even without ANC; ``allows_anc``: may take
    negatives; ``awp_warmup``:
    epochs before AWP starts by default (as in the AWP authors' code for the method).
    """

    name = ""
    label = ""
    default_beta = 0.0
    attacked = True
    uses_natural = True
    allows_anc = True
    awp_warmup = 0

    def attack_loss(self, anc, reverse_attention):
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


def get_method(name):
    """The registered method called ``name``."""
    if isinstance(name, Method):
        return name
    found = find_method(name)
    if found is None:
        raise ConfigError(f"unknown training method {name!r}; choose one of {', '.join(method_names())}")
    return found


def find_method(name):
    """The method called ``name`` (case-insensitive), else None."""
    return _REGISTRY.get(str(name).lower())


def split_method_suffix(name):
    """``(base, suffix or None)``: ``trades-ancra`` → (``trades``, ``ancra``)."""
    name = str(name).lower()
    if find_method(name) is not None:
        return name, None
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
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


def format_method_name(method, anc, reverse_attention):
    """Method name as in the paper's tables: ``trades-ancra``, ``trades-anc``, ``trades-ra``, ``trades``."""
    suffix = {flags: s for s, flags in SUFFIXES.items()}.get((bool(anc), bool(reverse_attention)), "")
    return get_method(method).name + suffix


def method_label(method, anc, reverse_attention):
    """Legend label: ``TRADES-ANCRA``, ``MART-ANC``, ``PGD-AT``; unknown methods in upper case."""
    found = find_method(method)
    base = found.label if found is not None else str(method).upper()
    tail = "ANCRA" if anc and reverse_attention else "ANC" if anc else "RA" if reverse_attention else ""
    return f"{base}-{tail}" if tail else base


def training_loss(method, model, x, y, x_adv, x_neg=None, y_neg=None, *, beta=None, zeta=recipe.ZETA,
                  alpha=recipe.ALPHA, aux_weight=recipe.AUX_WEIGHT, neg_valid=None):
    """Loss of one training batch and a dict of detached metrics.

    ``method`` is a registered name or :class:`Method`; ANC is active when negatives are given and
    ``zeta > 0``; RA terms are active when ``model`` has auxiliary heads. ``neg_valid`` marks
    anchors that have a negative (all, by default). Metrics hold each term's value, the
    accuracies on x / x_adv / x_neg (see :meth:`Outputs.accuracy`), and with ANC ``anc_fired``.
    """
    method = get_method(method)
    beta = method.default_beta if beta is None else beta
    ra = has_reverse_attention(model)
    use_anc = x_neg is not None and zeta > 0
    if use_anc and y_neg is None:
        raise ValueError("negatives need their labels y_neg")
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
        neg = Outputs.of(model, x_neg, y_neg, ra)
        anc_value, anc_metrics = anc_loss(out["nat"], neg, y_neg, alpha=alpha, aux_weight=w, valid=neg_valid)
        metrics.update(anc_metrics)
        loss = loss + zeta * anc_value
    metrics["loss"] = loss.detach()
    return loss, metrics


def _ce(y):
    return lambda logits: F.cross_entropy(logits.float(), y)


@register_method
class Standard(Method):
    """Standard training, the non-robust reference: ``CE(x, y)`` on clean images, no attack
    (RA models: ``CE(f(x), y) + λ·mean_k CE(p_k(x), y)``). No negatives."""

    name, label = "standard", "Standard"
    attacked, allows_anc = False, False

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["nat"], aux_weight=aux_weight)
        return ce, {"ce_nat": ce.detach()}


@register_method
class PGDAT(Method):
    """PGD-AT (Madry et al. 2018): ``CE(x_a, y)``, x_a from PGD on the CE loss (paper Eq. 2).
    The natural forward runs only to feed ANC (docs/protocol.md §4). AWP's default γ for it: 1e-2."""

    name, label = "pgd-at", "PGD-AT"
    uses_natural = False

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["adv"], aux_weight=aux_weight)
        return ce, {"ce_adv": ce.detach()}


@register_method
class TRADES(Method):
    """TRADES (Zhang et al. 2019; paper Eq. 1): ``CE(x, y) + β·KL(x‖x_a)``, β = 6. Vanilla TRADES
    attacks with its KL loss; every ANC/RA variant with CE, as the reference. AWP's default γ: 5e-3."""

    name, label = "trades", "TRADES"
    default_beta = recipe.BETA["trades"]
    awp_warmup = 10

    def attack_loss(self, anc, reverse_attention):
        return "ce" if anc or reverse_attention else "kl"

    def loss(self, out, y, *, beta, aux_weight):
        ce = ra_form(_ce(y), out["nat"], aux_weight=aux_weight)
        kl = ra_form(trades_kl, out["nat"], out["adv"], aux_weight=aux_weight)
        return ce + beta * kl, {"ce_nat": ce.detach(), "kl": kl.detach()}


@register_method
class MART(Method):
    """MART (Wang et al. 2020): ``BCE(x_a, y) + β·(1/B)·Σ_i KL_i(x‖x_a)·(1 − p_i(x)[y_i])``, β = 5,
    with MART's boosted CE ``BCE = CE(x_a, y) − log(1 − max_{j≠y} p_j(x_a))``."""

    name, label = "mart", "MART"
    default_beta = recipe.BETA["mart"]

    def loss(self, out, y, *, beta, aux_weight):
        bce = ra_form(lambda a: mart_bce(a, y), out["adv"], aux_weight=aux_weight)
        kl = ra_form(lambda n, a: mart_kl(n, a, y), out["nat"], out["adv"], aux_weight=aux_weight)
        return bce + beta * kl, {"bce_adv": bce.detach(), "kl": kl.detach()}
