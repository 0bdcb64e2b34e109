"""The loss terms every training method is made of (docs/protocol.md §4, paper Eq. 4–7).

Pure functions of logits, then the two pieces every method shares: :class:`Outputs` (the
train-mode forward of one batch, final head and RA heads) and :func:`ra_form`, which gives
any term T its reverse-attention form ``T(final) + λ·mean_k T(p_k)``. The methods that combine
them live in :mod:`utils.training.methods`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    fired = anc_fired(nat_logits, neg_logits, valid)
    pn_h = pn.gather(1, h[:, None])[:, 0]
    po_h = po.gather(1, h[:, None])[:, 0]
    value = torch.zeros_like(pn_h)
    if alpha != 0:
        value = value + alpha * (pn_h.detach() * po_h).clamp_min(1e-20).sqrt()
    if alpha != 1:
        value = value + (1 - alpha) * (pn_h * po_h.detach()).clamp_min(1e-20).sqrt()
    return (value * fired).mean(), fired


def anc_fired(nat_logits, neg_logits, valid=None):
    """ANC's indicator alone: the natural example and its negative get the same predicted class."""
    fired = F.softmax(nat_logits.float(), 1).argmax(1) == F.softmax(neg_logits.float(), 1).argmax(1)
    return fired & valid if valid is not None else fired


@dataclass
class Outputs:
    """Logits of one train-mode forward: the final head and the RA heads (empty for plain models)."""

    final: torch.Tensor
    aux: list

    @classmethod
    def of(cls, model, x, y, reverse_attention):
        """Forward ``x``; RA models select their masks by the label ``y`` (paper §3.2)."""
        if reverse_attention:
            logits, aux = model(x, y, return_aux=True)
            return cls(logits, list(aux))
        return cls(model(x), [])

    def accuracy(self, y):
        """Training accuracy without label leakage: the label-selected masks make the final RA
        head right almost by construction, so RA models report the first RA head (before every mask)."""
        head = self.aux[0] if self.aux else self.final
        return (head.argmax(1) == y).float().mean().detach()


def ra_form(term, *outputs, aux_weight):
    """``term(final…) + λ·mean_k term(aux_k…)`` over the matching heads of each of ``outputs``;
    plain models (no RA heads) give ``term(final…)`` alone."""
    value = term(*(o.final for o in outputs))
    aux = list(zip(*(o.aux for o in outputs)))
    if aux:
        value = value + aux_weight * torch.stack([term(*heads) for heads in aux]).mean()
    return value


def anc_loss(nat: Outputs, neg: Outputs, y_neg, *, alpha, aux_weight, valid=None):
    """The ANC term in RA form and its metrics (value, fraction fired, accuracy on the negatives)."""
    value = ra_form(lambda n, o: anc(n, o, alpha=alpha, valid=valid)[0], nat, neg, aux_weight=aux_weight)
    metrics = {"anc": value.detach(), "anc_fired": anc_fired(nat.final, neg.final, valid).float().mean().detach(),
               "acc_neg": neg.accuracy(y_neg)}
    if valid is not None:
        metrics["neg_valid"] = valid.float().mean().detach()
    return value, metrics
