"""The train_* scripts end to end on synthetic data: smoke runs, exact resume, Ctrl-C, and the
error sentences for a missing dataset, an existing run, a wrong checkpoint and a NaN loss."""
import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_model
from train import DEFAULTS as TRAIN
from train_baselines import DEFAULTS as BASELINES
from train_CIFAR10_ResNet import DEFAULTS as RESNET
from train_CIFAR10_WideResNet import DEFAULTS as WRN
from train_Tiny_ImageNet_PreActResNet import DEFAULTS as TINY
from utils import data
from utils.training import ancra
from utils.training import cli as train_cli
from utils.training.cli import SMOKE_DEFAULTS, main
from utils.training.config import FIELDS, as_record, read_record

REPO = Path(__file__).resolve().parents[1]
# WRN-16-1 keeps script-level tests cheap; the real WRN-34-10 smoke is the same code path.
SMALL_WRN = ["--smoke", "--depth", "16", "--widen", "1", "--quiet"]
SMOKE_BATCHES = SMOKE_DEFAULTS["train_size"] // SMOKE_DEFAULTS["batch_size"]  # training batches per smoke epoch


def run_dir_files(run):
    return sorted(p.name for p in run.iterdir())


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def check_smoke_run(run, arch, reverse_attention):
    """The artefacts every finished 2-epoch smoke run must leave."""
    assert run_dir_files(run) == ["args.json", "best.pt", "curves.png", "epoch_2.pt", "last.pt", "log.txt",
                                  "metrics.jsonl"]
    records = metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0 <= r["test"]["nat"] <= 1 and 0 <= r["test"]["pgd"] <= 1 and r["test"]["size"] == 32
               for r in records)
    _model, config = load_model(str(run / "last.pt"))
    assert (config["arch"], config["reverse_attention"]) == (arch, reverse_attention)
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["epoch"] == 2 and payload["interrupted_epoch"] is None
    assert payload["scheduler"]["_last_lr"] == pytest.approx([0.001])  # smoke milestone at epoch 2
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((run / "args.json").read_text())


@pytest.mark.slow
def test_resnet_script_smoke_runs_as_a_program(tmp_path):
    result = subprocess.run([sys.executable, "train_CIFAR10_ResNet.py", "--smoke", "--quiet", "--out-dir",
                             str(tmp_path)], check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    args = check_smoke_run(tmp_path / "smoke_synthetic_resnet18_trades-ancra_s0", "resnet18", True)
    assert (args["weight_decay"], args["method"], args["lr"]) == (2e-4, "trades", 0.01)
    assert "best chosen on the test subset" in result.stdout


@pytest.mark.slow
def test_train_entry_runs_as_a_program_with_any_method_and_architecture(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--smoke", "--quiet", "--arch", "wrn-16-1", "--method",
                             "pgd-at-ancra", "--image-size", "8", "--out-dir", str(tmp_path)],
                            check=False, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    args = check_smoke_run(tmp_path / "smoke_synthetic_wrn-16-1_pgd-at-ancra_s0", "wrn-16-1", True)
    assert (args["method"], args["anc"], args["ra"]) == ("pgd-at", True, True)


def _config(defaults, argv):
    return train_cli.parse(defaults, ["--smoke", *argv])[0]


@pytest.mark.parametrize(("defaults", "argv", "name"), [
    (TRAIN, ["--method", "trades"], "trades"), (TRAIN, ["--method", "trades-anc"], "trades-anc"),
    (TRAIN, ["--method", "trades-ra"], "trades-ra"), (TRAIN, [], "trades-ancra"),
    (TRAIN, ["--method", "mart-ancra", "--no-ra"], "mart-anc"), (TRAIN, ["--method", "TRADES-ANCRA"], "trades-ancra"),
    (RESNET, [], "trades-ancra"), (RESNET, ["--no-anc"], "trades-ra"), (RESNET, ["--no-ra"], "trades-anc"),
    (RESNET, ["--method", "mart", "--no-anc", "--no-ra"], "mart"), (RESNET, ["--method", "pgd-at-ra"], "pgd-at-ra"),
    (BASELINES, [], "pgd-at"), (BASELINES, ["--method", "trades-ancra"], "trades-ancra"),
])
def test_method_names_and_ablation_flags(defaults, argv, name):
    config = _config(defaults, argv)
    assert config.method_name == name
    assert (config.anc, config.ra) == ("anc" in name, name.endswith("ra"))


def test_paper_scripts_are_the_train_entry_with_their_defaults():
    """Each paper script's default run is train.py with its architecture, dataset and method spelled out."""
    for defaults, arch, dataset in [(RESNET, "resnet18", "synthetic"), (WRN, "wrn-34-10", "synthetic"),
                                    (TINY, "preact-resnet18", "synthetic")]:
        image = ["--image-size", str(defaults.smoke_image_size)]
        paper = _config(defaults, [])
        generic = _config(TRAIN, ["--arch", arch, "--dataset", dataset, "--method", "trades-ancra", *image])
        assert paper == generic and paper.run_name == f"smoke_{dataset}_{arch}_trades-ancra_s0"
    assert _config(BASELINES, []) == _config(TRAIN, ["--method", "pgd-at"])
    wrn = _config(WRN, ["--depth", "28"])
    assert wrn.arch == "wrn-28-10" and wrn.run_name == "smoke_synthetic_wrn-28-10_trades-ancra_s0"


def test_wideresnet_script_smoke(tmp_path):
    assert main(WRN, SMALL_WRN + ["--out-dir", str(tmp_path)]) == 0
    args = check_smoke_run(tmp_path / "smoke_synthetic_wrn-16-1_trades-ancra_s0", "wrn-16-1", True)
    assert (args["method"], args["anc"], args["ra"], args["strategy"]) == ("trades", True, True, "random_adv")


def test_separate_bn_ablation_trains_saves_and_reloads_its_own_layout(tmp_path):
    assert main(WRN, SMALL_WRN + ["--separate-bn", "--out-dir", str(tmp_path)]) == 0
    run = tmp_path / "smoke_synthetic_wrn-16-1_trades-ancra_sepbn_s0"
    payload = torch.load(run / "last.pt", weights_only=True)
    assert payload["model_config"]["separate_bn"] is True
    assert any(k.startswith("ra_bn.0.") for k in payload["model"])
    model, config = load_model(str(run / "last.pt"))
    assert config["separate_bn"] is True and model.state_dict().keys() == payload["model"].keys()
    # the option is part of the run: a resume keeps it without repeating it
    assert main(WRN, ["--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert load_model(str(run / "last.pt"))[1]["separate_bn"] is True


def test_separate_bn_needs_reverse_attention(tmp_path, capsys):
    assert main(WRN, SMALL_WRN + ["--separate-bn", "--no-ra", "--out-dir", str(tmp_path)]) == 2
    assert "--separate-bn would change nothing here: trades-anc trains a plain model (no RA)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_tiny_imagenet_script_smoke(tmp_path):
    assert main(TINY, ["--smoke", "--quiet", "--out-dir", str(tmp_path), "--method", "mart", "--no-anc"]) == 0
    args = check_smoke_run(tmp_path / "smoke_synthetic_preact-resnet18_mart-ra_s0", "preact-resnet18", True)
    assert (args["weight_decay"], args["image_size"]) == (5e-4, 32)


def test_baselines_script_smoke_with_validation_split(tmp_path, capsys):
    argv = ["--smoke", "--quiet", "--arch", "wrn-16-1", "--method", "trades", "--val-size", "8",
            "--out-dir", str(tmp_path)]
    assert main(BASELINES, argv) == 0
    run = tmp_path / "smoke_synthetic_wrn-16-1_trades_s0"
    args = check_smoke_run(run, "wrn-16-1", False)
    assert (args["method"], args["anc"], args["ra"]) == ("trades", False, False)  # vanilla: its KL attack
    records = metrics(run)
    assert all(r["best"]["split"] == "val" and r["val"]["size"] == 8 for r in records)
    assert "best chosen on the validation split" in (run / "log.txt").read_text()
    train = SMOKE_DEFAULTS["train_size"] - 8
    assert f"trades | wrn-16-1 on synthetic ({train} train, 8 val, 32 test images)" in capsys.readouterr().out


def _weights(path):
    return torch.load(path, weights_only=True)


def test_resume_gives_identical_weights(tmp_path):
    out = ["--out-dir", str(tmp_path)]
    assert main(WRN, SMALL_WRN + out + ["--run-name", "straight"]) == 0
    assert main(WRN, SMALL_WRN + out + ["--run-name", "split", "--epochs", "1"]) == 0
    assert _weights(tmp_path / "split" / "last.pt")["epoch"] == 1
    assert main(WRN, ["--resume", str(tmp_path / "split"), "--epochs", "2"]) == 0
    straight, resumed = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "split" / "last.pt")
    assert resumed["epoch"] == 2
    assert straight["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    momenta = [(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(straight["optimizer"]["state"].values(), resumed["optimizer"]["state"].values())]
    assert momenta and all(torch.equal(a, b) for a, b in momenta)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in metrics(tmp_path / "straight")] == [strip(r) for r in metrics(tmp_path / "split")]


def _patch_loss(monkeypatch, on_call):
    """Wrap the engine's training loss; ``on_call(n, loss, metrics)`` may change the n-th result."""
    real, count = ancra.training_loss, [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        loss, batch_metrics = real(*args, **kwargs)
        return on_call(count[0], loss, batch_metrics)

    monkeypatch.setattr(ancra, "training_loss", wrapped)


def test_nan_loss_stops_with_a_clear_error_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    def poison(n, loss, batch_metrics):  # epoch 2 starts at call SMOKE_BATCHES + 1
        if n >= SMOKE_BATCHES + 1:
            loss = loss * float("nan")
            batch_metrics["loss"] = loss.detach()
        return loss, batch_metrics

    _patch_loss(monkeypatch, poison)
    assert main(WRN, SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "r"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the training loss became nan in epoch 2")
    assert "last good checkpoint" in err and "(epoch 1) is intact" in err
    run = tmp_path / "r"
    assert _weights(run / "last.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in _weights(run / "last.pt")["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in metrics(run)] == [1]


def _same_weights(a, b):
    return a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_mid_epoch_stop_keeps_the_epoch_end_checkpoint_and_resume_is_bit_exact(tmp_path, monkeypatch, capsys,
                                                                                signum):
    out = ["--out-dir", str(tmp_path)]
    assert main(WRN, SMALL_WRN + out + ["--run-name", "straight"]) == 0
    epoch_one = tmp_path / "epoch1.pt"

    def interrupt(n, loss, batch_metrics):  # call SMOKE_BATCHES + 1 is inside epoch 2
        if n == SMOKE_BATCHES + 1:
            epoch_one.write_bytes((tmp_path / "r" / "last.pt").read_bytes())
            os.kill(os.getpid(), signum)
        return loss, batch_metrics

    _patch_loss(monkeypatch, interrupt)
    run = tmp_path / "r"
    assert main(WRN, SMALL_WRN + out + ["--run-name", "r"]) == 130
    name = signal.Signals(signum).name
    assert (f"stopped by {name} during epoch 2; epoch 2 restarts from the epoch-end checkpoint {run / 'last.pt'} "
            f"(epoch 1): continue with --resume {run}") in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == epoch_one.read_bytes()  # the clean epoch-end file, untouched
    assert _weights(run / "last.pt")["interrupted_epoch"] is None
    monkeypatch.undo()
    assert main(WRN, ["--resume", str(run)]) == 0
    resumed, straight = _weights(run / "last.pt"), _weights(tmp_path / "straight" / "last.pt")
    assert resumed["epoch"] == 2 and _same_weights(resumed, straight)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert [strip(r) for r in metrics(run)] == [strip(r) for r in metrics(tmp_path / "straight")]


def test_stop_in_the_first_epoch_resumes_from_the_saved_start(tmp_path, monkeypatch):
    out = ["--out-dir", str(tmp_path)]
    assert main(WRN, SMALL_WRN + out + ["--run-name", "straight"]) == 0
    _patch_loss(monkeypatch, lambda n, loss, m: (os.kill(os.getpid(), signal.SIGTERM) if n == 1 else None, loss, m)[1:])
    assert main(WRN, SMALL_WRN + out + ["--run-name", "r"]) == 130
    assert _weights(tmp_path / "r" / "last.pt")["epoch"] == 0
    monkeypatch.undo()
    assert main(WRN, ["--resume", str(tmp_path / "r")]) == 0
    assert _same_weights(_weights(tmp_path / "r" / "last.pt"), _weights(tmp_path / "straight" / "last.pt"))


def test_existing_run_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "args.json").write_text("{}")
    assert main(RESNET, ["--dataset", "synthetic", "--out-dir", str(tmp_path), "--run-name", "taken"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: run directory {run} already holds a run; pass --resume {run} to continue it, "
                   f"--overwrite to replace it, or --run-name NAME to start a new one\n")


def test_missing_dataset_is_one_error_line(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path), "--quiet"]
    assert main(TINY, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Tiny-ImageNet not found under") and "--data-dir" in err
    assert err.count("\n") == 1


def test_any_training_command_resumes_a_run_as_it_was_trained(tmp_path, capsys):
    """The run's architecture, method and ANC/RA choice come from the run, whichever command resumes
    it; asking for another architecture or method is refused before anything changes."""
    assert main(WRN, SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "wrn", "--epochs", "1"]) == 0
    capsys.readouterr()
    run = tmp_path / "wrn"
    assert main(RESNET, ["--resume", str(run), "--arch", "resnet18", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot resume" in err and "wrn-16-1" in err and err.count("\n") == 1
    assert main(TRAIN, ["--resume", str(run), "--method", "trades", "--epochs", "2"]) == 2
    assert "error: cannot resume" in capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    assert main(BASELINES, ["--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    saved = json.loads((run / "args.json").read_text())
    assert (saved["method"], saved["anc"], saved["ra"], saved["arch"], saved["epochs"]) == (
        "trades", True, True, "wrn-16-1", 2)


def test_resume_of_nothing_and_cuda_without_gpu_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(RESNET, ["--resume", str(tmp_path / "empty")]) == 2
    assert "holds no last.pt, so there is nothing to resume" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(BASELINES, ["--smoke", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
        assert "no usable CUDA GPU; use --device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("defaults", [TRAIN, RESNET, WRN, TINY, BASELINES])
def test_help_documents_the_recipe(defaults, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(defaults, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--smoke" in text and "--resume" in text and "0.01" in text and "used 0.1" in text


@pytest.mark.parametrize("spelling", [[], ["--eps", "8"], ["--eps", "8/255"], ["--eps", "0.0313725490196"]])
def test_training_eps_spellings_mean_the_same_radius(spelling):
    assert _config(RESNET, spelling).eps == pytest.approx(8 / 255)  # one ε for the attacks and the check


def test_runs_saved_with_pixel_eps_resume_with_the_same_radius():
    saved = as_record(_config(RESNET, []))
    saved["eps"] = 8.0  # args.json of runs written before eps was stored as a fraction
    assert read_record(saved).eps == pytest.approx(8 / 255)


def test_a_run_written_before_awp_ema_and_arch_options_resumes(tmp_path, capsys):
    """Old run folders: args without the new options and a checkpoint saved at an interruption."""
    assert main(WRN, SMALL_WRN + ["--out-dir", str(tmp_path), "--run-name", "old", "--epochs", "1"]) == 0
    run = tmp_path / "old"
    payload = _weights(run / "last.pt")
    for key in ("awp_gamma", "awp_warmup", "ema", "data_seed", "arch"):
        payload["args"].pop(key)
    payload["args"].update(depth=16, widen=1)
    payload["interrupted_epoch"] = 2  # the old format saved mid-epoch states like this
    torch.save(payload, run / "last.pt")
    assert main(WRN, ["--resume", str(run), "--epochs", "2"]) == 0
    assert "resuming interrupted epoch 2" in (run / "log.txt").read_text()
    resumed = _weights(run / "last.pt")
    assert resumed["epoch"] == 2 and "ema" not in resumed
    assert (resumed["args"]["arch"], resumed["args"]["awp_gamma"], resumed["args"]["data_seed"]) == ("wrn-16-1", 0.0, 0)


def test_run_names_mark_every_option_that_changes_training():
    """An AWP, EMA or separate-BN run never takes the plain run's folder; the paper's names stay."""
    assert _config(TRAIN, []).run_name == "smoke_synthetic_resnet18_trades-ancra_s0"
    assert _config(TRAIN, ["--awp-gamma", "0.005"]).run_name == "smoke_synthetic_resnet18_trades-ancra_awp0.005_s0"
    assert _config(TRAIN, ["--ema", "0.999"]).run_name == "smoke_synthetic_resnet18_trades-ancra_ema0.999_s0"
    assert _config(WRN, ["--separate-bn", "--awp-gamma", "0.01", "--ema", "0.9", "--seed", "3"]).run_name == \
        "smoke_synthetic_wrn-34-10_trades-ancra_sepbn_awp0.01_ema0.9_s3"
    fresh = train_cli.parse(RESNET, [])[0]
    assert (fresh.run_name, fresh.dataset, fresh.epochs) == ("cifar10_resnet18_trades-ancra_s0", "cifar10", 120)


def test_smoke_with_a_real_dataset_is_a_small_subset_of_it(tmp_path, capsys):
    config = _config(TRAIN, ["--dataset", "cifar10"])
    assert (config.dataset, config.image_size, config.train_size, config.eval_size, config.epochs) == \
        ("cifar10", 32, 256, 64, 2)
    assert config.run_name == "smoke_cifar10_resnet18_trades-ancra_s0"
    assert main(TRAIN, ["--smoke", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--quiet",
                        "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 not found under") and "--image-size" not in err


def _toy_loader(root, split, download):
    """300 training and 80 test 8×8 images of 4 classes (brightness is the class)."""
    count = 300 if split == "train" else 80
    y = torch.arange(count) % 4
    x = (40 + 50 * y).view(-1, 1, 1, 1).expand(count, 3, 8, 8).to(torch.uint8).clone()
    return data.TensorPair(x, y.long(), [f"level{c}" for c in range(4)])


def test_smoke_trains_on_a_few_hundred_images_of_a_real_dataset(tmp_path):
    data.register_dataset(data.DatasetSpec("toy300", 4, 8, False, _toy_loader, "test dataset"))
    try:
        assert main(TRAIN, ["--smoke", "--dataset", "toy300", "--depth", "16", "--widen", "1", "--quiet",
                            "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")]) == 0
    finally:
        data.unregister_dataset("toy300")
    run = tmp_path / "runs" / "smoke_toy300_wrn-16-1_trades-ancra_s0"
    assert "(256 train, 0 val, 64 test images)" in (run / "log.txt").read_text()
    assert [r["epoch"] for r in metrics(run)] == [1, 2]


def test_step_size_is_defined_once_and_read_from_the_record_only():
    """--step-size is one field of the record (the option is generated from it; no hand-written
    option, no second carrier); the command line is read into it once and the run reads it from
    the record at its two uses, the training attack and the per-epoch check."""
    sources = {p: p.read_text() for p in [*REPO.glob("utils/training/*.py"), *REPO.glob("train*.py"),
                                           REPO / "utils" / "cli.py"]}
    trees = {p: ast.parse(text) for p, text in sources.items()}
    defined = [p.name for p, tree in trees.items() for node in ast.walk(tree)
               if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "step_size"]
    assert defined == ["config.py"]
    assert not any('"--step-size"' in text for text in sources.values())
    read = {p.name for p, tree in trees.items() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "step_size"}
    assert read == {"config.py", "ancra.py", "monitor.py"}  # its range check; the training attack; the check
    copied = [p.name for p, tree in trees.items() for node in ast.walk(tree)
              if isinstance(node, ast.keyword) and node.arg == "step_size"]
    assert copied == []  # no record built from another: the step and the check read the record itself
    option = next(a for a in train_cli.build_parser(TRAIN)._actions if a.dest == "step_size")
    assert option.option_strings == ["--step-size"] and option.help == FIELDS["step_size"].metadata["help"]
    config = _config(TRAIN, ["--step-size", "0.01"])
    assert config.step_size == 0.01 and list(as_record(config)).count("step_size") == 1
