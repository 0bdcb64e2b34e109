"""Training losses (SPEC §4): PGD-AT, TRADES and MART, each optionally with ANC and RA terms.

Pure functions of logits are defined first; :func:`training_loss` runs the forwards (train
mode, label-selected masks) and combines them. Each term T takes its RA form
``T(final) + λ·mean_k T(p_k)`` when the model has auxiliary heads.
"""
import torch
import torch.nn.functional as F

from models import has_reverse_attention

METHODS = ("pgd-at", "trades", "mart")
DEFAULT_BETA = {"pgd-at": 0.0, "trades": 6.0, "mart": 5.0}


def kl_per_example(nat_logits, adv_logits):
    """KL_i(x‖x_a) = Σ_j pn_ij (log pn_ij − log pa_ij); gradient flows through both sides."""
    log_pn = F.log_softmax(nat_logits.float(), 1)
    log_pa = F.log_softmax(adv_logits.float(), 1)
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


def anc(nat_logits, neg_logits, alpha=1.0, valid=None):
    """Asymmetric negative contrast (Eq. 4). Returns ``(value, fired)`` where ``fired`` marks
    pairs whose predicted classes agree (the indicator); invalid anchors never fire.

    α = 1 pushes only the negative (natural probabilities are stop-gradient), α = 0 only the
    natural example.
    """
    pn = F.softmax(nat_logits.float(), 1)
    po = F.softmax(neg_logits.float(), 1)
    h = pn.argmax(1)
    fired = h == po.argmax(1)
    if valid is not None:
        fired = fired & valid
    pn_h = pn.gather(1, h[:, None])[:, 0]
    po_h = po.gather(1, h[:, None])[:, 0]
    value = torch.zeros_like(pn_h)
    if alpha != 0:
        value = value + alpha * (pn_h.detach() * po_h).clamp_min(1e-20).sqrt()
    if alpha != 1:
        value = value + (1 - alpha) * (pn_h * po_h.detach()).clamp_min(1e-20).sqrt()
    return (value * fired).mean(), fired


def _ra_form(term, final, aux, aux_weight):
    """term(final) + λ·mean_k term(aux_k), where each argument is a tuple of per-head inputs."""
    value = term(*final)
    if aux:
        value = value + aux_weight * torch.stack([term(*a) for a in aux]).mean()
    return value


def _heads(logits, aux):
    """[final, aux_1, ...] as a list of logits."""
    return [logits, *aux]


def _forward(model, x, y, ra):
    """Train-mode forward with label-selected masks; returns ``(final logits, aux logits)``."""
    if ra:
        return model(x, y, return_aux=True)
    return model(x), []


def _accuracy(logits, aux, y):
    """Training accuracy without label leakage. The training forward selects RA masks by the
    label, which makes the final head right almost by construction; the first RA head comes
    before every mask, so RA models report it instead."""
    head = aux[0] if aux else logits
    return (head.argmax(1) == y).float().mean().detach()


def training_loss(method, model, x, y, x_adv, x_neg=None, y_neg=None, *, beta=None, zeta=3.0, alpha=1.0,
                  aux_weight=2.0, neg_valid=None):
    """Loss of one training batch and a dict of detached metrics.

    ``method`` is ``pgd-at``, ``trades`` or ``mart``; ANC is active when negatives are given and
    ``zeta > 0``; RA terms are active when ``model`` has auxiliary heads. ``neg_valid`` marks
    anchors that have a negative (all, by default). Metrics hold each term's value, accuracies on
    x / x_adv / x_neg (final head; the first RA head for RA models, see :func:`_accuracy`) and ``anc_fired`` (fraction of anchors whose indicator fired).
    """
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {', '.join(METHODS)}")
    beta = DEFAULT_BETA[method] if beta is None else beta
    ra = has_reverse_attention(model)
    use_anc = x_neg is not None and zeta > 0
    if use_anc and y_neg is None:
        raise ValueError("negatives need their labels y_neg")
    needs_natural = method != "pgd-at" or use_anc
    w = aux_weight if ra else 0.0

    adv_logits, adv_aux = _forward(model, x_adv, y, ra)
    metrics = {"acc_adv": _accuracy(adv_logits, adv_aux, y)}
    if needs_natural:
        nat_logits, nat_aux = _forward(model, x, y, ra)
        metrics["acc_nat"] = _accuracy(nat_logits, nat_aux, y)
    pairs = lambda *heads: [tuple(h[k] for h in heads) for k in range(len(heads[0]))]  # noqa: E731

    if method == "pgd-at":
        ce = _ra_form(lambda a: F.cross_entropy(a.float(), y), (adv_logits,), [(a,) for a in adv_aux], w)
        metrics["ce_adv"] = ce.detach()
        loss = ce
    elif method == "trades":
        ce = _ra_form(lambda n: F.cross_entropy(n.float(), y), (nat_logits,), [(n,) for n in nat_aux], w)
        heads = pairs(_heads(nat_logits, nat_aux), _heads(adv_logits, adv_aux))
        kl = _ra_form(trades_kl, heads[0], heads[1:], w)
        metrics.update(ce_nat=ce.detach(), kl=kl.detach())
        loss = ce + beta * kl
    else:  # mart
        bce = _ra_form(lambda a: mart_bce(a, y), (adv_logits,), [(a,) for a in adv_aux], w)
        heads = pairs(_heads(nat_logits, nat_aux), _heads(adv_logits, adv_aux))
        kl = _ra_form(lambda n, a: mart_kl(n, a, y), heads[0], heads[1:], w)
        metrics.update(bce_adv=bce.detach(), kl=kl.detach())
        loss = bce + beta * kl

    if use_anc:
        neg_logits, neg_aux = _forward(model, x_neg, y_neg, ra)
        heads = pairs(_heads(nat_logits, nat_aux), _heads(neg_logits, neg_aux))
        anc_value, fired = anc(*heads[0], alpha=alpha, valid=neg_valid)
        if heads[1:]:
            aux_anc = torch.stack([anc(n, o, alpha=alpha, valid=neg_valid)[0] for n, o in heads[1:]]).mean()
            anc_value = anc_value + w * aux_anc
        metrics.update(anc=anc_value.detach(), anc_fired=fired.float().mean().detach(),
                       acc_neg=_accuracy(neg_logits, neg_aux, y_neg))
        if neg_valid is not None:
            metrics["neg_valid"] = neg_valid.float().mean().detach()
        loss = loss + zeta * anc_value
    metrics["loss"] = loss.detach()
    return loss, metrics
