"""The compiled training step (--compile: utils/training/fast.py compiles the step's two pure
functions from outside) computes what the eager step computes: the same adversarial examples,
negatives, losses and updated weights for every method with and without ANC/RA, with AWP and EMA;
no graph breaks (so no host synchronisation inside); no compilation after the first epoch, whose
partial last batch runs eagerly.

CPU compilation is slow (seconds per graph on a shared 2-core machine), so the tests use a tiny
conv net with BatchNorm and the ``eager`` / ``aot_eager`` backends; one test uses inductor."""
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from toys import ToyRA
from utils import data
from utils.attacks import attack_mode, pgd, pgd_steps, random_start
from utils.training.ancra import TrainStep, negative_scores, random_negatives
from utils.training.config import TrainConfig
from utils.training.fast import FastPath, FastStep, compile_mode, graphs_compiled
from utils.training.records import RunInfo
from utils.training.trainer import Trainer
from utils.training.updates import build_update

CLASSES = 5


class Toy(ToyRA):
    """Conv stem with BatchNorm (a buffer the training forward mutates), two RA conv blocks."""

    def __init__(self, reverse_attention=True, width=4):
        super().__init__()
        self.reverse_attention = reverse_attention
        self.stem = nn.Conv2d(3, width, 3, 2, 1)
        self.bn = nn.BatchNorm2d(width)
        self.blocks = nn.ModuleList([nn.Conv2d(width, width, 3, 1, 1) for _ in range(2)])
        self.fc = nn.Linear(width, CLASSES)

    def forward_trunk(self, x):
        return F.relu(self.bn(self.stem(x)))

    def pool(self, z):
        return z.mean((2, 3))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (dynamo's caches and counters are per process)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _build(speed, method="trades", anc=True, ra=True, strategy="random_adv", awp=0.0, ema=0.0):
    torch.manual_seed(0)
    model = Toy(ra)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    update = build_update(optimizer, model, awp_gamma=awp, ema_decay=ema)
    options = {k: v for k, v in speed.items() if k != "backend"}
    config = TrainConfig(method=method, anc=anc, ra=ra, strategy=strategy, attack_steps=2, **options).on("cpu")
    return FastStep(TrainStep(model, optimizer, config, CLASSES, update), config, backend=speed["backend"])


def _trace(speed, steps=2, epoch=1, **kwargs):
    """Two steps on one batch: each step's (x_adv, negatives), metrics, and the final state."""
    step = _build(speed, **kwargs)
    seen, loss = [], step.step.loss

    def spy(model, x, y, x_adv, neg):
        if model is step.model:  # not AWP's proxy copy
            seen.append((x_adv.clone(), None if neg is None else [t.clone() for t in neg]))
        return loss(model, x, y, x_adv, neg)

    step.step.loss = spy
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(1)
    metrics = [step(x, y, epoch) for _ in range(steps)]
    state = [p.detach().clone() for p in step.model.parameters()] + [b.clone() for b in step.model.buffers()]
    return seen, metrics, state, step.update.state_dict()


def _assert_close(a, b, atol=1e-5):
    if torch.is_tensor(a):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=atol)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_close(u, v, atol)
    else:
        assert a == b


def _compiled_without_breaks(at_least):
    assert graphs_compiled() >= at_least, "the step ran without compiling (dynamo fell back to eager)"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


EAGER = {"backend": "inductor"}  # the compile backend and the record's speed options
TRACED = {"backend": "eager", "compile": True}  # dynamo's capture, run by the eager kernels
AOT = {"backend": "aot_eager", "compile": True}  # plus AOT autograd's forward/backward graphs


@pytest.mark.slow
@pytest.mark.parametrize("ra", [True, False], ids=["ra", "plain"])
@pytest.mark.parametrize("anc", [True, False], ids=["anc", "no-anc"])
@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart"])
def test_compiled_step_gives_the_eager_step(method, anc, ra):
    """Same x_adv, negatives, metrics and weights (vanilla TRADES: its KL attack) in one graph each."""
    expected = _trace(EAGER, method=method, anc=anc, ra=ra)
    got = _trace(TRACED, method=method, anc=anc, ra=ra)
    _compiled_without_breaks(2)
    _assert_close(expected, got)


@pytest.mark.slow
def test_compiled_step_with_awp_ema_and_a_logit_rule_gives_the_eager_step():
    """AOT autograd's graphs, AWP's proxy loss (a second module through the compiled loss), EMA,
    the separate attack batches and a negative rule ranking by eval-mode logits (after warm-up)."""
    kwargs = {"method": "trades", "strategy": "hard_adv", "epoch": 11, "awp": 5e-3, "ema": 0.9}
    separate = lambda speed: {**speed, "joint_attacks": False}
    _assert_close(_trace(separate(EAGER), **kwargs), _trace(separate(AOT), **kwargs))
    _compiled_without_breaks(2)  # examples, the loss (newer torch reuses its graph for AWP's proxy module)


def test_the_comparison_is_sharp():
    """A different draw (one more random number before the step) fails the comparison above."""
    expected = _trace(EAGER, steps=1)
    torch.manual_seed(1)
    step = _build(EAGER)
    x, y = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(1)
    torch.rand(1)
    metrics = step(x, y, 1)
    with pytest.raises(AssertionError):
        _assert_close(expected[1][0], metrics)


def test_pre_drawn_randomness_is_the_randomness_the_attacks_draw():
    """The step draws its numbers first; the starts and the negative choice they give are the
    ones the attack functions draw themselves from the same RNG state."""
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 1, 2, 3, 3])
    draw = lambda: torch.Generator().manual_seed(7)
    g = draw()
    pre_drawn = torch.randn(x.shape, generator=g)
    assert torch.equal(random_start(x, 0.03, "normal", draw()), random_start(x, 0.03, "normal", normal=pre_drawn))
    index, valid = random_negatives(y, CLASSES, draw())
    pre_index, pre_valid = random_negatives(y, CLASSES, scores=negative_scores(6, CLASSES, "cpu", draw()))
    assert torch.equal(index, pre_index) and torch.equal(valid, pre_valid)


def test_the_training_attack_is_pgd_from_the_same_start():
    """The step's attack call (the PGD loop with the model already in attack mode) gives pgd()."""
    torch.manual_seed(0)
    model = Toy().eval()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    start = random_start(x, 8 / 255, "normal")
    targeted = torch.tensor([False, True] * 3)
    expected = pgd(model, x, y, 8 / 255, 2 / 255, 3, targeted=targeted, start=start, aux_weight=0.5)
    with attack_mode(model):
        got, _, _ = pgd_steps(model, x, y, start, 8 / 255, 2 / 255, 3, targeted=targeted, aux_weight=0.5)
    assert torch.equal(expected, got)
    assert not torch.equal(got, start) and (got - x).abs().max() <= 8 / 255 + 1e-6


def test_fast_path_fixes_the_batch_size_at_the_first_batch():
    fast = FastPath("eager")
    assert fast.takes(torch.zeros(8, 3)) and fast.takes(torch.zeros(8, 3))
    assert not fast.takes(torch.zeros(4, 3))  # the epoch's partial last batch: eager
    assert compile_mode("cuda") == "reduce-overhead" and compile_mode("cpu") is None
    assert fast.take_seconds() == 0.0


def _fit(speed, epochs, trainer=None):
    """A Trainer over 20 examples in batches of 8 (8, 8, then a partial 4), PGD-AT-ANC."""
    if trainer is None:
        torch.manual_seed(0)
        model = Toy(reverse_attention=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        config = TrainConfig(method="pgd-at", anc=True, ra=False, attack_steps=1, epochs=epochs,
                             eval_steps=1, quiet=True, compile=speed.get("compile", False)).on("cpu")
        step = FastStep(TrainStep(model, optimizer, config, CLASSES), config, backend=speed["backend"])
        train = data.TensorPair((torch.rand(20, 3, 8, 8) * 255).to(torch.uint8), torch.arange(20) % CLASSES, [])
        test = data.TensorPair((torch.rand(6, 3, 8, 8) * 255).to(torch.uint8), torch.arange(6) % CLASSES, [])
        trainer = Trainer(step, torch.optim.lr_scheduler.StepLR(optimizer, 1), data.BatchLoader(train, 8, shuffle=True,
                          augment=False), {"test": data.BatchLoader(test, 6, shuffle=False, augment=False)},
                          RunInfo(None, {}, {}), config)
        trainer.fit()
    else:
        trainer.epochs = epochs
        trainer.fit(trainer.completed_epochs + 1)
    return trainer


@pytest.mark.slow
def test_second_epoch_compiles_nothing_and_the_first_records_the_compile_time(monkeypatch, capsys):
    trainer = _fit(TRACED, 1)
    graphs = graphs_compiled()
    _compiled_without_breaks(2)
    assert trainer.records[0]["compile_seconds"] > 0
    assert "compiled the training step in" in capsys.readouterr().out
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    _fit(TRACED, 2, trainer)
    assert graphs_compiled() == graphs  # the partial batches ran eagerly, the full ones replayed
    assert "compile_seconds" not in trainer.records[1]
    eager = _fit(EAGER, 2)
    _assert_close([r["train"] for r in eager.records], [r["train"] for r in trainer.records])
    _assert_close(list(eager.model.parameters()), list(trainer.model.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C compiler")
def test_inductor_compiled_step_gives_the_eager_step():
    """The real backend (fused kernels, other summation orders): the same step to float rounding."""
    kwargs = {"steps": 1, "method": "pgd-at", "anc": False, "ra": False}  # the smallest graphs: minutes of C++ builds
    expected = _trace(EAGER, **kwargs)
    got = _trace({"backend": "inductor", "compile": True}, **kwargs)
    _compiled_without_breaks(2)
    _assert_close(expected, got, atol=1e-4)
