"""Trust in the evaluation's figures and files: the worst case covers only the threat model,
upper-bound rows and empty rows say so, outputs are checked before any work, results are saved
per attack and resumed, bad options are one line, and the report names the weights used."""
import datetime
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import draw_hist
import draw_umap
import feature_distance
import test_white_attack
from models import create_model
from test_adaptive import result_like
from test_evaluation import prototype_data, trained_tiny
from utils import data as datasets
from utils import locks
from utils.analysis.features import METRIC_KEYS, save_npz
from utils.cli import resolve_device
from utils.evaluation import command, options, runner
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
    assert "Attacked no clean-correct example (none was left; these rows measure nothing): pgd40." in text
    assert {c["name"]: c["status"] for c in checks}["AutoAttack's own checks"] == "pass"
    assert "Why a check can still read pass" in text
    assert json.loads(json.dumps(evaluation.to_json()))["attacks"][0]["upper_bound"].startswith("upper bound")


def test_no_threat_model_attack_means_no_headline():
    evaluation = _hand([1, 1, 0, 0], [result_like("pgd40-eps1", [0, 0, 0, 0]), result_like("ref-cw20", [1, 0, 0, 0])])
    text = evaluation.markdown()
    assert "no robust-accuracy figure: no attack of the threat model ran" in text and "Headline" not in text
    assert evaluation.to_json()["worst_case"]["over"] == [] and evaluation.to_json()["worst_case"]["accuracy"] is None


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


NOT_FINITE = ("nan", "inf", "-inf", "1e400")
BAD_EVAL = [["--device", "foo"], ["--attacks", ""], ["--attacks", "natural"], ["--eps", "300"], ["--eps", "-8/255"],
            ["--eps", "0"], ["--n-examples", "0"], ["--batch-size", "0"], ["--out-dir", "FILE"],
            ["--out-dir", "FILE/sub"], ["--resume"], ["--weights", "w.pt"], ["--model-factory", "x.py:build"],
            ["--attacks", "pgd41"], ["--resume", "--out-dir", "EMPTY"], ["--full-set", "autoatack"],
            *[[option, value] for option in ("--aux-weight", "--eps", "--taus", "--joint-weights") for value in NOT_FINITE],
            ["--aux-weight", "0"], ["--aux-weight", "-2"], ["--taus", "0.1,nan,10"], ["--taus", "0"],
            ["--joint-weights", "0.5,-2"], ["--joint-weights", ","]]
BAD_FEATURES = [["--device", "foo"], ["--eps", "300"], ["--eps", "-8/255"], ["--n-examples", "0"],
                ["--out-dir", "FILE"], ["--batch-size", "x"], ["--normalize", "cifar11"],
                ["--reverse-attention", "maybe"],
                *[[option, value] for option in ("--aux-weight", "--eps", "--step-size") for value in NOT_FINITE],
                ["--aux-weight", "-1"], ["--step-size", "-0.1"]]


@pytest.mark.parametrize("script, argv", [(test_white_attack, a) for a in BAD_EVAL]
                         + [(feature_distance, a) for a in BAD_FEATURES]
                         + [(draw_umap, a) for a in [*BAD_FEATURES, ["--n-examples", "1"], ["--min-dist", "nan"],
                                                      ["--min-dist", "inf"], ["--min-dist", "-0.1"], ["--min-dist", "2"]]])
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


DEVICE_SCRIPTS = [(test_white_attack, FAST[:-2] + ["--attacks", "fgsm"]),
                  (feature_distance, ["--steps", "1", "--quiet", "--n-examples", "4"])]


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
@pytest.mark.parametrize("script, argv", DEVICE_SCRIPTS)
def test_a_device_that_is_not_here_is_one_line_before_any_output(script, argv, ckpt, tmp_path, capsys):
    before, ckpt_before = _snapshot(tmp_path), _snapshot(ckpt.parent)
    code, err = _call(script.main, ["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), *argv,
                                    "--device", "cuda:7"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "cuda:7" in err, err
    assert _snapshot(tmp_path) == before and _snapshot(ckpt.parent) == ckpt_before


@pytest.mark.parametrize("script, argv", DEVICE_SCRIPTS)
def test_an_unknown_device_spelling_is_refused_by_argparse(script, argv, ckpt, tmp_path, capsys):
    code, err = _call(script.main, ["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), *argv,
                                    "--device", "tpu"], capsys)
    assert code == 2 and err.startswith("error: argument --device: unknown device 'tpu'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, argv", DEVICE_SCRIPTS)
def test_device_auto_is_the_default_and_runs(script, argv, ckpt, tmp_path, capsys):
    # the default is auto: the evaluation resolves it while parsing, the feature scripts in check_options
    assert script.parse_args(["--ckpt", str(ckpt)]).device in ("auto", str(resolve_device("auto")))
    code, err = _call(script.main, ["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), *argv,
                                    "--device", "auto"], capsys)
    assert code == 0, err
    assert any((tmp_path / "out").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_checkpoint_folder_is_refused_before_work(tmp_path, capsys):
    path = _checkpoint(tmp_path / "ro")
    os.chmod(path.parent, 0o555)
    try:
        code, err = _call(test_white_attack.main, ["--ckpt", str(path), *FAST, "--attacks", "fgsm"], capsys)
    finally:
        os.chmod(path.parent, 0o755)
    assert code == 2 and "not writable" in err


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_results_are_saved_per_attack_and_resumed(tmp_path, capsys, monkeypatch, stop):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    argv = ["--ckpt", str(path), *FAST, "--attacks", "fgsm,pgd10", "--out-dir", str(out)]
    ran, real = [], runner.run_attack

    def stop_after_first(model, spec, *args, **kwargs):
        if ran:
            if stop == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: handled like Ctrl-C
                time.sleep(5)
            raise KeyboardInterrupt
        ran.append(spec.name)
        return real(model, spec, *args, **kwargs)

    monkeypatch.setattr(runner, "run_attack", stop_after_first)
    before = signal.getsignal(signal.SIGTERM)
    code, err = _call(test_white_attack.main, argv, capsys)               # Ctrl-C: one line, as training does
    assert code == 130 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("interrupted: 1 finished attack(s) are saved in") and f"--resume --out-dir {out}" in err
    assert not (out / ".lock").exists()
    partial = json.loads((out / test_white_attack.PARTIAL).read_text())
    assert [a["name"] for a in partial["attacks"]] == ["fgsm"] and not (out / "results.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone after the command

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


# ---------------------------------------------------------------- issue 19: resume, locks, NaN, full disk

def _finish(out, argv, capsys):
    code, err = _call(test_white_attack.main, argv, capsys)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_resume_is_keyed_on_the_checkpoints_content_and_every_model_option(tmp_path, capsys):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    argv = ["--ckpt", str(path), *FAST, "--attacks", "fgsm", "--out-dir", str(out)]
    key = _finish(out, argv, capsys)["meta"]["resume_key"]
    assert key["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and key["normalize"] is None
    assert key["n_examples"] == 6 and key["dataset"] == "synthetic" and key["no_ema"] is False
    before = _snapshot(out)
    refusals = [([*argv, "--resume", "--normalize", "cifar10"], "cannot resume: --normalize differs"),
                ([*argv, "--resume", "--reverse-attention", "on"], "cannot resume: --reverse-attention differs"),
                ([*argv, "--resume", "--no-ema"], "cannot resume: --no-ema differs"),
                ([*argv, "--resume", "--subset-seed", "1"], "cannot resume: the test subset differs")]
    for bad, message in refusals:
        code, err = _call(test_white_attack.main, bad, capsys)
        assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    torch.manual_seed(1)  # another model saved over the same path: the path is the same, the content is not
    payload = torch.load(path, weights_only=True)
    payload["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["model"].items()}
    torch.save(payload, path)
    code, err = _call(test_white_attack.main, [*argv, "--resume"], capsys)
    assert code == 2 and err.startswith("error: cannot resume: the checkpoint file's content (SHA-256) differs"), err
    assert _snapshot(out) == before


def test_resume_of_a_file_without_the_new_keys_is_refused(tmp_path, capsys):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    argv = ["--ckpt", str(path), *FAST, "--attacks", "fgsm", "--out-dir", str(out)]
    report = _finish(out, argv, capsys)
    for name in ("checkpoint_sha256", "normalize", "data_dir", "n_examples"):  # what older versions wrote
        del report["meta"]["resume_key"][name]
    (out / "results.json").write_text(json.dumps(report))
    before = _snapshot(out)
    code, err = _call(test_white_attack.main, [*argv, "--resume"], capsys)
    assert code == 2 and "written by an older version" in err and "another --out-dir" in err and err.count("\n") == 1
    assert _snapshot(out) == before


def test_a_folder_locked_by_a_live_process_is_refused(tmp_path, capsys):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                               "started": "now", "command": "test_white_attack.py"}))
        before = _snapshot(tmp_path)
        code, err = _call(test_white_attack.main, ["--ckpt", str(path), *FAST, "--attacks", "fgsm", "--out-dir",
                                                   str(out)], capsys)
    finally:
        other.kill()
        other.wait()
    assert code == 2 and err.startswith("error: ") and f"pid {other.pid}" in err and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before


def test_the_lock_is_taken_for_the_whole_evaluation(tmp_path, capsys, monkeypatch):
    """A second writer that passed the early check (the first had not created the folder yet) is
    refused when it takes the lock; the lock is held while the attacks run and released after."""
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    held, real = [], runner.run_attack

    def run_while_checking(*args, **kwargs):
        held.append(locks.read_lock(out)["pid"] == os.getpid())
        with pytest.raises(locks.LockError, match="in use by pid"):
            locks.FolderLock(out).acquire()
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_attack", run_while_checking)
    _finish(out, ["--ckpt", str(path), *FAST, "--attacks", "fgsm", "--out-dir", str(out)], capsys)
    assert held == [True] and not (out / ".lock").exists()


def test_two_evaluations_started_in_the_same_second_get_their_own_folders(tmp_path, capsys, monkeypatch):
    path = _checkpoint(tmp_path / "run")
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(command, "datetime", type("Frozen", (datetime.datetime,), {"now": staticmethod(lambda: frozen)}))
    for _ in range(2):
        code, err = _call(test_white_attack.main, ["--ckpt", str(path), *FAST, "--attacks", "fgsm"], capsys)
        assert code == 0, err
    folders = sorted(p.name for p in path.parent.glob("eval_*"))
    assert folders == ["eval_20260102_030405", "eval_20260102_030405_2"]
    assert all((path.parent / name / "results.json").is_file() for name in folders)
    assert options.create_unique_dir(tmp_path / "x").name == "x" and options.create_unique_dir(tmp_path / "x").name == "x_2"


class _Logits(torch.nn.Module):
    """Logits given per example (first pixel picks the row)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_nan_or_infinite_clean_logits_are_refused_up_front():
    table = [[1.0, 0.0], [0.0, float("inf")], [float("nan"), 0.0], [2.0, 1.0]]
    x = torch.arange(4.0).view(4, 1, 1, 1)
    with pytest.raises(command.EvaluationError, match="NaN or infinite on 2 of 4 test examples .first: subset position 1"):
        command.check_finite_logits(_Logits(table), x, "cpu", batch_size=3)
    command.check_finite_logits(_Logits(table), x[[0, 3]], "cpu")  # finite rows pass


def _broken_checkpoint(folder):
    path = _checkpoint(folder)
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["model"].items() if k.endswith("weight") and v.dim() == 4)
    payload["model"][name][0, 0, 0, 0] = float("nan")
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("script", [test_white_attack, feature_distance, draw_umap])
def test_a_model_with_nan_weights_is_refused_and_nothing_is_written(script, tmp_path, capsys):
    path = _broken_checkpoint(tmp_path / "run")
    before = _snapshot(tmp_path)
    extra = FAST + ["--attacks", "fgsm"] if script is test_white_attack else ["--steps", "1", "--quiet",
                                                                               "--n-examples", "12"]
    code, err = _call(script.main, ["--ckpt", str(path), "--device", "cpu", "--out-dir", str(tmp_path / "out"),
                                    *extra], capsys)
    assert code == 2 and err.startswith("error: ") and "NaN or infinite" in err and err.count("\n") == 1, err
    assert _snapshot(tmp_path) == before


def test_draw_hist_refuses_a_file_with_nan(tmp_path, capsys):
    run = {key: np.linspace(0, 1, 5) for key in METRIC_KEYS}
    run.update(checkpoint="a.pt", label="A", target_label=0, dataset="synthetic", strategy="random", attack="{}",
               seed=0, n_examples=5)
    save_npz(tmp_path / "good.npz", run)
    run["np_l2"] = np.array([0.1, np.nan, 0.3, 0.4, 0.5])
    save_npz(tmp_path / "bad.npz", run)
    before = _snapshot(tmp_path)
    code, err = _call(draw_hist.main, [str(tmp_path / "good.npz"), str(tmp_path / "bad.npz"), "--out-dir",
                                       str(tmp_path / "fig")], capsys)
    assert code == 2 and err.startswith("error: ") and "np_l2 holds NaN" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def _disk_full_after(monkeypatch, n_ok):
    """os.fsync succeeds ``n_ok`` times, then fails as a full disk does."""
    calls, real = [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _no_temp_files(folder):
    return not [p for p in folder.rglob("*.tmp")]


def test_write_bytes_keeps_the_previous_file_on_a_full_disk(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    options.write_text(target, "old")
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(options.OutputError, match="cannot write .*a.json .No space left on device.; the previous"):
        options.write_text(target, "new")
    assert target.read_text() == "old" and _no_temp_files(tmp_path)


def test_feature_distance_on_a_full_disk_keeps_the_previous_npz(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.npz"
    argv = ["--ckpt", str(ckpt), "--device", "cpu", "--steps", "1", "--quiet", "--n-examples", "3", "--output",
            str(out)]
    code, err = _call(feature_distance.main, argv, capsys)
    assert code == 0, err
    previous = out.read_bytes()
    _disk_full_after(monkeypatch, 0)
    code, err = _call(feature_distance.main, [*argv, "--seed", "1"], capsys)
    assert code == 2 and err.startswith("error: cannot write") and "No space left" in err and err.count("\n") == 1
    assert out.read_bytes() == previous and _no_temp_files(tmp_path)


def test_draw_hist_on_a_full_disk_keeps_the_previous_figures(tmp_path, capsys, monkeypatch):
    run = {key: np.linspace(0, 1, 5) for key in METRIC_KEYS}
    run.update(checkpoint="a.pt", label="A", target_label=0, dataset="synthetic", strategy="random", attack="{}",
               seed=0, n_examples=5)
    npz = save_npz(tmp_path / "a.npz", run)
    argv = [str(npz), "--out-dir", str(tmp_path / "fig"), "--bins", "4"]
    code, err = _call(draw_hist.main, argv, capsys)
    assert code == 0, err
    previous = {p.name: p.read_bytes() for p in (tmp_path / "fig").iterdir()}
    _disk_full_after(monkeypatch, 0)
    code, err = _call(draw_hist.main, argv[:-1] + ["5"], capsys)
    assert code == 2 and err.startswith("error: cannot write") and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "fig").iterdir()} == previous and _no_temp_files(tmp_path)


def test_evaluation_on_a_full_disk_keeps_the_finished_attacks_and_resumes(tmp_path, capsys, monkeypatch):
    path = _checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    argv = ["--ckpt", str(path), *FAST, "--attacks", "fgsm,pgd10", "--out-dir", str(out)]
    with monkeypatch.context() as patch:
        _disk_full_after(patch, 1)  # fgsm's partial save works, pgd10's fails
        code, err = _call(test_white_attack.main, argv, capsys)
    assert code == 2 and err.startswith("error: cannot write") and "No space left" in err and err.count("\n") == 1
    assert f"1 finished attack(s) are saved in {out / test_white_attack.PARTIAL}" in err and "--resume" in err
    partial = json.loads((out / test_white_attack.PARTIAL).read_text())
    assert [a["name"] for a in partial["attacks"]] == ["fgsm"] and _no_temp_files(out)
    assert not (out / "results.json").exists() and not (out / ".lock").exists()
    assert [a["name"] for a in _finish(out, [*argv, "--resume"], capsys)["attacks"]] == ["fgsm", "pgd10"]
