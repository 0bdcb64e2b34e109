"""--budget smoke (docs/evaluation.md): every attack family at reduced strength, AutoAttack
lowered only through the package's own settings, labelled everywhere as no robustness evaluation;
and the suite's overall progress bar."""
import json

import pytest
import torch

import test_white_attack
from test_evaluation import prototype_data, trained_tiny
from utils.evaluation.autoattack_adapter import import_autoattack, reduce_autoattack, run_autoattack
from utils.evaluation.catalogue import BUDGETS, Settings, attack_catalogue
from utils.evaluation.runner import SuiteProgress, cascade_plan
from utils.evaluation.suite import evaluate_model


def _catalogue(budget):
    return {spec.name: spec for spec in attack_catalogue(Settings(budget=BUDGETS[budget]), 10, num_heads=1)}


def test_smoke_caps_every_pgd_and_lowers_autoattack_full_keeps_the_protocol():
    smoke, full = _catalogue("smoke"), _catalogue("full")
    assert smoke.keys() - {"enum-top2"} == full.keys() - {"enum-top3"}  # every attack is still there
    own = {"pgd40": 40, "cw40": 40, "pgd10": 10, "pgd100": 100, "pgd40-restarts": 40, "pgd40-eps1": 40}
    assert {name: full[name].params["steps"] for name in own} == own
    cap = BUDGETS["smoke"].max_steps
    assert cap < 10 and {name: smoke[name].params["steps"] for name in own} == {n: min(cap, s) for n, s in own.items()}
    assert smoke["fgsm"].params["steps"] == 1
    for catalogue in (smoke, full):  # the ε = 1 sanity attack can still travel the whole range
        eps1 = catalogue["pgd40-eps1"].params
        assert eps1["steps"] * eps1["step_size"] == pytest.approx(2.0)
    assert full["pgd40-eps1"].params["step_size"] == 0.05
    assert smoke["autoattack"].params["reduced"]["apgd.n_iter"] == 5 and "reduced" not in full["autoattack"].params
    assert not BUDGETS["smoke"].evaluation and BUDGETS["full"].evaluation and BUDGETS["small"].evaluation


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_reduced_autoattack_sets_the_packages_own_attributes_and_runs_fewer_queries():
    import_autoattack()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(4, 3, 4, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
    package = import_autoattack()
    attack = package.AutoAttack(net, eps=8 / 255, version="standard") if package.name == "pyautoattack" else \
        package.AutoAttack(net, eps=8 / 255, version="standard", norm="Linf")
    reduce_autoattack(attack, BUDGETS["smoke"].autoattack, num_classes=5)
    assert attack.apgd.n_iter == 5 and attack.square.n_queries == 20 and attack.apgd_targeted.n_target_classes == 1
    reduce_autoattack(attack, (("fab.n_target_classes", 9),), num_classes=5)
    assert attack.fab.n_target_classes == 4  # never above C - 1
    with pytest.raises(AttributeError, match="no setting 'apgd.no_such_knob'"):
        reduce_autoattack(attack, (("apgd.no_such_knob", 1),), num_classes=5)
    counted = Counting(net)
    _, _, info = run_autoattack(counted, x, y, 8 / 255, num_classes=5, reduced=BUDGETS["smoke"].autoattack)
    assert info["reduced"]["square.n_queries"] == 20
    assert counted.calls < 150  # standard AutoAttack: 100 APGD-CE + 4 x 100 APGD-T iterations alone


def test_smoke_budget_runs_every_family_and_is_labelled_no_evaluation():
    model = trained_tiny(reverse_attention=True, steps=60)
    x, y = prototype_data(8, seed=5)
    evaluation = evaluate_model(model, x, y, "all", budget="smoke", joint_weights=(2.0,), taus=(1.0,))
    families = {r.spec.family for r in evaluation.results}
    assert {"paper", "aux-head", "joint", "straight-through", "enumeration", "transfer", "black-box",
            "sanity"} <= families
    assert evaluation.result("autoattack").params["reduced"]
    text, report = evaluation.markdown(), evaluation.to_json()
    assert "Smoke budget: not a robustness evaluation" in text and "Headline" not in text
    assert report["worst_case"]["headline"] is False and "not_a_robustness_figure" in report["worst_case"]
    assert report["evaluation"].startswith("smoke check")
    full = evaluate_model(model, x, y, "fgsm", budget="full").to_json()
    assert full["worst_case"]["headline"] is True and full["evaluation"] == "robustness evaluation"


def test_a_smoke_run_is_never_exported(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        test_white_attack.parse_args(["--ckpt", str(tmp_path / "x.pt"), "--budget", "smoke", "--export-robustbench",
                                      str(tmp_path / "info.json")])
    assert stop.value.code == 2 and "never exported" in capsys.readouterr().err
    assert not (tmp_path / "info.json").exists()


def test_suite_bar_counts_attacks_left_and_weights_them_by_cost(capsys):
    specs = list(_catalogue("smoke").values())
    chosen = [s for s in specs if s.name in ("fgsm", "pgd40", "autoattack")]
    plan = cascade_plan(chosen, cascade=True)
    with SuiteProgress(plan, finished={"fgsm": None}, enabled=True) as suite:
        assert [s.name for s in suite.left] == ["pgd40", "autoattack"]
        assert suite.bar.total == chosen[1].cost + chosen[2].cost
        suite.start("pgd40")
        suite.done()
        assert suite.bar.n == chosen[1].cost
        assert "1/2 attacks done, 1 left" in suite.bar.postfix
    assert "attacks done" in capsys.readouterr().err
    json.dumps(BUDGETS["smoke"].autoattack)  # results.json carries the budget's parameters


def test_report_condenses_passes_and_says_n_a_where_nothing_was_checked():
    import numpy as np

    from test_adaptive import result_like
    from utils.evaluation.report import checks_table, flag_summary
    from utils.evaluation.results import Evaluation
    from utils.evaluation.sanity import autoattack_checks

    aa = result_like("autoattack", [0, 0, 0, 0])
    aa.received = np.zeros(4, bool)  # the cascade left AutoAttack nothing to attack
    evaluation = Evaluation(np.zeros(4, int), np.ones(4, bool), {}, [aa])
    assert autoattack_checks(evaluation)["status"] == "n/a"
    items = [{"name": "silent success", "attack": a, "status": "pass", "message": f"0/{n} ...", "meaning": "M1",
              "doc": "docs/evaluation.md#silent-success"} for a, n in (("pgd40", 4), ("cw40", 3))]
    items += [{"name": "incomplete optimisation", "attack": a, "status": "n/a", "message": m, "meaning": "M2",
               "doc": "docs/evaluation.md#incomplete-optimisation"}
              for a, m in (("fgsm", "fewer than 10 steps"), ("pgd10", "fewer than 10 steps"), ("pgd40", "none left"))]
    items.append(dict(items[0], attack="pgd100", status="FLAG", message="2/4 examples were fooled"))
    table = checks_table([], items)
    assert "| silent success | pass | pgd40, cw40 | 2 attacks; per-attack numbers in results.json |" in table
    assert "| incomplete optimisation | n/a | fgsm, pgd10 | fewer than 10 steps |" in table
    assert "| incomplete optimisation | n/a | pgd40 | none left |" in table
    assert sum("M1" in line for line in table) == 1 and not any("pgd100" in line for line in table)
    summary = flag_summary([], items)
    assert summary[0].startswith("**1 FLAG** of 6 checks") and "silent success (pgd100): 2/4 examples" in summary[2]
    assert "Read: docs/evaluation.md#silent-success." in summary[2]


def test_the_smoke_preset_turns_the_cascade_off_and_keeps_one_weight_unless_given(tmp_path):
    """`--budget smoke` alone is the documented CPU check: no cascade (every family receives every
    example), one joint weight (2) and one temperature (1); options given explicitly win."""
    ckpt = str(tmp_path / "x.pt")
    args = test_white_attack.parse_args(["--ckpt", ckpt, "--budget", "smoke"])
    assert (args.cascade, tuple(args.joint_weights), tuple(args.taus)) == (False, (2.0,), (1.0,))
    args = test_white_attack.parse_args(["--ckpt", ckpt, "--budget", "smoke", "--cascade", "--taus", "0.1,10"])
    assert (args.cascade, tuple(args.joint_weights), tuple(args.taus)) == (True, (2.0,), (0.1, 10.0))
    full = test_white_attack.parse_args(["--ckpt", ckpt])
    assert full.cascade and len(full.joint_weights) == 3 and len(full.taus) == 3
