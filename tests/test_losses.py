"""Training losses (docs/protocol.md §4) against values computed by hand with plain ``math`` on 3 examples, 3 classes."""
import math

import pytest
import torch
from torch import nn

from utils.training.ancra import Negatives, anc, kl_per_example, mart_bce, mart_kl, trades_kl, training_loss

# ---------------------------------------------------------------- hand arithmetic (no torch)


def softmax(z):
    top = max(z)
    e = [math.exp(v - top) for v in z]
    return [v / sum(e) for v in e]


def argmax(z):
    return max(range(len(z)), key=lambda j: z[j])


def ce(z, y):
    return -math.log(softmax(z)[y])


def kl(zn, za):
    pn, pa = softmax(zn), softmax(za)
    return sum(p * (math.log(p) - math.log(q)) for p, q in zip(pn, pa))


def bce(za, y):
    pa = softmax(za)
    return ce(za, y) - math.log(1 - max(p for j, p in enumerate(pa) if j != y))


def mkl(zn, za, y):
    return kl(zn, za) * (1 - softmax(zn)[y])


def anc_pair(zn, zo):
    h = argmax(zn)
    return math.sqrt(softmax(zn)[h] * softmax(zo)[h]) if h == argmax(zo) else 0.0


def mean(values):
    return sum(values) / len(values)


# ---------------------------------------------------------------- fixed logits

Y = [0, 1, 0]
Y_NEG = [1, 2, 1]
NAT = [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.2, 1.5]]
ADV = [[0.8, 1.1, -0.2], [0.3, 0.9, 0.4], [1.0, -0.3, 0.6]]
NEG = [[1.4, 0.2, 0.1], [0.0, 0.3, 0.9], [-0.2, 0.4, 1.1]]  # fires for anchors 0 and 2
AUX = [  # (nat, adv, neg) of each auxiliary head
    ([[0.3, 1.0, -0.4], [1.2, 0.1, 0.0], [0.2, 0.25, 0.9]],
     [[0.5, 0.4, 0.1], [0.9, -0.6, 0.3], [0.0, 0.7, 0.2]],
     [[-0.1, 0.8, 0.2], [1.5, 0.2, 0.4], [0.6, 0.1, 0.3]]),  # fires for anchors 0 and 1
    ([[1.1, -0.2, 0.4], [0.2, 0.3, 1.0], [0.5, 1.3, -0.7]],
     [[0.2, 0.6, 0.9], [-0.4, 1.0, 0.1], [0.8, 0.3, 0.5]],
     [[0.7, 0.1, 0.0], [0.3, 0.2, 0.1], [0.4, 1.6, 0.2]]),  # fires for anchors 0 and 2
]


class TableModel(nn.Module):
    """Fake model: x[:, 0] holds row ids 0-2 (natural), 3-5 (adversarial), 6-8 (negatives);
    returns fixed logits (and aux logits when RA) for those rows and records each call."""

    def __init__(self, ra):
        super().__init__()
        self.reverse_attention = ra
        self.final = nn.Parameter(torch.tensor(NAT + ADV + NEG))
        self.heads = nn.ParameterList([nn.Parameter(torch.tensor(n + a + o)) for n, a, o in AUX] if ra else [])
        self.calls = []

    def forward(self, x, y=None, return_aux=False):
        ids = x[:, 0].long()
        self.calls.append((ids.tolist(), None if y is None else y.tolist(), self.training))
        logits = self.final[ids]
        return (logits, [h[ids] for h in self.heads]) if return_aux else logits


def ids(start):
    return torch.arange(start, start + 3, dtype=torch.float32)[:, None]


def expected(method, ra, with_neg, valid, beta, zeta, lam):
    """Loss and metric values of ``training_loss`` computed by hand."""
    heads = [(NAT, ADV, NEG)] + (AUX if ra else [])

    def ra_form(term):
        value = term(*heads[0])
        if ra:
            value += lam * mean([term(*h) for h in heads[1:]])
        return value

    out = {}
    if method == "pgd-at":
        out["ce_adv"] = ra_form(lambda n, a, o: mean([ce(a[i], Y[i]) for i in range(3)]))
        loss = out["ce_adv"]
    elif method == "trades":
        out["ce_nat"] = ra_form(lambda n, a, o: mean([ce(n[i], Y[i]) for i in range(3)]))
        out["kl"] = ra_form(lambda n, a, o: mean([kl(n[i], a[i]) for i in range(3)]))
        loss = out["ce_nat"] + beta * out["kl"]
    else:
        out["bce_adv"] = ra_form(lambda n, a, o: mean([bce(a[i], Y[i]) for i in range(3)]))
        out["kl"] = ra_form(lambda n, a, o: mean([mkl(n[i], a[i], Y[i]) for i in range(3)]))
        loss = out["bce_adv"] + beta * out["kl"]
    # accuracies: the final head, or for RA models the first (label-free) RA head
    acc_nat, acc_adv, acc_neg = heads[1] if ra else heads[0]
    out["acc_adv"] = mean([argmax(acc_adv[i]) == Y[i] for i in range(3)])
    if method != "pgd-at" or with_neg:
        out["acc_nat"] = mean([argmax(acc_nat[i]) == Y[i] for i in range(3)])
    if with_neg:
        out["anc"] = ra_form(lambda n, a, o: mean([anc_pair(n[i], o[i]) * valid[i] for i in range(3)]))
        out["anc_fired"] = mean([(argmax(NAT[i]) == argmax(NEG[i])) and valid[i] for i in range(3)])
        out["acc_neg"] = mean([argmax(acc_neg[i]) == Y_NEG[i] for i in range(3)])
        loss += zeta * out["anc"]
    out["loss"] = loss
    return out


# ---------------------------------------------------------------- training_loss end to end

@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart"])
@pytest.mark.parametrize("ra", [False, True])
@pytest.mark.parametrize("negatives", ["none", "all_valid", "one_invalid", "zeta0"])
def test_training_loss_matches_hand_values(method, ra, negatives):
    model = TableModel(ra).train()
    y, y_neg = torch.tensor(Y), torch.tensor(Y_NEG)
    beta, zeta, lam = 2.5, (0.0 if negatives == "zeta0" else 1.5), 0.7
    valid = [True, True, False] if negatives == "one_invalid" else [True, True, True]
    neg = None if negatives == "none" else Negatives(ids(6), y_neg, torch.arange(3), torch.tensor(valid))
    loss, metrics = training_loss(method, model, ids(0), y, ids(3), neg, ra=ra, beta=beta, zeta=zeta, aux_weight=lam)

    with_neg = negatives in ("all_valid", "one_invalid")
    want = expected(method, ra, with_neg, valid, beta, zeta, lam)
    assert loss.item() == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
    for key, value in want.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    extra = set(metrics) - set(want) - {"neg_valid"}
    assert not extra, f"unexpected metrics {extra}"
    assert ("neg_valid" in metrics) == with_neg  # the fraction of anchors that have a negative
    if with_neg:
        assert metrics["neg_valid"].item() == pytest.approx(sum(valid) / 3)
    assert all(m.dim() == 0 and not m.requires_grad for m in metrics.values())

    # forwards: which rows, with which labels (label-selected masks for RA models only)
    rows = sorted(call[0][0] for call in model.calls)
    assert rows == sorted([3] + ([0] if method != "pgd-at" or with_neg else []) + ([6] if with_neg else []))
    for row_ids, labels, training in model.calls:
        assert training
        if ra:
            assert labels == (Y_NEG if row_ids[0] == 6 else Y)
        else:
            assert labels is None
    loss.backward()
    assert model.final.grad is not None


def test_training_loss_bad_input():
    model = TableModel(False)
    with pytest.raises(ValueError, match="unknown training method"):
        training_loss("fgsm-at", model, ids(0), torch.tensor(Y), ids(3), ra=False)


# ---------------------------------------------------------------- single terms

def leaf(rows):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=True)


def test_kl_direction_and_gradient_through_both_sides():
    nat, adv = leaf(NAT), leaf(ADV)
    per = kl_per_example(nat, adv)
    want = [kl(NAT[i], ADV[i]) for i in range(3)]
    reverse = [kl(ADV[i], NAT[i]) for i in range(3)]
    assert abs(mean(want) - mean(reverse)) > 1e-2  # the direction matters here
    assert per.tolist() == pytest.approx(want, rel=1e-5)
    value = trades_kl(nat, adv)
    assert value.item() == pytest.approx(mean(want), rel=1e-5)
    value.backward()
    step = 1e-5
    for name, tensor, table in (("nat", nat, NAT), ("adv", adv, ADV)):
        for i in range(3):
            for j in range(3):
                up = [row[:] for row in table]
                down = [row[:] for row in table]
                up[i][j] += step
                down[i][j] -= step
                args_up = (up, ADV) if name == "nat" else (NAT, up)
                args_down = (down, ADV) if name == "nat" else (NAT, down)
                numeric = (kl(*[a[i] for a in args_up]) - kl(*[a[i] for a in args_down])) / (2 * step) / 3
                assert tensor.grad[i, j].item() == pytest.approx(numeric, abs=1e-5), (name, i, j)


def test_mart_terms():
    y = torch.tensor(Y)
    assert mart_bce(leaf(ADV), y).item() == pytest.approx(mean([bce(ADV[i], Y[i]) for i in range(3)]), rel=1e-5)
    assert mart_kl(leaf(NAT), leaf(ADV), y).item() == pytest.approx(
        mean([mkl(NAT[i], ADV[i], Y[i]) for i in range(3)]), rel=1e-5)
    # the boost uses the largest *other* class: for example 1 the label is the argmax
    assert bce(ADV[1], 1) - ce(ADV[1], 1) == pytest.approx(-math.log(1 - softmax(ADV[1])[2]))


def _hand_anc_grads(alpha, valid):
    """d ANC / d logits for both sides, by hand: d sqrt(pn·po)/dz_j = ½ sqrt(pn·po)(δ_hj − p_j)."""
    g_nat = [[0.0] * 3 for _ in range(3)]
    g_neg = [[0.0] * 3 for _ in range(3)]
    for i in range(3):
        value = anc_pair(NAT[i], NEG[i])
        if not value or not valid[i]:
            continue
        h, pn, po = argmax(NAT[i]), softmax(NAT[i]), softmax(NEG[i])
        for j in range(3):
            g_neg[i][j] = alpha * 0.5 * value * ((j == h) - po[j]) / 3
            g_nat[i][j] = (1 - alpha) * 0.5 * value * ((j == h) - pn[j]) / 3
    return g_nat, g_neg


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("valid", [None, [True, False, True], [False, True, True]])
def test_anc_value_indicator_and_gradient_sides(alpha, valid):
    nat, neg = leaf(NAT), leaf(NEG)
    mask = [True] * 3 if valid is None else valid
    value, fired = anc(nat, neg, alpha=alpha, valid=None if valid is None else torch.tensor(valid))
    assert fired.tolist() == [argmax(NAT[i]) == argmax(NEG[i]) and mask[i] for i in range(3)]
    assert [argmax(NAT[i]) == argmax(NEG[i]) for i in range(3)] == [True, False, True]
    assert value.item() == pytest.approx(mean([anc_pair(NAT[i], NEG[i]) * mask[i] for i in range(3)]), rel=1e-5)
    value.backward()
    g_nat, g_neg = _hand_anc_grads(alpha, mask)
    for tensor, want in ((nat, g_nat), (neg, g_neg)):
        got = torch.zeros(3, 3, dtype=torch.float64) if tensor.grad is None else tensor.grad
        assert got.tolist() == [pytest.approx(row, abs=1e-7) for row in want]
    if alpha == 1.0:
        assert nat.grad is None or not nat.grad.any()  # only the negative moves
        assert neg.grad[0].abs().sum() > 0 or not mask[0]
    if alpha == 0.0:
        assert neg.grad is None or not neg.grad.any()  # only the natural example moves
        assert nat.grad[2].abs().sum() > 0


def test_anc_with_no_valid_anchor_is_zero():
    value, fired = anc(leaf(NAT), leaf(NEG), valid=torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0 and not fired.any()
