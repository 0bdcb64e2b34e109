"""Options do what they log and bad input touches nothing: a bad-input matrix for the train
scripts, smoke never replacing a real run, resume overrides applied (checked on the lr the
optimizer uses) or refused, and a resume with nothing to do writing nothing."""
import errno
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train import DEFAULTS as TRAIN
from train_baselines import DEFAULTS as BASELINES
from train_CIFAR10_ResNet import DEFAULTS as RESNET
from train_CIFAR10_WideResNet import DEFAULTS as WRN
from train_Tiny_ImageNet_PreActResNet import DEFAULTS as TINY
from utils import checkpoint
from utils.locks import LOCK_NAME, read_lock
from utils.training import ancra
from utils.training import records as records_module
from utils.training.cli import SMOKE_DEFAULTS, main

REPO = Path(__file__).resolve().parents[1]
SMALL_WRN = ["--smoke", "--depth", "16", "--widen", "1", "--quiet"]
SMOKE_BATCHES = SMOKE_DEFAULTS["train_size"] // SMOKE_DEFAULTS["batch_size"]  # training batches per smoke epoch


def snapshot(folder):
    """Every path under ``folder`` with its bytes (None for folders) and modification time."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*"))}


SCRIPTS = {"resnet": RESNET, "wideresnet": WRN, "tiny": TINY, "baselines": BASELINES, "train": TRAIN}


def call(kind, argv, capsys):
    """``main(SCRIPTS[kind], argv)`` as a process would see it: (exit code, stderr)."""
    try:
        code = main(SCRIPTS[kind], argv)
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
    "unknown device": ("resnet", ["--smoke", "--device", "foo", "--out-dir", "{w}/runs"], "unknown device 'foo'"),
    "train-size beyond memory": ("baselines", ["--smoke", "--train-size", "1000000000000", "--out-dir", "{w}/runs"],
                                 "use a smaller --train-size"),
    "eps 300": ("resnet", ["--smoke", "--eps", "300", "--out-dir", "{w}/runs"], "at most 255 pixel units"),
    "eps negative": ("resnet", ["--smoke", "--eps", "-8/255", "--out-dir", "{w}/runs"], "ε must be above 0"),
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
    "ANC option of a method without ANC": ("train", ["--smoke", "--method", "trades-ra", "--zeta", "2", "--out-dir",
                                                     "{w}/runs"], "--zeta would change nothing here: ANC is off in "
                                                                  "trades-ra; drop --zeta"),
    "RA option of a plain model": ("baselines", ["--smoke", "--aux-weight", "1", "--out-dir", "{w}/runs"],
                                   "--aux-weight would change nothing here: pgd-at trains a plain model"),
    # options that would change nothing (issue 28): one line each, nothing touched
    "beta of a method without one": ("train", ["--smoke", "--method", "pgd-at", "--beta", "5", "--out-dir", "{w}/runs"],
                                     "--beta would change nothing here: β weighs TRADES' and MART's robust term, and "
                                     "pgd-at has none; drop --beta"),
    "no-ra of a plain method": ("train", ["--smoke", "--method", "pgd-at", "--no-ra", "--out-dir", "{w}/runs"],
                                "--no-ra would change nothing here: pgd-at has no RA to take away"),
    "no-anc of a method without ANC": ("baselines", ["--smoke", "--method", "trades-ra", "--no-anc", "--out-dir",
                                                     "{w}/runs"], "--no-anc would change nothing here: trades-ra has no ANC"),
    "no-anc restating a vanilla method": ("train", ["--smoke", "--method", "trades", "--no-anc", "--out-dir", "{w}/runs"],
                                          "--no-anc would change nothing here"),
    "awp-warmup without awp-gamma": ("resnet", ["--smoke", "--awp-warmup", "3", "--out-dir", "{w}/runs"],
                                     "--awp-warmup would change nothing here: AWP is off; give --awp-gamma"),
    "separate-bn without RA": ("baselines", ["--smoke", "--arch", "wrn-16-1", "--separate-bn", "--out-dir", "{w}/runs"],
                               "--separate-bn would change nothing here"),
    "attack steps of standard training": ("train", ["--smoke", "--method", "standard", "--attack-steps", "3",
                                                    "--out-dir", "{w}/runs"], "standard runs no training attack"),
    "joint attacks without a second attack": ("baselines", ["--smoke", "--no-joint-attacks", "--out-dir", "{w}/runs"],
                                              "--joint-attacks would change nothing here"),
    "image-size of a real dataset": ("resnet", ["--dataset", "cifar10", "--image-size", "16", "--out-dir", "{w}/runs"],
                                     "--image-size would change nothing here: it sets the side of synthetic images, "
                                     "and cifar10 images are 32 pixels wide"),
    "old method spelling": ("train", ["--smoke", "--method", "pgd_at", "--out-dir", "{w}/runs"],
                            "unknown method 'pgd_at'"),
    "attack-loss is the method's": ("train", ["--smoke", "--attack-loss", "kl", "--out-dir", "{w}/runs"],
                                    "unrecognized arguments: --attack-loss"),
    "RA on an architecture without it": ("train", ["--smoke", "--arch", "preact-resnet18-rb", "--out-dir", "{w}/runs"],
                                         "has no reverse-attention variant"),
    "unknown method suffix": ("train", ["--smoke", "--method", "trades-anra", "--out-dir", "{w}/runs"],
                              "unknown method 'trades-anra'"),
    "depth with a non-WRN arch": ("train", ["--smoke", "--arch", "resnet18", "--depth", "16", "--out-dir", "{w}/runs"],
                                  "disagrees"),
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
    **{f"{kind} {option} {value}": (kind, ["--smoke", option, value, "--out-dir", "{w}/runs"], f"argument {option}: expected a")
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
    assert (args["method"], args["anc"], args["ra"], args["data_seed"]) == ("standard", False, False, 0)


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
    refused = [(["--method", "mart"], "cannot resume as mart-ancra"), (["--no-anc"], "as trades-ra"),
               (["--no-ra"], "cannot resume as trades-anc: the run was trained as trades-ancra"),
               (["--run-name", "other"], "--run-name points away"), (["--out-dir", str(run)], "--out-dir points"),
               (["--overwrite"], "--overwrite cannot be combined")]
    for change, word in refused:
        code, err = call("wideresnet", ["--resume", str(run), *change], capsys)
        assert code == 2 and word in err and err.count("\n") == 1
    same_launch = SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r", "--epochs", "1", "--lr", "0.5"]
    code, err = call("wideresnet", [*same_launch, "--resume", str(run)], capsys)  # the original launch + --resume
    assert code == 0, err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- issue 19: run folders


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path, capsys, name="r", *extra):
    code, err = call("wideresnet", SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", name, *extra], capsys)
    assert code == 0, err
    return tmp_path / name


def _write_lock(run, pid):
    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier",
                                             "command": "train_CIFAR10_WideResNet.py --smoke"}))


@pytest.fixture
def live_pid():
    """The pid of a running process (a ``sleep`` child), killed afterwards."""
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


def test_a_live_lock_refuses_a_second_writer_before_anything_is_touched(tmp_path, capsys, live_pid):
    run = _train(tmp_path, capsys, "r", "--epochs", "1")
    _write_lock(run, live_pid)
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_lock(empty, live_pid)  # a training that has just taken its new folder
    before = snapshot(tmp_path)
    attempts = [["--resume", str(run), "--epochs", "2"],                                    # resume while it trains
                SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r", "--overwrite"],  # overwrite its files
                SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "empty"]]            # a second new run
    for argv in attempts:
        code, err = call("wideresnet", argv, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and f"in use by pid {live_pid}" in err
    assert snapshot(tmp_path) == before


def test_a_stale_lock_is_reported_and_taken_over_and_the_lock_is_held_while_training(tmp_path, capsys, monkeypatch):
    run = _train(tmp_path, capsys, "r", "--epochs", "1")
    finished = subprocess.Popen(["true"])
    finished.wait()
    _write_lock(run, finished.pid)
    seen = []
    real = ancra.training_loss
    monkeypatch.setattr(ancra, "training_loss", lambda *a, **k: (seen.append(read_lock(run)), real(*a, **k))[1])
    code, err = call("wideresnet", ["--resume", str(run), "--epochs", "2"], capsys)
    assert code == 0, err
    assert f"removing the stale lock of pid {finished.pid}" in err
    assert seen and all(record["pid"] == os.getpid() for record in seen)  # ours for the whole training
    assert not (run / LOCK_NAME).exists()  # released at the end
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


@pytest.mark.slow
def test_a_second_process_is_refused_while_a_training_runs(tmp_path, capsys):
    """A real training process holds its folder; a resume from here is refused until it stops."""
    run = tmp_path / "r"
    child = subprocess.Popen([sys.executable, "train_baselines.py", "--smoke", "--arch", "wrn-16-1", "--epochs", "500",
                              "--quiet", "--out-dir", str(tmp_path), "--run-name", "r"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "last.pt").exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        code, err = call("baselines", ["--resume", str(run)], capsys)
        assert code == 2 and f"in use by pid {child.pid}" in err
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=120)
    assert child.returncode == 130 and not (run / LOCK_NAME).exists()
    assert call("baselines", ["--resume", str(run), "--epochs", str(torch.load(
        run / "last.pt", weights_only=True)["epoch"] + 1)], capsys)[0] == 0


def test_resume_from_an_earlier_epoch_keeps_the_later_records_until_its_first_epoch_is_saved(tmp_path, capsys,
                                                                                             monkeypatch):
    run = _train(tmp_path, capsys, "r", "--epochs", "3", "--save-freq", "1", "--milestones", "2")
    records = (run / "metrics.jsonl").read_bytes()
    last = (run / "last.pt").read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure inside the resumed epoch")

    monkeypatch.setattr(ancra, "training_loss", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        main(WRN, ["--resume", str(run / "epoch_1.pt")])
    assert (run / "metrics.jsonl").read_bytes() == records  # all 3 records, as last.pt (epoch 3) says
    assert (run / "last.pt").read_bytes() == last
    monkeypatch.undo()
    assert call("wideresnet", ["--resume", str(run / "epoch_1.pt")], capsys)[0] == 0  # redoes epochs 2 and 3
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in _metrics(run)] == [strip(json.loads(line)) for line in records.decode().splitlines()]


def test_stale_temporary_files_are_cleaned_when_a_run_resumes(tmp_path, capsys):
    run = _train(tmp_path, capsys, "r", "--epochs", "1")
    ours = [".last.pt.k2j4h5g6.tmp", ".metrics.jsonl.abc_1234.tmp", ".epoch_2.pt.zzzzzzzz.tmp"]
    for name in [*ours, "notes.tmp", ".mine.txt.abcdefgh.tmp"]:
        (run / name).write_text("left over")
    code, err = call("wideresnet", ["--resume", str(run), "--epochs", "2"], capsys)
    assert code == 0, err
    assert "removed 3 temporary file(s)" in err
    names = {p.name for p in run.iterdir()}
    assert not names & set(ours) and {"notes.tmp", ".mine.txt.abcdefgh.tmp"} <= names  # others' files stay


def test_a_seed_change_is_refused_when_a_validation_split_exists(tmp_path, capsys):
    run = _train(tmp_path, capsys, "val", "--epochs", "1", "--val-size", "8")
    before = snapshot(tmp_path)
    for change, words in [(["--seed", "1"], "cannot resume with --seed 1: the run's validation split"),
                          (["--val-size", "4"], "cannot resume with --val-size 4"),
                          (["--val-size", "0"], "cannot resume with --val-size 0")]:
        code, err = call("wideresnet", ["--resume", str(run), "--epochs", "2", *change], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before
    plain = _train(tmp_path, capsys, "plain", "--epochs", "1")  # no held-out split: the seed may change
    assert call("wideresnet", ["--resume", str(plain), "--epochs", "2", "--seed", "1"], capsys)[0] == 0


class _FullDisk(io.FileIO):
    """A file that fails its first write as a full disk does."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_at_epoch_2(monkeypatch):
    """From the first batch of epoch 2 on (smoke: SMOKE_BATCHES per epoch), checkpoint files fail to
    write as on a full disk (inside torch.save, which wraps the error in a RuntimeError of its own)."""
    full = [False]
    real_open, real_loss = open, ancra.training_loss

    def checkpoint_open(path, mode="r", *args, **kwargs):
        return _FullDisk(path, "w") if full[0] and "w" in mode else real_open(path, mode, *args, **kwargs)

    def loss(*args, **kwargs):
        loss.calls += 1
        full[0] = full[0] or loss.calls >= SMOKE_BATCHES + 1
        return real_loss(*args, **kwargs)

    loss.calls = 0
    monkeypatch.setattr(checkpoint, "open", checkpoint_open, raising=False)
    monkeypatch.setattr(ancra, "training_loss", loss)


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    straight = _train(tmp_path, capsys, "straight", "--epochs", "2")
    _disk_full_at_epoch_2(monkeypatch)
    run = tmp_path / "r"
    code, err = call("wideresnet", SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write the checkpoint of epoch 2 into {run} (No space left on device); "
                          f"the previous last.pt and metrics are intact")
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in _metrics(run)] == [1]
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "best.pt", "curves.png", "last.pt", "log.txt",
                                                     "metrics.jsonl"]  # no temporary file, no lock left
    monkeypatch.undo()
    assert call("wideresnet", ["--resume", str(run)], capsys)[0] == 0
    resumed, reference = (torch.load(p / "last.pt", weights_only=True) for p in (run, straight))
    assert resumed["epoch"] == 2 and all(torch.equal(resumed["model"][k], reference["model"][k]) for k in reference["model"])


def test_records_that_could_not_be_written_are_restored_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    real = records_module.write_metrics

    def write_metrics(run_dir, records):
        if records[-1]["epoch"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(run_dir, records)

    monkeypatch.setattr(records_module, "write_metrics", write_metrics)
    code, err = call("wideresnet", SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r"], capsys)
    run = tmp_path / "r"
    assert code == 2 and err.count("\n") == 1 and f"epoch 2 is saved in {run / 'last.pt'}" in err
    assert [r["epoch"] for r in _metrics(run)] == [1]
    monkeypatch.undo()
    assert call("wideresnet", ["--resume", str(run), "--epochs", "3"], capsys)[0] == 0
    records = _metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1] == torch.load(run / "epoch_2.pt", weights_only=True)["metrics"]


def test_a_damaged_metrics_file_is_refused_before_args_json_is_rewritten(tmp_path, capsys):
    run = _train(tmp_path, capsys, "r", "--epochs", "1")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "lr": 0.0\n')  # a record cut short
    before = snapshot(tmp_path)
    code, err = call("wideresnet", ["--resume", str(run), "--epochs", "2", "--lr", "0.05"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {run / 'metrics.jsonl'} is damaged (line 2 is not an epoch record)")
    assert snapshot(tmp_path) == before


def test_resumed_args_holding_nan_are_refused(tmp_path, capsys):
    run = _train(tmp_path, capsys, "r", "--epochs", "1")
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["args"]["awp_gamma"] = float("nan")  # args.json of an older version that took nan
    torch.save(payload, run / "last.pt")
    before = snapshot(tmp_path)
    code, err = call("wideresnet", ["--resume", str(run), "--epochs", "2"], capsys)
    assert code == 2 and "--awp-gamma must be a finite number, got nan" in err
    assert snapshot(tmp_path) == before


def test_milestones_beyond_the_epochs_are_noted_in_the_log(tmp_path, capsys):
    run = _train(tmp_path, capsys, "r", "--epochs", "1", "--milestones", "2", "5")
    assert "note: milestone(s) 2 5 lie beyond --epochs 1" in (run / "log.txt").read_text()


# --------------------------------------------------------------------------- issue 28: training side


def _read_only(monkeypatch, folder):
    """Make ``folder`` and everything under it unwritable as a read-only filesystem is (the
    training checks with ``os.access``, which root also sees refused on a read-only mount)."""
    real, folder = os.access, Path(folder).resolve()

    def access(path, mode, *args, **kwargs):
        inside = Path(path).resolve() == folder or folder in Path(path).resolve().parents
        return False if inside and mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("kind", ["new run", "resume"])
def test_a_read_only_folder_is_one_line_exit_2_and_touches_nothing(tmp_path, capsys, monkeypatch, kind):
    if kind == "resume":
        run = _train(tmp_path, capsys, "r", "--epochs", "1")
        _read_only(monkeypatch, run)
        argv, message = ["--resume", str(run), "--epochs", "2"], f"cannot resume {run}: the folder is not writable"
    else:
        (tmp_path / "ro").mkdir()
        _read_only(monkeypatch, tmp_path / "ro")
        argv = SMALL_WRN + ["--out-dir", str(tmp_path / "ro" / "x")]
        message = f"cannot create the run folder {tmp_path / 'ro' / 'x'}"
    before = snapshot(tmp_path)
    code, err = call("wideresnet", argv, capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert "not writable (read-only or no permission)" in err
    assert snapshot(tmp_path) == before


def test_any_paper_script_resumes_a_plain_run_as_it_was_trained(tmp_path, capsys):
    """A run trained as plain `train.py --method trades` resumes as plain TRADES from every command,
    the paper scripts included (whose bare --method means the ANCRA variant)."""
    code, err = call("train", SMALL_WRN + ["--method", "trades", "--out-dir", str(tmp_path), "--run-name", "plain",
                                           "--epochs", "1"], capsys)
    assert code == 0, err
    run = tmp_path / "plain"
    for kind, epochs in [("resnet", 2), ("wideresnet", 3), ("tiny", 4), ("baselines", 5)]:
        code, err = call(kind, ["--resume", str(run), "--epochs", str(epochs)], capsys)
        assert code == 0, f"{kind}: {err}"
        args = json.loads((run / "args.json").read_text())
        assert (args["method"], args["anc"], args["ra"], args["epochs"]) == ("trades", False, False, epochs)
    assert torch.load(run / "last.pt", weights_only=True)["model_config"]["reverse_attention"] is False


def test_an_old_record_with_old_spellings_resumes_bit_exactly(tmp_path, capsys):
    """args.json / checkpoint args of earlier versions (an alias with `_`, `reverse_attention`,
    `attack_loss`, `method_name`, `resume`, `overwrite`, no `ra`) resume as the same run."""
    options = ["--smoke", "--arch", "wrn-16-1", "--quiet", "--out-dir", str(tmp_path)]
    assert call("baselines", [*options, "--run-name", "straight"], capsys)[0] == 0
    assert call("baselines", [*options, "--run-name", "old", "--epochs", "1"], capsys)[0] == 0
    run = tmp_path / "old"
    payload = torch.load(run / "last.pt", weights_only=True)
    old = {k: v for k, v in payload["args"].items() if k not in ("ra", "anc")}
    old.update(method="pgd_at", reverse_attention=False, attack_loss="ce", method_name="pgd_at", resume=None,
               overwrite=False)
    payload["args"] = old
    torch.save(payload, run / "last.pt")
    (run / "args.json").write_text(json.dumps(old))
    code, err = call("resnet", ["--resume", str(run), "--epochs", "2"], capsys)  # a paper script: ANCRA by default
    assert code == 0, err
    resumed, straight = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("old", "straight"))
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])
    assert (resumed["args"]["method"], resumed["args"]["anc"], resumed["args"]["ra"]) == ("pgd-at", False, False)
    assert "attack_loss" not in resumed["args"] and "reverse_attention" not in resumed["args"]


def test_an_old_record_whose_attack_loss_the_method_no_longer_uses_is_refused():
    from utils.training.config import read_record
    from utils.training.errors import ConfigError

    assert read_record({"method": "trades_ancra"}, {"reverse_attention": True}).method_name == "trades-ancra"
    assert read_record({"method": "at", "anc": True, "reverse_attention": False}).method_name == "pgd-at-anc"
    with pytest.raises(ConfigError, match="trained with --attack-loss ce, an option this version no longer has"):
        read_record({"method": "trades", "anc": False, "reverse_attention": False, "attack_loss": "ce"})
    with pytest.raises(ConfigError, match="the run's saved options are damaged"):
        read_record({"method": "trades", "epochs": "two"})
