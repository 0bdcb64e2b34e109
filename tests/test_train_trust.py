"""Options do what they log and bad input touches nothing: a bad-input matrix for the train
scripts, smoke never replacing a real run, resume overrides applied (checked on the lr the
optimizer uses) or refused, and a resume with nothing to do writing nothing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils.training.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL_WRN = ["--smoke", "--depth", "16", "--widen", "1", "--quiet"]


def snapshot(folder):
    """Every path under ``folder`` with its bytes (None for folders) and modification time."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}


def call(kind, argv, capsys):
    """``main(kind, argv)`` as a process would see it: (exit code, stderr)."""
    try:
        code = main(kind, argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.fixture
def workspace(tmp_path):
    """A folder with a finished-looking real run ``runs/real``, a file and a data folder."""
    real = tmp_path / "runs" / "real"
    real.mkdir(parents=True)
    (real / "args.json").write_text(json.dumps({"smoke": False}))
    torch.save({"model": {"w": torch.zeros(1)}}, real / "last.pt")  # not a training checkpoint
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "data").mkdir()
    stray = tmp_path / "runs" / "not_ours"  # run-like names but no args.json: not a run of ours
    stray.mkdir()
    for name in ("log.txt", "best.pt", ".last.pt.ab12cd34.tmp", "notes.txt"):
        (stray / name).write_text("someone else's")
    return tmp_path


BAD_INPUT = {
    "out-dir is a file": ("resnet", ["--smoke", "--out-dir", "{w}/a_file"], "is a file"),
    "out-dir under a file": ("resnet", ["--smoke", "--out-dir", "{w}/a_file/runs"], "is not a directory"),
    "unknown device": ("resnet", ["--smoke", "--device", "foo", "--out-dir", "{w}/runs"], "invalid choice: 'foo'"),
    "train-size beyond memory": ("baselines", ["--smoke", "--train-size", "1000000000000", "--out-dir", "{w}/runs"],
                                 "use a smaller --train-size"),
    "eps 300": ("resnet", ["--smoke", "--eps", "300", "--out-dir", "{w}/runs"], "[0, 255]"),
    "eps negative": ("resnet", ["--smoke", "--eps", "-8/255", "--out-dir", "{w}/runs"], "[0, 255]"),
    "lr negative": ("resnet", ["--smoke", "--lr", "-1", "--out-dir", "{w}/runs"], "--lr > 0"),
    "ema out of range": ("resnet", ["--smoke", "--ema", "1.5", "--out-dir", "{w}/runs"], "--ema is a decay"),
    "awp negative": ("resnet", ["--smoke", "--awp-gamma", "-0.1", "--out-dir", "{w}/runs"], "--awp-gamma"),
    "milestones unordered": ("resnet", ["--smoke", "--milestones", "5", "3", "--out-dir", "{w}/runs"], "increasing"),
    "typo in data-dir": ("resnet", ["--data-dir", "{w}/dta", "--out-dir", "{w}/runs"], "is not a folder"),
    "overwrite with a typo in data-dir": ("resnet", ["--data-dir", "{w}/dta", "--out-dir", "{w}/runs",
                                                     "--run-name", "real", "--overwrite"], "is not a folder"),
    "cifar missing": ("resnet", ["--data-dir", "{w}/data", "--out-dir", "{w}/runs", "--run-name", "real",
                                 "--overwrite"], "not found under"),
    "smoke over a real run": ("resnet", ["--smoke", "--out-dir", "{w}/runs", "--run-name", "real"],
                              "never replaces one"),
    "arch of another script": ("resnet", ["--smoke", "--arch", "wrn-16-1", "--out-dir", "{w}/runs"],
                               "train_baselines.py --arch wrn-16-1"),
    "unknown arch": ("baselines", ["--smoke", "--arch", "vgg16", "--out-dir", "{w}/runs"], "unknown architecture"),
    "arch against depth": ("wideresnet", ["--smoke", "--arch", "wrn-28-10", "--depth", "16", "--out-dir", "{w}/runs"],
                           "disagrees"),
    "resume of a non-training checkpoint": ("resnet", ["--resume", "{w}/runs/real"],
                                            "is not a training checkpoint"),
    "overwrite of a folder that is not a run": ("resnet", ["--dataset", "synthetic", "--out-dir", "{w}/runs",
                                                           "--run-name", "not_ours", "--overwrite"], "not a run of"),
    "smoke over a folder that is not a run": ("resnet", ["--smoke", "--out-dir", "{w}/runs", "--run-name", "not_ours"],
                                              "not a run of"),
    "run-name climbing out": ("resnet", ["--smoke", "--out-dir", "{w}/runs", "--run-name", "../x"], "plain folder name"),
    "run-name empty": ("resnet", ["--smoke", "--out-dir", "{w}/runs", "--run-name", ""], "plain folder name"),
    "run-name a path": ("resnet", ["--smoke", "--out-dir", "{w}/runs", "--run-name", "a/b"], "plain folder name"),
    "resume outside a run folder": ("resnet", ["--resume", "{w}/a_file"], "is not a run folder"),
    "milestones repeated": ("resnet", ["--smoke", "--milestones", "1", "1", "--out-dir", "{w}/runs"],
                            "strictly increasing"),
    # every float option refuses nan and inf (argparse's one line names the option)
    **{f"{option} {value}": (kind, ["--smoke", option, value, "--out-dir", "{w}/runs"], f"argument {option}: expected a")
       for kind, option, value in [
           ("resnet", "--lr", "nan"), ("resnet", "--lr", "inf"), ("resnet", "--weight-decay", "nan"),
           ("resnet", "--momentum", "nan"), ("resnet", "--awp-gamma", "nan"), ("resnet", "--awp-gamma", "inf"),
           ("resnet", "--step-size", "nan"), ("resnet", "--eps", "nan"), ("resnet", "--eps", "inf"),
           ("resnet", "--ema", "nan"), ("resnet", "--alpha", "nan"), ("resnet", "--zeta", "inf"),
           ("resnet", "--zeta", "nan"), ("resnet", "--aux-weight", "nan"), ("resnet", "--beta", "nan"),
           ("wideresnet", "--beta", "-inf"), ("tiny", "--lr", "nan"), ("baselines", "--lr", "inf"),
           ("baselines", "--beta", "nan"), ("baselines", "--ema", "inf"), ("baselines", "--awp-gamma", "nan")]},
    "zeta negative": ("resnet", ["--smoke", "--zeta", "-1", "--out-dir", "{w}/runs"], "--zeta is a loss weight"),
    "beta negative": ("baselines", ["--smoke", "--beta", "-6", "--out-dir", "{w}/runs"], "--beta is a loss weight"),
    "aux-weight negative": ("resnet", ["--smoke", "--aux-weight", "-2", "--out-dir", "{w}/runs"], "--aux-weight is a"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, workspace, capsys):
    kind, argv, message = BAD_INPUT[case]
    before = snapshot(workspace)
    code, err = call(kind, [a.format(w=workspace) for a in argv], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert snapshot(workspace) == before


def test_standard_training_needs_no_anc_and_trains_clean(tmp_path, capsys):
    assert call("baselines", ["--smoke", "--method", "standard", "--out-dir", str(tmp_path), "--quiet",
                              "--arch", "wrn-16-1"], capsys)[0] == 0
    args = json.loads((tmp_path / "smoke_synthetic_wrn-16-1_standard_s0" / "args.json").read_text())
    assert args["method_name"] == "standard" and args["data_seed"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--eps", "-8/255"], ["--device", "foo"], ["--out-dir", "{w}/a_file"]])
def test_bad_input_as_a_real_process(argv, workspace):
    before = snapshot(workspace)
    result = subprocess.run([sys.executable, "train_CIFAR10_ResNet.py", "--smoke",
                             *[a.format(w=workspace) for a in argv]],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert snapshot(workspace) == before


def test_smoke_replaces_only_its_own_smoke_run(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path), "--run-name", "s", "--epochs", "1"]
    assert call("wideresnet", SMALL_WRN + out, capsys)[0] == 0
    first = (tmp_path / "s" / "last.pt").read_bytes()
    assert call("wideresnet", SMALL_WRN + out + ["--seed", "1"], capsys)[0] == 0
    assert (tmp_path / "s" / "last.pt").read_bytes() != first  # the old smoke run was replaced


def test_resume_applies_lr_milestones_momentum_and_weight_decay(tmp_path, capsys):
    out = ["--out-dir", str(tmp_path), "--run-name", "r"]
    assert call("wideresnet", SMALL_WRN + out + ["--epochs", "1", "--milestones", "5"], capsys)[0] == 0
    run = tmp_path / "r"
    override = ["--epochs", "3", "--lr", "0.05", "--milestones", "2", "--momentum", "0.5", "--weight-decay", "1e-3"]
    assert call("wideresnet", ["--resume", str(run), *override], capsys)[0] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.01, 0.05, 0.005])  # the lr the optimizer used
    saved = torch.load(run / "last.pt", weights_only=True)
    group = saved["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"], group["initial_lr"]) == (0.5, 1e-3, 0.05)
    args = json.loads((run / "args.json").read_text())
    assert (args["lr"], args["milestones"], args["momentum"], args["weight_decay"], args["epochs"]) == \
        (0.05, [2], 0.5, 1e-3, 3)
    assert "with changed options: " in (run / "log.txt").read_text()


def test_resume_refuses_another_method_and_a_resume_with_nothing_to_do_writes_nothing(tmp_path, capsys):
    assert call("wideresnet", SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r", "--epochs", "1"],
                capsys)[0] == 0
    run = tmp_path / "r"
    before = snapshot(tmp_path)
    refused = [(["--method", "mart"], "method"), (["--no-anc"], "anc"), (["--no-ra"], "holds an RA"),
               (["--run-name", "other"], "--run-name points away"), (["--out-dir", str(run)], "--out-dir points"),
               (["--overwrite"], "--overwrite cannot be combined")]
    for change, word in refused:
        code, err = call("wideresnet", ["--resume", str(run), *change], capsys)
        assert code == 2 and word in err and err.count("\n") == 1
    same_launch = SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r", "--epochs", "1", "--lr", "0.5"]
    code, err = call("wideresnet", [*same_launch, "--resume", str(run)], capsys)  # the original launch + --resume
    assert code == 0, err
    assert snapshot(tmp_path) == before
