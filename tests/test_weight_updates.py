"""The weight-update hook: AWP (perturb, restore exactly, update = hand-computed) and EMA
(closed form, checkpoint format, resume), alone and through the training scripts."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model, load_model
from train_CIFAR10_WideResNet import DEFAULTS as WRN
from utils import data
from utils.training.ancra import TrainStep, WeightUpdate
from utils.training.cli import SMOKE_DEFAULTS, main
from utils.training.config import TrainConfig
from utils.training.fast import FastStep
from utils.training.monitor import monitor_accuracy
from utils.training.records import RunInfo
from utils.training.schedule import build_optimizer, build_scheduler
from utils.training.trainer import Trainer
from utils.training.updates import AWP, EMA, build_update

REPO = Path(__file__).resolve().parents[1]
SMALL_WRN = ["--smoke", "--depth", "16", "--widen", "1", "--quiet"]
# optimizer steps (and EMA updates) of a whole smoke run: epochs x batches per epoch
SMOKE_STEPS = SMOKE_DEFAULTS["epochs"] * (SMOKE_DEFAULTS["train_size"] // SMOKE_DEFAULTS["batch_size"])


def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=generator), torch.tensor([0, 1, 1, 0, 1])


def ce_closure(x, y):
    return lambda model: (F.cross_entropy(model(x), y), {})


def hand_loss(w1, b1, w2, b2, x, y):
    """The 2-layer net written out: CE(W2·relu(W1·x + b1) + b2, y)."""
    return F.cross_entropy(torch.relu(x @ w1.T + b1) @ w2.T + b2, y)


def test_awp_update_equals_the_hand_computed_one():
    model, (x, y) = two_layer(), batch()
    gamma, lr = 0.3, 0.5
    w1, b1, w2, b2 = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    # one ascent direction per weight matrix (biases are 1-d: never perturbed), scaled to γ·‖W‖
    g1, g2 = torch.autograd.grad(hand_loss(w1, b1, w2, b2, x, y), [w1, w2])
    v1 = gamma * w1.norm() * g1 / g1.norm()
    v2 = gamma * w2.norm() * g2 / g2.norm()
    at_perturbed = [t.detach().clone().requires_grad_(True) for t in (w1 + v1, b1, w2 + v2, b2)]
    grads = torch.autograd.grad(hand_loss(*at_perturbed, x, y), at_perturbed)
    expected = [p - lr * g for p, g in zip((w1, b1, w2, b2), grads)]  # SGD from the unperturbed weights

    update = WeightUpdate(torch.optim.SGD(model.parameters(), lr=lr), [AWP(gamma, warmup=0)])
    update(model, ce_closure(x, y), epoch=1)
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


class NoStep(torch.optim.SGD):
    """An optimizer that computes gradients but never moves the weights."""

    def step(self, closure=None):
        return None


def test_awp_restores_the_weights_bit_for_bit_and_computes_the_loss_perturbed():
    model, (x, y) = two_layer(), batch()
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def closure(m):
        seen.append([p.detach().clone() for p in m.parameters()])
        return F.cross_entropy(m(x), y), {}

    WeightUpdate(NoStep(model.parameters(), lr=0.1), [AWP(0.01)])(model, closure, epoch=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    proxy_call, training_call = seen  # first on the proxy (unperturbed), then on the perturbed model
    assert all(torch.equal(a, b) for a, b in zip(before, proxy_call))
    moved = [not torch.equal(a, b) for a, b in zip(before, training_call)]
    assert moved == [True, False, True, False]  # the two weight matrices, not the biases
    assert (training_call[0] - before[0]).norm() == pytest.approx(0.01 * before[0].norm().item(), rel=1e-5)


def test_awp_is_off_during_its_warmup():
    (x, y) = batch()
    plain, perturbed = two_layer(), two_layer()
    WeightUpdate(torch.optim.SGD(plain.parameters(), lr=0.5))(plain, ce_closure(x, y), epoch=3)
    WeightUpdate(torch.optim.SGD(perturbed.parameters(), lr=0.5), [AWP(0.3, warmup=3)])(
        perturbed, ce_closure(x, y), epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), perturbed.parameters()))


def test_awp_with_an_ancra_step_on_an_ra_model_restores_every_parameter():
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, reverse_attention=True)
    optimizer = NoStep(model.parameters(), lr=0.1)
    update = WeightUpdate(optimizer, [AWP(0.01)])
    step = TrainStep(model, optimizer, TrainConfig(method="mart", anc=True, attack_steps=1), 10, update=update)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    pair = data.make_synthetic("train", 8, 8, seed=0)
    metrics = step(pair.float(), pair.y, epoch=1)
    assert {"bce_adv", "kl", "anc"} <= set(metrics)
    assert all(torch.equal(before[k], p) for k, p in model.named_parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ema_equals_the_closed_form_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    decay, k = 0.9, 4
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay)
    update = WeightUpdate(torch.optim.SGD(model.parameters(), lr=0.3), [ema])
    history = []
    for i in range(k):
        update(model, ce_closure(*batch(i)), epoch=1)
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, initial in start.items():  # ema_k = d^k·w_0 + (1 − d)·Σ_i d^(k−i)·w_i
        want = decay ** k * initial + sum((1 - decay) * decay ** (k - i) * history[i - 1][name]
                                              for i in range(1, k + 1))
        torch.testing.assert_close(ema.state[name], want, rtol=1e-5, atol=1e-6)
    for name, buffer in model.named_buffers():
        assert torch.equal(ema.state[name], buffer)
    assert ema.state_dict()["updates"] == k and ema.state_dict()["decay"] == decay


def _trainer(tmp_path, ema_decay):
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, reverse_attention=False)
    config = TrainConfig(method="pgd-at", anc=False, ra=False, attack_steps=1, lr=0.05, weight_decay=2e-4,
                         milestones=(5,), epochs=1, eval_steps=2, quiet=True)
    optimizer = build_optimizer(model, config)
    update = build_update(optimizer, model, ema_decay=ema_decay)
    step = FastStep(TrainStep(model, optimizer, config, 10, update=update))
    train = data.make_synthetic("train", 32, 8, seed=0)
    test = data.BatchLoader(data.make_synthetic("test", 16, 8, seed=0), 16, shuffle=False, augment=False)
    return Trainer(step, build_scheduler(optimizer, config), data.BatchLoader(train, 16, shuffle=True, augment=False),
                   {"test": test}, RunInfo(tmp_path, {}, {"arch": "wrn-16-1", "num_classes": 10,
                                                          "reverse_attention": False, "image_size": 8}),
                   config), test


def test_ema_weights_are_checked_each_epoch_and_saved_in_the_loadable_format(tmp_path):
    trainer, test = _trainer(tmp_path, ema_decay=0.5)
    record = trainer.fit()[-1]
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert set(payload["ema"]) == {"decay", "updates", "state_dict"}
    assert payload["ema"]["decay"] == 0.5 and payload["ema"]["updates"] == 2
    assert payload["ema"]["state_dict"].keys() == payload["model"].keys()
    assert any(not torch.equal(payload["ema"]["state_dict"][k], payload["model"][k]) for k in payload["model"])
    averaged, config = load_model(payload)
    assert config["weights"] == "ema"
    assert record["eval_weights"] == "ema"
    assert record["test"] == monitor_accuracy(averaged, test, TrainConfig(eval_steps=2))


@pytest.mark.slow
def test_awp_and_ema_runs_resume_bit_exactly(tmp_path):
    options = SMALL_WRN + ["--awp-gamma", "0.01", "--awp-warmup", "0", "--ema", "0.9", "--out-dir", str(tmp_path)]
    assert main(WRN, [*options, "--run-name", "straight"]) == 0
    assert main(WRN, [*options, "--run-name", "split", "--epochs", "1"]) == 0
    assert main(WRN, ["--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
        assert torch.equal(straight["ema"]["state_dict"][key], resumed["ema"]["state_dict"][key]), key
    assert straight["ema"]["updates"] == resumed["ema"]["updates"] == SMOKE_STEPS


@pytest.mark.slow
def test_resnet_smoke_with_awp_and_ema(tmp_path):
    result = subprocess.run([sys.executable, "train_CIFAR10_ResNet.py", "--awp-gamma", "0.005", "--ema", "0.999",
                             "--smoke", "--quiet", "--out-dir", str(tmp_path)],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    # its own folder, never the plain smoke run's (the documented AWP command replaced the demo run)
    payload = torch.load(tmp_path / "smoke_synthetic_resnet18_trades-ancra_awp0.005_ema0.999_s0" / "last.pt",
                         weights_only=True)
    assert payload["ema"]["decay"] == 0.999 and payload["ema"]["updates"] == SMOKE_STEPS
    assert (payload["args"]["awp_gamma"], payload["args"]["awp_warmup"]) == (0.005, 0)  # AWP on from epoch 1
