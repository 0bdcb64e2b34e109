"""Any model (a plain nn.Module defined here) through the API and the CLI, the reference
protocol's batch-summed C&W, bf16 attacks judged in fp32, and AutoAttack on channels-last input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import test_white_attack
from utils import data as datasets
from utils.attacks import pgd
from utils.evaluation.adaptive import pgd_judged_on_model
from utils.evaluation.autoattack_adapter import run_autoattack
from utils.evaluation.catalogue import REFERENCE_LABEL
from utils.evaluation.context import AttackContext, batch_context
from utils.evaluation.suite import (
    BUDGETS,
    Settings,
    attack_catalogue,
    evaluate_model,
    select_attacks,
)

EPS = 8 / 255


class PlainNet(nn.Module):
    """A small CNN mapping [0, 1] images to 10 logits, with no RA heads (a foreign model)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def build_plain():
    """The factory the CLI test imports by path."""
    torch.manual_seed(0)
    return PlainNet()


def test_api_evaluates_any_module_and_skips_ra_attacks():
    model = build_plain()
    x, y = torch.rand(12, 3, 16, 16), torch.arange(12) % 10
    evaluation = evaluate_model(model, x, y, "fgsm,fgsm+p,pgd10,transfer-nora", EPS, budget="small")
    assert [r.name for r in evaluation.results] == ["fgsm", "pgd10"]
    assert evaluation.skipped == ["fgsm+p", "transfer-nora"]
    assert evaluation.meta["reverse_attention"] is False and evaluation.meta["batch_size"] == 12
    assert "fixed 128" in evaluation.meta["batch_size_note"]
    with torch.no_grad():
        assert np.array_equal(evaluation.clean, (model(x).argmax(1) == y).numpy())
    text = evaluation.markdown()
    assert "Not applicable to a model without RA heads (skipped): fgsm+p, transfer-nora." in text
    assert json.loads(json.dumps(evaluation.to_json()))["worst_case"]["over"] == ["fgsm", "pgd10"]


def test_cli_evaluates_a_model_factory_with_weights(tmp_path, capsys):
    trained = PlainNet()
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    factory = f"{__file__}:build_plain"
    argv = ["--model-factory", factory, "--dataset", "synthetic", "--n-examples", "6", "--attacks", "fgsm,pgd10",
            "--budget", "small", "--quiet", "--device", "cpu"]
    assert test_white_attack.main([*argv, "--weights", str(tmp_path / "w.pt"), "--out-dir", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "results.json").read_text())
    assert report["meta"]["arch"] == "PlainNet" and report["meta"]["reverse_attention"] is False
    test = datasets.load_dataset("synthetic", split="test").subset(report["meta"]["indices"])
    with torch.no_grad():
        assert report["clean"]["correct"] == (trained(test.float()).argmax(1) == test.y).int().tolist()
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    assert test_white_attack.main([*argv, "--weights", str(tmp_path / "bad.pt"), "--out-dir", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "do not fit the module" in err and not (tmp_path / "f").exists()


# ---------------------------------------------------------------- the reference protocol

def test_reference_cw_sums_the_margin_over_the_batch_before_the_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.rand(4, 3, 2, 2)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmin(1)
    y[3] = logits[3].argmax()  # three wrong examples, one right: the summed margin is negative from the start
    ctx = batch_context(5, 4)
    start = (x + (2 * ctx.uniform(x) - 1) * EPS).clamp(0, 1)

    def margins(z):
        return z.gather(1, y[:, None])[:, 0] - z.masked_fill(F.one_hot(y, 3).bool(), float("-inf")).amax(1)

    def transcription(x_adv, steps=20, step=0.007):  # the reference script's loss, written out
        for _ in range(steps):
            x_adv = x_adv.clone().requires_grad_(True)
            loss = -F.relu(margins(model(x_adv)).sum())
            grad, = torch.autograd.grad(loss, x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
        return x_adv

    with torch.no_grad():
        assert margins(model(start)).sum() < 0 < margins(model(start))[3]
    ours = pgd(model, x, y, EPS, 0.007, 20, loss="cw-batchsum", start=start)
    assert torch.allclose(ours, transcription(start), atol=1e-6)
    assert torch.equal(ours, start)                                   # the gradient vanished for every example
    per_example = pgd(model, x, y, EPS, 0.007, 20, loss="cw", start=start)
    assert not torch.equal(per_example, ours)
    spec = next(s for s in attack_catalogue(Settings(), 3) if s.name == "ref-cw20")
    outcome = spec.run(model, x, y, ctx)
    expected = transcription(start)
    with torch.no_grad():
        assert torch.equal(outcome.last, model(expected).argmax(1) == y)


def test_reference_preset_is_separate_and_labelled():
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10, 2)
    names = [s.name for s in select_attacks("reference", catalogue, True)[0]]
    assert names == ["ref-fgsm", "ref-cw20"]
    assert not {"ref-fgsm", "ref-cw20"} & {s.name for s in select_attacks("all", catalogue, True)[0]}
    fgsm = next(s for s in catalogue if s.name == "ref-fgsm")
    assert (fgsm.params["init"], fgsm.params["steps"], fgsm.params["step_size"]) == ("uniform", 1, EPS)
    assert all(REFERENCE_LABEL in s.notes and not s.in_threat_model(EPS) for s in catalogue if s.reference)


# ---------------------------------------------------------------- bf16 stays an upper bound

class NearTie(nn.Module):
    """Logits (1, 1.001): fp32 predicts class 1; bf16 rounds both to 1 and predicts class 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor([1.0, 1.001]))

    def forward(self, x):
        return self.fc(x.flatten(1)[:, :4])


def test_bf16_attacks_never_count_a_rounding_error_as_a_break():
    model = NearTie().eval()
    x, y = torch.rand(3, 1, 2, 2), torch.ones(3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x).argmax(1) == 0).all()                     # bf16 alone would call every example broken
    for bf16 in (False, True):
        ctx = AttackContext(0, torch.arange(3), bf16=bf16)
        correct, last = pgd_judged_on_model(model, model, x, y, ctx, eps=EPS, steps=3, step_size=0.01)
        assert correct.all() and last.all()


@pytest.mark.slow
def test_autoattack_takes_channels_last_input():
    torch.manual_seed(0)
    model = PlainNet().eval()
    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = model(x).argmax(1)
    x_adv, _, info = run_autoattack(model, x, y, 1e-4, num_classes=10)
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 1e-4 + 1e-6 and "final" in info["accuracies"]


def test_an_attack_registered_from_outside_joins_presets_cascade_and_sanity_checks():
    """A new attack is one AttackSpec from a registered factory: no library file is edited, and
    because it sees the final logits the sanity checks and the worst case include it."""
    from utils.evaluation.catalogue import COST_FINAL_PGD, AttackSpec, register_attacks, unregister_attacks
    from utils.evaluation.results import Outcome

    def flip_all(model, x, y, ctx):  # "breaks" every example it receives: easy to see in the worst case
        return Outcome(torch.zeros_like(y, dtype=torch.bool))

    def factory(settings, num_classes, num_heads):
        return [AttackSpec("toy-flip", "toy", ("adaptive",), flip_all, {"eps": settings.eps}, "final", settings.eps,
                           cost=COST_FINAL_PGD)]

    register_attacks(factory)
    try:
        model = build_plain()
        x, y = datasets.make_synthetic("test", 16, 16, seed=1).float(), datasets.make_synthetic("test", 16, 16, seed=1).y
        catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10, 0)
        assert "toy-flip" in [s.name for s in select_attacks("adaptive", catalogue, False)[0]]
        evaluation = evaluate_model(model, x, y, "fgsm,toy-flip", EPS, budget="small", batch_size=8, device="cpu")
        assert "toy-flip" in [r.name for r in evaluation.worst_case_results()]
        assert evaluation.worst_case().sum() == 0  # the toy attack broke every survivor
    finally:
        unregister_attacks(factory)
    assert "toy-flip" not in [s.name for s in attack_catalogue(Settings(), 10, 0)]


def build_for_8px():
    """A factory model for 8×8 inputs: the synthetic test images are 32×32."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))


def test_factory_model_of_the_wrong_input_size_is_one_sentence(tmp_path, capsys):
    argv = ["--model-factory", f"{__file__}:build_for_8px", "--dataset", "synthetic", "--n-examples", "4",
            "--attacks", "fgsm", "--quiet", "--device", "cpu", "--out-dir", str(tmp_path / "e")]
    assert test_white_attack.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot classify this dataset's 3×32×32" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
