"""Indicators of attack failure (Pintor et al., NeurIPS 2022; docs/evaluation.md): the PGD record hook
only observes, the rules on hand tensors, and each indicator fires on a toy model built to fail it and
stays quiet on a plain linear model."""
import numpy as np
import pytest
import torch
from torch import nn

from utils.attacks import pgd
from utils.evaluation import indicators
from utils.evaluation.catalogue import BUDGETS, Settings, attack_catalogue, select_attacks
from utils.evaluation.report import checks_table, flag_summary, json_report
from utils.evaluation.results import Evaluation

EPS = 8 / 255


def grey(n=6, size=4, value=0.5):
    return torch.full((n, 3, size, size), value)


class Linear(nn.Module):
    """Plain 2-class linear model on the pixel mean: margin z1 − z0 = slope·(mean − 0.5) + offset."""

    def __init__(self, slope=1.0, offset=-5.0):
        super().__init__()
        self.slope, self.offset = slope, offset

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([torch.zeros_like(m), self.slope * m + self.offset], 1)


class Detour(nn.Module):
    """Along the pixel mean s = mean − 0.5 (the PGD of the test walks s = 0 → ε), class 1 wins only for
    s in (ε/4, 3ε/4) while the CE of class 0 keeps rising as 100 other classes creep up: an attack
    ascending CE passes through the misclassified band and returns a correct point."""

    def forward(self, x):
        s = x.flatten(1).mean(1, keepdim=True) - 0.5
        bump = 1 - ((s - EPS / 2) / (EPS / 4)) ** 2
        creep = -10 + 9.99 * s / EPS
        return torch.cat([torch.zeros_like(s), bump, creep.expand(-1, 100)], 1)


class Quantised(nn.Module):
    """Rounds its input to 1/255 first: the input gradient is exactly zero everywhere."""

    def forward(self, x):
        q = torch.round(x * 255) / 255
        m = q.flatten(1).mean(1, keepdim=True)
        return torch.cat([m, -m], 1)


class Noisy(nn.Module):
    """Adds fresh random noise to its logits at every call (a randomised defence)."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([m, m], 1) + torch.randn(x.shape[0], 2)


class BatchStats(nn.Module):
    """Normalises with the batch's own statistics (BatchNorm stuck in train mode)."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        centred = m - m.mean(0, keepdim=True)
        return torch.cat([centred, -centred], 1)


def traced(model, x, y, steps=10, step_size=EPS / 10):
    trace = indicators.PGDTrace(y)
    x_adv = pgd(model, x, y, EPS, step_size, steps, loss="ce", init="none", record=trace)
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == y
    return trace, correct


def by_name(items):
    return {item["name"]: item for item in items}


# ---------------------------------------------------------------- the hook

def test_record_hook_only_observes_and_sees_every_iterate(tiny_model):
    model = tiny_model()
    x, y = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    start = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * EPS).clamp(0, 1)
    plain = pgd(model, x, y, EPS, 2 / 255, 5, loss="cw", start=start)
    trace = indicators.PGDTrace(y)
    recorded = pgd(model, x, y, EPS, 2 / 255, 5, loss="cw", start=start, record=trace)
    assert torch.equal(plain, recorded)
    assert len(trace.losses) == 5 and trace.loss_matrix().shape == (5, 4)
    # the first record is the start point: its objective and gradient are the CW objective's at `start`
    probe = start.clone().requires_grad_(True)
    objective = -torch.relu(model(probe).gather(1, y[:, None])[:, 0]
                            - model(probe).scatter(1, y[:, None], float("-inf")).amax(1))
    grad, = torch.autograd.grad(objective.sum(), probe)
    assert torch.allclose(trace.losses[0], objective.detach(), atol=1e-6)
    assert torch.allclose(trace.start_grad, grad.flatten(1), atol=1e-6)


def test_record_hook_keeps_the_first_restart_only():
    trace = indicators.PGDTrace(torch.tensor([0]))
    logits, grad = torch.tensor([[1.0, 0.0]]), torch.ones(1, 3)
    trace(0, 0, None, torch.tensor([1.0]), logits, grad)
    trace(1, 0, None, torch.tensor([9.0]), logits, 2 * grad)
    assert trace.loss_matrix().tolist() == [[1.0]] and trace.start_grad.tolist() == [[1.0, 1.0, 1.0]]


# ---------------------------------------------------------------- rules on hand tensors

def test_still_rising_reads_the_best_so_far_over_the_last_tenth():
    flat = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    rising = torch.arange(10.0)                                  # +1 in the last step
    tiny = torch.tensor([0.0] * 9 + [0.005])                       # under the 0.01 absolute floor
    relative = torch.tensor([100.0] * 9 + [100.5])                 # +0.5 % of 100: under 1 %
    dip = torch.tensor([0.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.5])  # best so far stays 3
    losses = torch.stack([flat, rising, tiny, relative, dip], 1)
    assert indicators.still_rising(losses).tolist() == [False, True, False, False, False]
    assert indicators.still_rising(losses[:9]).tolist() == [False] * 5       # < 10 steps: nothing to read
    twenty = torch.cat([torch.zeros(18, 1), torch.tensor([[0.0], [1.0]])])    # 20 steps: window of 2
    assert indicators.still_rising(twenty).tolist() == [True]


def test_silent_success_and_bad_gradient_rules():
    fooled_any = torch.tensor([True, True, False, False])
    returned_correct = torch.tensor([True, False, True, False])
    assert indicators.silent_successes(fooled_any, returned_correct).tolist() == [True, False, False, False]
    grad = torch.tensor([[0.0, 0.0], [0.0, 1.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    assert indicators.bad_gradients(grad).tolist() == [True, False, True, True]
    # exact one-sided binomial test of a share above 0.5 % at level 0.05:
    # n = 8: P(X >= 1) = 1 - 0.995^8 = 0.0393 <= 0.05, FLAG; n = 16: 1 - 0.995^16 = 0.0771, noise
    assert indicators.noticeable(1, 8) and not indicators.noticeable(0, 8) and not indicators.noticeable(1, 16)
    # n = 1000 (expected 5): P(X >= 9) = 0.0676, P(X >= 10) = 0.0315 (sum of the binomial terms)
    assert not indicators.noticeable(9, 1000) and indicators.noticeable(10, 1000)
    # incomplete optimisation tests against 10 %: 3 of 10 rising, P(X >= 3 | 10, 0.1) = 0.0702, noise;
    # 4 of 10: 0.0128, a FLAG
    assert not indicators.noticeable(3, 10, 0.1) and indicators.noticeable(4, 10, 0.1)


# ---------------------------------------------------------------- each indicator fires on its toy, not on a plain model

def test_silent_success_fires_on_a_detour_and_not_on_a_linear_model():
    x, y = grey(), torch.zeros(6, dtype=torch.long)
    trace, correct = traced(Detour(), x, y)
    assert trace.fooled_any().all() and correct.all()
    items = by_name(indicators.attack_indicators("pgd", trace, correct))
    assert items["silent success"]["status"] == "FLAG" and items["silent success"]["numbers"]["silent"] == 6
    # the FLAG names its test: 6 of 6 against a share of 0.5 %, p = 0.005^6
    assert "exact one-sided binomial test at level 0.05, p = 1.6e-14" in items["silent success"]["message"]
    assert items["silent success"]["numbers"]["p_value"] == pytest.approx(0.005 ** 6)
    trace, correct = traced(Linear(slope=400.0, offset=-3.0), x, y)  # crosses and stays across
    items = by_name(indicators.attack_indicators("pgd", trace, correct))
    assert not correct.any() and items["silent success"]["status"] == "pass"


def test_incomplete_optimisation_fires_when_the_loss_still_climbs():
    x, y = grey(), torch.zeros(6, dtype=torch.long)
    trace, correct = traced(Linear(slope=60.0, offset=-3.0), x, y)    # small steps, never crosses
    items = by_name(indicators.attack_indicators("pgd", trace, correct))
    assert correct.all() and items["incomplete optimisation"]["status"] == "FLAG"
    trace, correct = traced(Linear(slope=60.0, offset=-3.0), x, y, step_size=EPS / 2)  # at the corner by step 2
    items = by_name(indicators.attack_indicators("pgd", trace, correct))
    assert correct.all() and items["incomplete optimisation"]["status"] == "pass"


def test_unavailable_gradients_fire_on_a_quantised_model():
    x, y = grey(), torch.zeros(6, dtype=torch.long)
    trace, correct = traced(Quantised(), x, y)
    assert by_name(indicators.attack_indicators("pgd", trace, correct))["unavailable gradients"]["status"] == "FLAG"
    trace, correct = traced(Linear(), x, y)
    assert by_name(indicators.attack_indicators("pgd", trace, correct))["unavailable gradients"]["status"] == "pass"


def test_unstable_predictions_fire_on_a_randomised_model():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 4, 4), torch.zeros(16, dtype=torch.long)
    assert indicators.unstable_predictions(Noisy(), x, y, EPS)["status"] == "FLAG"
    assert indicators.unstable_predictions(Linear(), x, y, EPS)["status"] == "pass"


def test_batch_dependence_fires_on_batch_statistics():
    x = torch.linspace(0, 1, 16).view(16, 1, 1, 1).expand(16, 3, 4, 4)  # brightness spread over the batch
    y = torch.zeros(16, dtype=torch.long)
    item = indicators.batch_dependence(BatchStats(), x, y, 16)
    assert item["status"] == "FLAG" and item["numbers"]["batch_sizes"] == [16, 8]
    assert indicators.batch_dependence(Linear(), x, y, 16)["status"] == "pass"


# ---------------------------------------------------------------- over an evaluation, in the report

def test_run_indicators_traces_our_pgds_and_reports_them(tiny_model):
    model = tiny_model(reverse_attention=True)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)  # every example clean-correct
    settings = Settings(budget=BUDGETS["small"], joint_weights=(2.0,), taus=(1.0,))
    specs, _ = select_attacks("pgd40,fgsm+p,transfer-nora,aux1-pgd-ce,joint-pgd-ce-w2,st-pgd-ce-t1",
                              attack_catalogue(settings, 10, 2), True)
    items = indicators.run_indicators(model, x, y, specs, clean=np.ones(6, bool), eps=EPS, n_examples=4,
                                      batch_size=3)
    attacks = [item["attack"] for item in items]
    # a head or a transfer surrogate is not what the model classifies: not traced
    assert attacks == [a for a in ("fgsm+p", "pgd40", "joint-pgd-ce-w2", "st-pgd-ce-t1") for _ in range(3)] + [
        "model", "model"]
    assert all(item["doc"].startswith("docs/evaluation.md#") for item in items)
    evaluation = Evaluation(y.numpy(), np.ones(6, bool), {}, [], indicators=items)
    text = "\n".join(flag_summary([], items) + checks_table([], items))
    assert "pgd40" in text and "docs/evaluation.md#" in text
    for name, meaning in indicators.MEANINGS.items():  # each meaning said once, not once per attack
        assert text.count(meaning) <= 1 and (meaning in text) == (name in {i["name"] for i in items})
    assert json_report(evaluation, [], {})["attack_failure"] == items
