"""L∞ attacks (docs/protocol.md §2): projection, step direction, per-example targeting, objectives,
model-state hygiene, and attack strength on a small undefended model trained here."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils import attacks, recipe
from utils.attacks import attack_objective, per_example_loss, pgd, random_start
from utils.evaluation.catalogue import Settings, attack_catalogue


def images(n=4, size=16, seed=0):
    """Random images with some pixels exactly at 0 and 1, so clipping to [0, 1] matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[:, 0, :4] = 0.0
    x[:, 1, :4] = 1.0
    return x


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def fgsm(model, x, y, eps):
    """The evaluation's FGSM: one PGD step of size ε from x itself (the attack catalogue's preset)."""
    return pgd(model, x, y, eps, eps, 1, loss="ce", init="none")


def assert_in_ball(x_adv, x, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


# ---------------------------------------------------------------- projection and direction

@pytest.mark.parametrize("loss", attacks.LOSSES)
def test_every_combination_stays_in_ball_and_range(tiny_model, loss):
    model = tiny_model()
    x, y = images(), torch.tensor([0, 3, 5, 9])
    eps = 0.05
    for init in attacks.INITS:
        for targeted in (False, True, torch.tensor([True, False, False, True])):
            for restarts, keep in ((1, "last"), (2, "success"), (2, "last"), (1, "success")):
                x_adv = pgd(model, x, y, eps, 0.03, 2, loss=loss, targeted=targeted, init=init,
                            restarts=restarts, keep=keep, aux_weight=float(restarts - 1), generator=gen())
                assert_in_ball(x_adv, x, eps)


def test_one_step_is_signed_gradient_step(tiny_model):
    model = tiny_model()
    x, y = images(), torch.tensor([1, 2, 3, 4])
    target = torch.tensor([7, 7, 0, 0])
    x_leaf = x.clone().requires_grad_(True)
    grad_y, = torch.autograd.grad(F.cross_entropy(model(x_leaf), y, reduction="sum"), x_leaf)
    x_leaf = x.clone().requires_grad_(True)
    grad_t, = torch.autograd.grad(F.cross_entropy(model(x_leaf), target, reduction="sum"), x_leaf)
    eps = 8 / 255
    assert torch.allclose(fgsm(model, x, y, eps), (x + eps * grad_y.sign()).clamp(0, 1))
    up = pgd(model, x, y, eps, 0.01, 1, init="none")
    assert torch.allclose(up, (x + 0.01 * grad_y.sign()).clamp(0, 1))
    down = pgd(model, x, target, eps, 0.01, 1, init="none", targeted=True)
    assert torch.allclose(down, (x - 0.01 * grad_t.sign()).clamp(0, 1))
    # a step larger than ε is projected back onto the ball
    big = pgd(model, x, y, eps, 0.5, 1, init="none")
    assert torch.allclose(big, (x + eps * grad_y.sign()).clamp(0, 1))


def test_targeted_pgd_raises_target_probability(tiny_model):
    model = tiny_model()
    x = images(6)
    with torch.no_grad():
        pred = model(x).argmax(1)
    target = (pred + 1) % 10
    x_adv = pgd(model, x, target, 0.05, 0.01, 5, targeted=True, init="none")
    with torch.no_grad():
        before = model(x).softmax(1).gather(1, target[:, None])
        after = model(x_adv).softmax(1).gather(1, target[:, None])
    assert (after > before).all()


def test_inits(tiny_model):
    model = tiny_model()
    x, y = images(), torch.tensor([0, 1, 2, 3])
    start = random_start(x, 0.05, "normal", gen())  # the training attacks' start, x + 0.001·N(0, 1)
    inner = start[:, 2]  # channel 2 is away from the clipped borders
    noise = inner - x[:, 2]
    assert 0.0007 < noise.std().item() < 0.0013 and abs(noise.mean().item()) < 2e-4
    uniform = pgd(model, x, y, 0.05, 0.01, 0, init="uniform", generator=gen())
    spread = uniform[:, 2] - x[:, 2]
    assert spread.abs().max().item() <= 0.05 + 1e-6 and spread.abs().max().item() > 0.045
    assert torch.equal(pgd(model, x, y, 0.05, 0.01, 0, init="none"), x)
    assert torch.equal(pgd(model, x, y, 0.05, 0.01, 0, init="normal", generator=gen()), start)


def test_fgsm_and_cw_are_presets_of_the_one_pgd():
    """The paper's FGSM (one step of ε from x) and C&W∞ (per-example C&W margin from a uniform
    start) are parameters of :func:`pgd`, read from the attack catalogue."""
    params = {spec.name: spec.params for spec in attack_catalogue(Settings(), 10)}
    assert {k: params["fgsm"][k] for k in ("steps", "step_size", "loss", "init")} == \
        {"steps": 1, "step_size": recipe.EPS, "loss": "ce", "init": "none"}
    assert {k: params["cw40"][k] for k in ("steps", "step_size", "loss", "init")} == \
        {"steps": 40, "step_size": recipe.STEP_SIZE, "loss": "cw", "init": "uniform"}


def test_bad_arguments(tiny_model):
    model = tiny_model()
    x, y = images(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="keep"):
        pgd(model, x, y, keep="best")
    with pytest.raises(ValueError, match="init"):
        pgd(model, x, y, init="gaussian")
    with pytest.raises(ValueError, match="unknown attack loss"):
        pgd(model, x, y, loss="hinge")


# ---------------------------------------------------------------- per-example targeting

def test_targeted_mask_equals_running_halves_separately(tiny_model):
    model = tiny_model().double()
    x = images(6).double()
    y = torch.tensor([3, 1, 4, 1, 5, 9])
    mask = torch.tensor([True, False, True, False, False, True])
    kwargs = {"eps": 0.05, "step_size": 0.01, "steps": 4, "init": "none"}
    mixed = pgd(model, x, y, targeted=mask, **kwargs)
    targeted = pgd(model, x[mask], y[mask], targeted=True, **kwargs)
    untargeted = pgd(model, x[~mask], y[~mask], targeted=False, **kwargs)
    assert torch.allclose(mixed[mask], targeted, atol=1e-12)
    assert torch.allclose(mixed[~mask], untargeted, atol=1e-12)
    assert not torch.allclose(mixed[mask], pgd(model, x, y, **kwargs)[mask])


# ---------------------------------------------------------------- objectives

def test_per_example_losses_on_hand_logits():
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0], [0.2, 2.5, 2.0, -0.5]])
    y = torch.tensor([0, 2])
    assert per_example_loss("cw", logits, y).tolist() == pytest.approx([-2.0, 0.0])
    assert per_example_loss("margin", logits, y).tolist() == pytest.approx([-2.0, 0.5])
    assert per_example_loss("dlr", logits, y).tolist() == pytest.approx([-2.0 / 2.5, 0.5 / 2.3])
    ce = [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), y.tolist())]
    assert per_example_loss("ce", logits, y).tolist() == pytest.approx(ce, rel=1e-6)
    clean = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    kl = []
    for p, row in zip(clean.tolist(), logits.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        kl.append(sum(pi * (math.log(pi) - (r - log_z)) for pi, r in zip(p, row)))
    assert per_example_loss("kl", logits, y, clean).tolist() == pytest.approx(kl, rel=1e-5)
    with pytest.raises(ValueError, match="clean"):
        per_example_loss("kl", logits, y)


def test_aux_weight_adds_the_heads_for_ra_models(tiny_model):
    model = tiny_model()
    x, y = images(), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
        heads = torch.stack([F.cross_entropy(p, y, reduction="none") for p in aux]).mean(0)
        final = F.cross_entropy(logits, y, reduction="none")
        with_p, _ = attack_objective(model, x, y, "ce", aux_weight=2.0)
        without_p, out = attack_objective(model, x, y, "ce")
    assert torch.allclose(with_p, final + 2.0 * heads, atol=1e-5)
    assert torch.allclose(without_p, final, atol=1e-6) and torch.allclose(out, logits)
    kwargs = {"eps": 0.05, "step_size": 0.01, "steps": 3, "init": "none"}
    assert not torch.equal(pgd(model, x, y, **kwargs), pgd(model, x, y, aux_weight=2.0, **kwargs))
    plain = tiny_model(reverse_attention=False)
    assert torch.equal(pgd(plain, x, y, **kwargs), pgd(plain, x, y, aux_weight=2.0, **kwargs))


def test_kl_attack_measures_against_clean_probabilities(tiny_model, monkeypatch):
    model = tiny_model()
    x, y = images(), torch.tensor([0, 1, 2, 3])
    seen = []
    original = attacks.per_example_loss

    def spy(name, logits, labels, clean_probs=None):
        seen.append(clean_probs)
        return original(name, logits, labels, clean_probs)

    monkeypatch.setattr(attacks, "per_example_loss", spy)
    pgd(model, x, y, 0.05, 0.01, 3, loss="kl", init="uniform", aux_weight=1.0, generator=gen())
    with torch.no_grad():
        logits, aux = model(x, return_aux=True)
        clean = [F.softmax(o, 1) for o in [logits, *aux]]
    assert len(seen) == 3 * 3  # 3 steps × (final + 2 heads)
    for k, probs in enumerate(seen):
        assert torch.allclose(probs, clean[k % 3], atol=1e-6)


def test_kl_attack_moves_away_from_clean_prediction():
    torch.manual_seed(0)
    model = nn.Sequential(Center(), nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)).eval()
    x, y = images(), torch.tensor([0, 1, 2, 3])
    x_adv = pgd(model, x, y, 0.05, 0.01, 3, loss="kl", init="uniform", generator=gen())
    start = pgd(model, x, y, 0.05, 0.01, 0, loss="kl", init="uniform", generator=gen())
    with torch.no_grad():
        clean = F.softmax(model(x), 1)

    def kl_to_clean(z):
        with torch.no_grad():
            return (clean * (clean.log() - F.log_softmax(model(z), 1))).sum(1)

    assert (kl_to_clean(start) > 0).all()
    assert (kl_to_clean(x_adv) > 2 * kl_to_clean(start)).all()


# ---------------------------------------------------------------- model state

def _state(model):
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return ([p.requires_grad for p in model.parameters()], grads,
            {k: v.clone() for k, v in model.state_dict().items()}, model.training)


def _assert_same_state(model, before):
    flags, grads, tensors, training = _state(model)
    assert flags == before[0] and training == before[3]
    assert all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in zip(grads, before[1]))
    assert all(torch.equal(tensors[k], before[2][k]) for k in tensors)  # BN stats: attacks ran in eval mode


def test_attacks_leave_the_model_as_found(tiny_model):
    model = tiny_model().train()
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = _state(model)
    modes = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    x, y = images(), torch.tensor([0, 1, 2, 3])
    pgd(model, x, y, 0.05, 0.01, 2, aux_weight=2.0, loss="kl", generator=gen())
    pgd(model, x, y, 0.05, 0.01, 2, keep="success", restarts=2, generator=gen())
    fgsm(model, x, y, 8 / 255)
    pgd(model, x, y, 0.05, 0.01, 2, loss="cw", init="uniform", generator=gen())
    assert modes and not any(modes)
    _assert_same_state(model, before)


def test_model_restored_when_attack_raises_midway(tiny_model):
    model = tiny_model().train()
    model.bn1.weight.requires_grad_(False)
    before = _state(model)
    calls = []

    def boom(module, inputs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, images(), torch.tensor([0, 1, 2, 3]), 0.05, 0.01, 5)
    handle.remove()
    _assert_same_state(model, before)


# ---------------------------------------------------------------- attack strength (trained model)

class Center(nn.Module):
    def forward(self, x):
        return (x - 0.5) * 10


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained (undefended) on 4 noisy class templates, 3×16×16; ~100 % clean."""
    g = torch.Generator().manual_seed(0)
    templates = 0.5 + 0.09 * torch.randn(4, 3, 16, 16, generator=g).sign()

    def sample(n):
        y = torch.randint(0, 4, (n,), generator=g)
        return (templates[y] + 0.08 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1), y

    x_train, y_train = sample(400)
    x_test, y_test = sample(200)
    torch.manual_seed(0)
    net = nn.Sequential(Center(), nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(512, 4))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(5):
        order = torch.randperm(400)
        for i in range(0, 400, 50):
            idx = order[i:i + 50]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval(), x_test, y_test


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_pgd_breaks_undefended_model_fgsm_less(trained):
    net, x, y = trained
    eps = 8 / 255
    clean = accuracy(net, x, y)
    robust = accuracy(net, pgd(net, x, y, eps, 0.007, 40, init="uniform", generator=gen()), y)
    one_step = accuracy(net, fgsm(net, x, y, eps), y)
    assert clean >= 0.95
    assert robust <= 0.08
    assert one_step >= robust + 0.1


@pytest.mark.slow
def test_success_and_restarts_never_raise_accuracy(trained):
    net, x, y = trained
    kwargs = {"eps": 6 / 255, "step_size": 0.03, "steps": 6, "init": "uniform"}  # large steps: iterates bounce
    last = pgd(net, x, y, generator=gen(), **kwargs)
    success = pgd(net, x, y, keep="success", generator=gen(), **kwargs)
    restarts = pgd(net, x, y, restarts=3, generator=gen(), **kwargs)
    acc_last = accuracy(net, last, y)
    assert 0.1 < acc_last < 0.9  # an attack of intermediate strength, so the comparison means something
    assert accuracy(net, success, y) <= acc_last
    assert accuracy(net, restarts, y) <= acc_last
    with torch.no_grad():
        fooled_last, fooled_success, fooled_restarts = (net(z).argmax(1) != y for z in (last, success, restarts))
    assert (fooled_success >= fooled_last).all() and (fooled_restarts >= fooled_last).all()  # per example
    assert torch.equal(restarts[fooled_last], last[fooled_last])  # first restart = same noise = kept
    assert torch.equal(success[~fooled_success], last[~fooled_success])  # never fooled: the last iterate
    for x_adv in (success, restarts):
        assert_in_ball(x_adv, x, 6 / 255)
