"""Trust in the evaluation's figures and files: the worst case covers only the threat model,
upper-bound rows and empty rows say so, outputs are checked before any work, results are saved
per attack and resumed, bad options are one line, and the report names the weights used."""
import json
import os

import numpy as np
import pytest
import torch

import draw_umap
import feature_distance
import test_white_attack
from models import create_model
from tests.test_adaptive import result_like
from tests.test_evaluation import prototype_data, trained_tiny
from utils import data as datasets
from utils.evaluation import runner
from utils.evaluation.results import Evaluation
from utils.evaluation.suite import (
    BUDGETS,
    Settings,
    attack_catalogue,
    head_count,
    run_attacks,
    run_checks,
    select_attacks,
)

EPS = 8 / 255
FAST = ["--n-examples", "6", "--batch-size", "6", "--budget", "small", "--quiet", "--device", "cpu"]


def test_worst_case_leaves_out_attacks_at_another_eps():
    model = trained_tiny(True, steps=60)
    x, y = prototype_data(24, seed=5)
    catalogue = attack_catalogue(Settings(eps=EPS, budget=BUDGETS["small"]), 5, head_count(model))
    specs, _ = select_attacks("fgsm,pgd10,pgd40-eps1", catalogue, True)
    evaluation = run_attacks(model, x, y, specs, eps=EPS, batch_size=24, progress=False)
    eps1, fgsm, pgd10 = (evaluation.result(n) for n in ("pgd40-eps1", "fgsm", "pgd10"))
    assert eps1.accuracy == 0.0 and fgsm.accuracy > 0 and evaluation.clean.sum() > 0   # the premise
    expected = evaluation.clean & fgsm.robust & pgd10.robust
    assert expected.any() and np.array_equal(evaluation.worst_case(), expected)
    assert [r.name for r in evaluation.worst_case_results()] == ["fgsm", "pgd10"]
    evaluation.checks, evaluation.meta = run_checks(evaluation), {"eps_text": "8/255"}
    report = evaluation.to_json()
    assert report["worst_case"]["over"] == ["fgsm", "pgd10"] and "pgd40-eps1" in report["worst_case"]["excluded"]
    assert "The worst case covers: fgsm, pgd10." in evaluation.markdown()


def _hand(clean, results):
    return Evaluation(np.zeros(len(clean), int), np.array(clean, bool), {}, results)


def test_upper_bound_empty_and_warning_rows_are_explained():
    aa_p = result_like("autoattack+p", [1, 1, 0, 0])
    aa_p.counts = {"clean": 1, "skipped": 3}
    empty = result_like("pgd40", [0, 0, 0, 0])
    empty.received = np.zeros(4, bool)
    apgd = result_like("aux1-apgd-dlr", [1, 1, 0, 0])
    apgd.warnings = ["there are 3 points with zero gradient!"]
    evaluation = _hand([1, 1, 0, 0], [aa_p, empty, apgd])
    checks = run_checks(evaluation)
    evaluation.checks = checks
    text = evaluation.markdown()
    assert "| autoattack+p ‡ |" in text and "‡ autoattack+p: upper bound" in text and "(3 of 4 skipped)" in text
    assert "pgd40 attacked no clean-correct example" in text
    assert {c["name"]: c["status"] for c in checks}["AutoAttack's own checks"] == "pass"
    assert "Why a check can still read pass" in text
    assert json.loads(json.dumps(evaluation.to_json()))["attacks"][0]["upper_bound"].startswith("upper bound")


def test_no_threat_model_attack_means_no_headline():
    evaluation = _hand([1, 1, 0, 0], [result_like("pgd40-eps1", [0, 0, 0, 0]), result_like("ref-cw20", [1, 0, 0, 0])])
    text = evaluation.markdown()
    assert "No attack of the threat model ran" in text and "Headline" not in text
    assert evaluation.to_json()["worst_case"]["over"] == []


def test_protocol_reference_adds_the_reference_preset():
    args = test_white_attack.parse_args(["--ckpt", "x.pt", "--attacks", "paper", "--protocol", "reference"])
    assert args.attacks == "paper,reference"


# ---------------------------------------------------------------- the scripts

def _checkpoint(folder, ema=False, data_dir=None):
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, True)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 16, 16))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "epoch": 2,
               "model_config": {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": True, "image_size": 16},
               "args": {"dataset": "synthetic", "method": "trades", "data_dir": data_dir}}
    if ema:
        payload["ema"] = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    torch.save(payload, folder / "best.pt")
    return folder / "best.pt"


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns if p.is_file() else 0) for p in root.rglob("*"))


def _call(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("trust") / "run")


BAD_EVAL = [["--device", "foo"], ["--attacks", ""], ["--attacks", "natural"], ["--eps", "300"], ["--eps", "-8/255"],
            ["--eps", "0"], ["--n-examples", "0"], ["--batch-size", "0"], ["--out-dir", "FILE"],
            ["--out-dir", "FILE/sub"], ["--resume"], ["--weights", "w.pt"], ["--model-factory", "x.py:build"],
            ["--attacks", "pgd41"], ["--resume", "--out-dir", "EMPTY"], ["--full-set", "autoatack"]]
BAD_FEATURES = [["--device", "foo"], ["--eps", "300"], ["--eps", "-8/255"], ["--n-examples", "0"],
                ["--out-dir", "FILE"], ["--batch-size", "x"], ["--normalize", "cifar11"],
                ["--reverse-attention", "maybe"]]


@pytest.mark.parametrize("script, argv", [(test_white_attack, a) for a in BAD_EVAL]
                         + [(feature_distance, a) for a in BAD_FEATURES]
                         + [(draw_umap, a) for a in [*BAD_FEATURES, ["--n-examples", "1"]]])
def test_bad_input_is_one_line_and_changes_nothing(script, argv, ckpt, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "EMPTY").mkdir()
    argv = [str(tmp_path / a) if a in ("FILE", "FILE/sub", "EMPTY") else a for a in argv]
    base = ["--ckpt", str(ckpt), "--device", "cpu"]
    if "--out-dir" not in argv:
        base += ["--out-dir", str(tmp_path / "out")]
    before, ckpt_before = _snapshot(tmp_path), _snapshot(ckpt.parent)
    code, err = _call(script.main, base + argv if script is not test_white_attack else base + FAST[:2] + argv,
                      capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before and _snapshot(ckpt.parent) == ckpt_before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_is_refused_before_work(tmp_path, capsys):
    path = _checkpoint(tmp_path / "ro")
    os.chmod(path.parent, 0o555)
    try:
        code, err = _call(test_white_attack.main, ["--ckpt", str(path), *FAST, "--attacks", "fgsm"], capsys)
    finally:
        os.chmod(path.parent, 0o755)
    assert code == 2 and "not writable" in err


def test_results_are_saved_per_attack_and_resumed(tmp_path, capsys, monkeypatch):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    argv = ["--ckpt", str(path), *FAST, "--attacks", "fgsm,pgd10", "--out-dir", str(out)]
    ran, real = [], runner.run_attack

    def stop_after_first(model, spec, *args, **kwargs):
        if ran:
            raise KeyboardInterrupt
        ran.append(spec.name)
        return real(model, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "run_attack", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        test_white_attack.main(argv)
    partial = json.loads((out / test_white_attack.PARTIAL).read_text())
    assert [a["name"] for a in partial["attacks"]] == ["fgsm"] and not (out / "results.json").exists()

    code, err = _call(test_white_attack.main, argv, capsys)             # no --resume: refused, nothing lost
    assert code == 2 and "--resume" in err
    code, err = _call(test_white_attack.main, [*argv, "--resume", "--eps", "4/255"], capsys)
    assert code == 2 and err.startswith("error: cannot resume: eps differs") and err.count("\n") == 1

    ran.clear()
    monkeypatch.setattr(runner, "run_attack", lambda *a, **k: ran.append(a[1].name) or real(*a, **k))
    assert test_white_attack.main([*argv, "--resume"]) == 0
    assert ran == ["pgd10"]                                               # fgsm was not rerun
    report = json.loads((out / "results.json").read_text())
    assert [a["name"] for a in report["attacks"]] == ["fgsm", "pgd10"] and report["status"] == "complete"
    assert report["attacks"][0]["correct"] == partial["attacks"][0]["correct"]
    assert not (out / test_white_attack.PARTIAL).exists()


def test_report_names_the_weights_and_reuses_the_checkpoints_data_dir(tmp_path, capsys, monkeypatch):
    path = _checkpoint(tmp_path / "run", ema=True, data_dir=str(tmp_path / "mydata"))
    seen, real = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, data_dir=None, *a, **k: seen.append(data_dir)
                        or real(name, data_dir, *a, **k))
    for extra, weights in (([], "ema weights"), (["--no-ema"], "raw weights")):
        out = tmp_path / weights.split()[0]
        assert test_white_attack.main(["--ckpt", str(path), *FAST, "--attacks", "fgsm", "--out-dir", str(out),
                                       *extra]) == 0
        text = (out / "report.md").read_text()
        assert f"(RA, evaluated as RA; {weights})" in text
        assert json.loads((out / "results.json").read_text())["meta"]["weights"] == weights.split()[0]
    capsys.readouterr()
    assert seen == [None] * 2  # synthetic data read no folder; the folder rule is tested in tests/test_data_trust.py
