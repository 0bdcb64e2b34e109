"""Robust accuracy against ε (Carlini et al. 2019; docs/evaluation.md#robust-accuracy-against-ε): parsing,
the curves and their checks on hand numbers, and the whole sweep through test_white_attack.py on a
small linear model (resumable per ε, outside the headline)."""
import argparse
import json

import numpy as np
import pytest

import test_white_attack
from utils.evaluation import sweep
from utils.evaluation.results import AttackResult
from utils.evaluation.spec import AttackSpec

FACTORY = '''
import torch
from torch import nn
from utils import data


def build():
    """A linear classifier fitted for a few steps on synthetic CIFAR-size images."""
    torch.manual_seed(0)
    train = data.load_dataset("synthetic", split="train", synthetic_size=256)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(train.float()), train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
'''


def test_parse_eps_sweep_reads_pixel_units_and_default():
    assert sweep.parse_eps_sweep("0,1,2,4,8,16,32,64/255") == tuple(k / 255 for k in (0, 1, 2, 4, 8, 16, 32, 64))
    assert sweep.parse_eps_sweep("default") == sweep.DEFAULT_SWEEP
    assert sweep.parse_eps_sweep("0.03, 0.01") == (0.01, 0.03)
    assert sweep.parse_eps_sweep("2/255,16") == (2 / 255, 16 / 255)  # each value on its own: ≥ 1 is pixels
    for bad in ("8/255", "1,x", "0,300/255", "4,4/255"):
        with pytest.raises(argparse.ArgumentTypeError):
            sweep.parse_eps_sweep(bad)


def nested(accuracies, n):
    """Per-example results of a curve whose balls nest: example i is right at ε_j iff i < acc_j · n."""
    return [[i < round(acc * n) for i in range(n)] for acc in accuracies]


def test_curve_checks_flag_a_rise_and_a_high_end():
    eps, n = (0, 2 / 255, 8 / 255, 64 / 255), 1000
    curves = {"good": [0.9, 0.6, 0.2, 0.0], "rises": [0.9, 0.3, 0.5, 0.0], "stuck": [0.9, 0.6, 0.4, 0.2],
              "wiggle": [0.9, 0.5, 0.505, 0.01]}
    examples = {name: nested(values, n) for name, values in curves.items()}
    # wiggle: +0.5 % at 8/255 from 10 examples right only there against 5 right only at 2/255:
    # exact McNemar P(X >= 10 | 15, 1/2) = 4944/32768 = 0.151, noise
    at_2 = [i < 500 for i in range(n)]
    at_8 = [(i < 495) or (500 <= i < 510) for i in range(n)]
    examples["wiggle"][1:3] = [at_2, at_8]
    assert sum(at_8) == 505
    checks = {c["name"]: c for c in sweep.curve_checks(eps, curves, examples, n)}
    assert checks["good falls with ε"]["status"] == "pass"
    assert checks["good reaches ≤ 1 % at the largest ε"]["status"] == "pass"
    rises = checks["rises falls with ε"]  # 200 examples right only at 8/255, none the other way
    assert rises["status"] == "FLAG" and rises["numbers"]["rises"] == [("2/255", "8/255")]
    assert "exact one-sided McNemar test at level 0.05" in rises["message"] and "p = 6.2e-61" in rises["message"]
    assert checks["stuck reaches ≤ 1 % at the largest ε"]["status"] == "FLAG"  # 200 of 1000 above 1 %
    assert checks["wiggle falls with ε"]["status"] == "pass"
    assert checks["wiggle reaches ≤ 1 % at the largest ε"]["status"] == "pass"
    # the same +5 examples all one way (5 against 0): P = 1/32 = 0.031, beyond noise
    examples["wiggle"][1:3] = nested([0.5, 0.505], n)
    assert {c["name"]: c for c in sweep.curve_checks(eps, curves, examples, n)}["wiggle falls with ε"]["status"] == "FLAG"
    # above 1 % at the largest ε only beyond noise: 2 of 100 (P(X >= 2 | 100, 0.01) = 0.26) passes,
    # 4 of 100 (0.018) FLAGs
    for last, status in ((0.02, "pass"), (0.04, "FLAG")):
        c = {"c": [0.9, 0.5, last]}
        got = sweep.curve_checks((0, 8 / 255, 64 / 255), c, {"c": nested(c["c"], 100)}, 100)
        assert {x["name"]: x for x in got}["c reaches ≤ 1 % at the largest ε"]["status"] == status


def test_curve_examples_follow_the_curves_points():
    pgd = {"steps": 40}
    at_2 = {"worst_case": {"accuracy": 0.5, "correct": [1, 0]}, "attacks": [
        {"name": "pgd40", "accuracy": 1.0, "correct": [1, 1], "in_worst_case": True, "standalone": True,
         "sees": "final", "params": pgd},
        {"name": "pgd10", "accuracy": 0.5, "correct": [0, 1], "in_worst_case": True, "standalone": True,
         "sees": "final", "params": {"steps": 10}}]}
    got = sweep.curve_examples((0, 2 / 255), [None, at_2], [1, 1], reverse_attention=False)
    assert got == {sweep.FINAL: [[True, True], [False, True]], sweep.WORST: [[True, True], [True, False]]}


def _report(worst, attacks):
    return {"worst_case": {"accuracy": worst}, "attacks": [
        {"name": n, "accuracy": a, "in_worst_case": True, "standalone": s, "sees": sees, "params": p}
        for n, a, s, sees, p in attacks]}


def test_curves_take_the_best_standalone_attack_of_each_family():
    pgd, steps = {"steps": 40}, {"steps": 10}
    at_2 = _report(0.5, [("pgd40", 0.7, True, "final", pgd), ("pgd10", 0.6, True, "final", steps),
                         ("pgd40+p", 0.65, True, "heads", pgd), ("aux1-pgd-ce", None, False, "heads", steps),
                         ("square", 0.1, True, "black-box", {})])
    at_8 = _report(0.1, [("pgd40", 0.2, True, "final", pgd), ("pgd40+p", 0.15, True, "heads", pgd)])
    curves = sweep.curves_from_reports((0, 2 / 255, 8 / 255), [None, at_2, at_8], 0.9, reverse_attention=True)
    assert curves == {sweep.FINAL: [0.9, 0.6, 0.2], sweep.HEADS: [0.9, 0.65, 0.15], sweep.WORST: [0.9, 0.5, 0.1]}
    plain = sweep.curves_from_reports((0, 2 / 255), [None, at_2], 0.9, reverse_attention=False)
    assert list(plain) == [sweep.FINAL, sweep.WORST]


def test_sweep_attacks_keep_the_threat_model_and_add_the_pgds():
    class Spec:
        def __init__(self, name, eps):
            self.name, self.eps = name, eps

        def in_threat_model(self, eps):
            return self.eps == eps

    specs = [Spec("fgsm", 8 / 255), Spec("pgd40-eps1", 1.0), Spec("joint-pgd-ce-w2", 8 / 255)]
    assert sweep.sweep_attacks(specs, 8 / 255, True) == ["fgsm", "joint-pgd-ce-w2", "pgd40", "pgd40+p"]
    assert sweep.sweep_attacks(specs, 8 / 255, False) == ["fgsm", "joint-pgd-ce-w2", "pgd40"]


def test_the_strongest_head_aware_attack_and_when_the_main_run_is_reused():
    def result(name, sees, broken, in_worst_case=True):
        spec = AttackSpec(name, "x", (), None, {}, sees, 8 / 255)
        return AttackResult(spec, seed=0, seconds=0.0, robust=np.array([True] * (4 - broken) + [False] * broken),
                            in_worst_case=in_worst_case)

    results = [result("pgd40", "final", 4), result("pgd40+p", "heads", 1), result("joint", "heads", 3),
               result("off", "heads", 4, in_worst_case=False)]
    assert sweep.strongest_head_aware(results) == "joint" and sweep.strongest_head_aware(results[:1]) is None
    main = {"attacks": [{"name": "pgd40", "standalone": True}, {"name": "joint", "standalone": False}]}
    assert sweep._reusable(main, ["pgd40", "joint"], ())
    assert not sweep._reusable(main, ["pgd40", "joint"], ("joint",))   # needed on every example
    assert not sweep._reusable(main, ["pgd40", "pgd40+p"], ())


@pytest.mark.slow
def test_script_sweeps_after_the_run_resumes_per_eps_and_keeps_the_headline(tmp_path, capsys):
    factory = tmp_path / "linear.py"
    factory.write_text(FACTORY)
    out = tmp_path / "eval"
    argv = ["--model-factory", f"{factory}:build", "--dataset", "synthetic", "--n-examples", "16", "--attacks",
            "fgsm", "--budget", "small", "--quiet", "--indicators", "8", "--out-dir", str(out),
            "--eps-sweep", "0,2,8,32,128/255"]
    assert test_white_attack.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "eps_sweep.json").read_text())
    results = json.loads((out / "results.json").read_text())
    # the headline is the run's own: fgsm at 8/255 only; the sweep added pgd40 at every ε
    assert results["worst_case"]["over"] == ["fgsm"] and summary["attacks"] == ["fgsm", "pgd40"]
    final, worst = summary["curves"][sweep.FINAL], summary["curves"][sweep.WORST]
    assert final[0] == worst[0] == results["clean"]["accuracy"] > 0.5
    assert all(b <= a + 1 / 16 for a, b in zip(worst, worst[1:])) and worst[-1] == 0.0
    assert all(c["status"] == "pass" for c in summary["checks"] if "1 %" in c["name"])
    assert (out / "eps_sweep.png").stat().st_size > 10_000 and "## Robust accuracy against ε" in printed
    assert "docs/evaluation.md#silent-success" in (out / "report.md").read_text()  # the indicators ran and are reported
    # each ε was saved as it finished: an interrupted sweep reruns only what is missing
    kept = out / "eps_sweep" / "eps_2-255.json"
    stamp = kept.stat().st_mtime_ns
    (out / "eps_sweep" / "eps_32-255.json").unlink()
    (out / "eps_sweep.json").unlink()
    assert test_white_attack.main(argv + ["--resume"]) == 0
    assert kept.stat().st_mtime_ns == stamp
    assert json.loads((out / "eps_sweep.json").read_text())["curves"] == summary["curves"]
