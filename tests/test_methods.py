"""The method registry: names parsed and formatted in one place, labels, CLI choices and the
benchmark derived from it, and a new method added from a test file that trains for a step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.train_step import parse_method
from train_baselines import DEFAULTS as BASELINES
from utils.analysis.features import METHOD_NAMES
from utils.analysis.features import method_label as feature_label
from utils.training import ancra
from utils.training.ancra import (
    Method,
    TrainStep,
    format_method_name,
    get_method,
    method_label,
    method_names,
    parse_method_name,
    ra_form,
    register_method,
)
from utils.training.cli import build_parser
from utils.training.config import MethodConfig
from utils.training.errors import ConfigError
from utils.training.schedule import Schedule, build_optimizer


def test_the_four_methods_and_their_settings():
    assert method_names() == ("standard", "pgd-at", "trades", "mart")
    assert [get_method(m).default_beta for m in ("trades", "mart")] == [6.0, 5.0]
    assert get_method("trades").attack_loss(False, False) == "kl"  # vanilla TRADES: its KL attack
    assert {get_method("trades").attack_loss(anc, ra) for anc, ra in [(1, 1), (1, 0), (0, 1)]} == {"ce"}
    assert get_method("pgd_at").name == "pgd-at" and not get_method("standard").attacked


@pytest.mark.parametrize("name, parsed", [
    ("trades-ancra", ("trades", True, True)), ("trades-anc", ("trades", True, False)),
    ("trades-ra", ("trades", False, True)), ("pgd-at", ("pgd-at", False, False)),
    ("mart-ancra", ("mart", True, True)), ("standard-ra", ("standard", False, True)),
])
def test_names_parse_and_format_in_one_place(name, parsed):
    assert parse_method_name(name) == parsed
    assert format_method_name(*parsed) == name


@pytest.mark.parametrize("bad", ["trades-ancr", "fgsm-at", "standard-anc", ""])
def test_unknown_names_are_one_sentence(bad):
    with pytest.raises(ConfigError, match="e.g. trades-ancra"):
        parse_method_name(bad)


def test_labels_come_from_the_registry():
    assert method_label("pgd-at", True, True) == "PGD-AT-ANCRA" and method_label("standard", False, False) == "Standard"
    assert METHOD_NAMES == {"standard": "Standard", "pgd-at": "PGD-AT", "trades": "TRADES", "mart": "MART"}
    assert feature_label({"method": "pgd_at_anc"}) == "PGD-AT-ANC"


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so the toy method does not outlive the test."""
    monkeypatch.setattr(ancra, "_REGISTRY", dict(ancra._REGISTRY))


def test_a_new_method_added_from_a_test_file_trains_for_one_step(registry):
    @register_method
    class LogitPairing(Method):
        """Toy: ``CE(x_a, y) + β·mean_i ‖f(x_i) − f(x_a,i)‖²`` (adversarial logit pairing)."""

        name, label, default_beta = "toy-alp", "ALP", 0.5

        def loss(self, out, y, *, beta, aux_weight):
            ce = ra_form(lambda a: F.cross_entropy(a.float(), y), out["adv"], aux_weight=aux_weight)
            pair = ra_form(lambda n, a: (n - a).pow(2).sum(1).mean(), out["nat"], out["adv"], aux_weight=aux_weight)
            return ce + beta * pair, {"ce_adv": ce.detach(), "pair": pair.detach()}

    assert "toy-alp" in method_names() and parse_method_name("toy-alp-anc") == ("toy-alp", True, False)
    parser = build_parser(BASELINES)
    assert "toy-alp" in "".join(parser.format_help().split())  # listed in --method's help (wrapped text)
    assert parser.parse_args(["--method", "toy-alp-anc"]).method == "toy-alp-anc"
    torch.manual_seed(0)
    model, lr = TinyNet(), 0.1
    initial = TinyNet()
    initial.load_state_dict(model.state_dict())
    step = TrainStep(model, build_optimizer(model, Schedule(lr=lr, weight_decay=0.0)),
                     MethodConfig("toy-alp", anc=False, ra=False, attack_steps=2), num_classes=3)
    seen = {}
    real_examples = step.examples
    step.examples = lambda *args: seen.setdefault("xy", real_examples(*args))
    x, y = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    metrics = step(x, y, epoch=1)

    x_adv = seen["xy"][0]
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(x_adv, x)
    want = F.cross_entropy(initial(x_adv), y) + 0.5 * (initial(x) - initial(x_adv)).pow(2).sum(1).mean()
    assert metrics["loss"].item() == pytest.approx(want.item(), rel=1e-5)
    grads = torch.autograd.grad(want, list(initial.parameters()))
    for p, p0, g in zip(model.parameters(), initial.parameters(), grads):  # first SGD step: w − lr·g
        torch.testing.assert_close(p.detach(), (p0 - lr * g).detach(), rtol=1e-5, atol=1e-6)


def test_benchmark_parses_names_through_the_registry(registry):
    assert parse_method("standard") == {"method": "standard", "anc": False, "ra": False}
    with pytest.raises(SystemExit, match="unknown method 'foo-ra'"):
        parse_method("foo-ra")
