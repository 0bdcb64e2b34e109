"""Several processes: torchrun launches with DDP on CPU (gloo), parameter agreement, loss
parity with one process, checkpoint and resume; plus the single-process pieces (sharded
evaluation, batch split, clear errors)."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import load_model
from train_baselines import DEFAULTS as BASELINES
from utils import data, distributed
from utils.training.cli import SMOKE_DEFAULTS
from utils.training.cli import main as train_main
from utils.training.config import TrainConfig
from utils.training.errors import ConfigError
from utils.training.monitor import monitor_accuracy
from utils.training.setup import rank_batch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(*args, cwd):
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port is chosen by torchrun)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    result = subprocess.run(command, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_parameters_agree_on_both_ranks_after_every_step(tmp_path):
    _torchrun(WORKER, "sync", tmp_path / "sync.pt", cwd=tmp_path)
    result = torch.load(tmp_path / "sync.pt", weights_only=True)
    assert result["steps"] == 3
    assert result["differences"] == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_two_ranks_of_16_give_the_update_of_one_process_of_32(tmp_path):
    """Construction: the same seeded RA WRN-16-1 and the same 32 synthetic examples; rank r
    trains on examples 16r..16r+15, the single process on all 32. TRADES-RA without ANC (the
    negatives would be drawn within each shard), PGD from the clean image (no random start, whose
    noise differs per rank), and BatchNorm frozen in eval mode (batch statistics differ between
    shards). Every remaining term is a per-example mean, so DDP's averaged gradient must equal
    the full batch's gradient and the first SGD update must agree to float rounding."""
    _torchrun(WORKER, "parity", tmp_path / "two.pt", cwd=tmp_path)
    subprocess.run([sys.executable, str(WORKER), "parity", str(tmp_path / "one.pt")], cwd=tmp_path, env=_env(),
                   check=True, timeout=300)
    two = torch.load(tmp_path / "two.pt", weights_only=True)["parameters"]
    one = torch.load(tmp_path / "one.pt", weights_only=True)["parameters"]
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
    initial = torch.cat([p.flatten() for p in _initial_model().parameters()])
    assert (one - initial).abs().max() > 1e-3  # the step really moved the weights


def _initial_model():
    from models import create_model

    torch.manual_seed(0)
    return create_model("wrn-16-1", 10, reverse_attention=True)


@pytest.mark.slow
def test_torchrun_training_checkpoint_and_resume(tmp_path):
    common = ["train_baselines.py", "--smoke", "--device", "cpu", "--quiet", "--out-dir", tmp_path,
              "--run-name", "ddp"]
    first = _torchrun(*common, cwd=ROOT)
    batch = SMOKE_DEFAULTS["batch_size"]  # the global batch, split across the two processes
    assert f"2 processes x batch {batch // 2} (global {batch})" in first.stdout
    assert first.stdout.count("epoch 2/2") == 1  # rank 0 alone logs
    run_dir = tmp_path / "ddp"
    model, config = load_model(run_dir / "last.pt")  # a single process reads the checkpoint
    assert config["arch"] == "resnet18" and not any(k.startswith("module.") for k in model.state_dict())
    assert json.loads((run_dir / "args.json").read_text())["world_size"] == 2

    resumed = _torchrun(*common, "--resume", run_dir, "--epochs", "3", cwd=ROOT)
    assert "resuming" in resumed.stdout and "epoch 3/3" in resumed.stdout
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_evaluation_shards_count_every_example_once():
    pair = data.make_synthetic("test", 11, 8, seed=0)
    shards = [data.BatchLoader(pair, 4, shuffle=False, augment=False, rank=r, world_size=3, pad=False)
              for r in range(3)]
    seen = torch.cat([s.indices(0) for s in shards])
    assert sorted(seen.tolist()) == list(range(11))
    assert [len(list(iter(s))) for s in shards] == [1, 1, 1] and [len(s.indices(0)) for s in shards] == [4, 4, 3]

    model = _initial_model().eval()
    whole = monitor_accuracy(model, data.BatchLoader(pair, 4, shuffle=False, augment=False))
    counts = [monitor_accuracy(model, s) for s in shards]  # what each rank counts before the reduction
    assert sum(c["size"] for c in counts) == whole["size"] == 11
    assert sum(c["nat"] * c["size"] for c in counts) == pytest.approx(whole["nat"] * 11)


def test_global_batch_is_split_and_must_divide():
    schedule = TrainConfig(batch_size=128)
    four = distributed.Context(rank=1, world_size=4)
    assert rank_batch(schedule, four) == 32 and rank_batch(schedule, distributed.SINGLE) == 128
    assert rank_batch(replace(schedule, per_rank_batch=True), four) == 128
    with pytest.raises(ConfigError, match="cannot be split over 4 processes; use a multiple of 4"):
        rank_batch(replace(schedule, batch_size=130), four)


def test_sync_bn_without_torchrun_is_a_clear_error(tmp_path, capsys):
    code = train_main(BASELINES, ["--smoke", "--sync-bn", "--out-dir", str(tmp_path), "--quiet"])
    assert code == 2
    assert "--sync-bn needs a multi-process launch" in capsys.readouterr().err
    assert not (tmp_path / "smoke_synthetic_resnet18_pgd-at_s0" / "last.pt").exists()


def test_epoch_seeds_differ_per_rank_and_epoch():
    seeds = {distributed.epoch_seed(0, rank, epoch) for rank in range(4) for epoch in range(1, 50)}
    assert len(seeds) == 4 * 49


@pytest.mark.slow
def test_sigterm_under_torchrun_keeps_the_epoch_end_checkpoint_and_every_rank_stops(tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the stop and both exit (no rank left
    waiting in a collective), leaving the last finished epoch's last.pt to resume from."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train_baselines.py", "--smoke", "--device", "cpu", "--quiet", "--out-dir", str(tmp_path),
               "--run-name", "stop", "--epochs", "200", "--milestones", "200", "--train-size", "256"]
    process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    log = tmp_path / "stop" / "log.txt"
    try:
        deadline = time.monotonic() + 120
        while "epoch 1/200" not in (log.read_text() if log.exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, "the run did not reach epoch 1"
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert err.count("stopped by") == 2  # both ranks stopped, at the same point
    assert "--resume" in err and "restarts from the epoch-end checkpoint" in err
    checkpoint = torch.load(tmp_path / "stop" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] >= 1


@pytest.mark.slow
def test_torchrun_training_with_awp_and_ema(tmp_path):
    """AWP perturbs the bare module on each rank and EMA averages the synchronised weights."""
    _torchrun("train_baselines.py", "--smoke", "--device", "cpu", "--quiet", "--out-dir", tmp_path,
              "--run-name", "awp", "--awp-gamma", "0.01", "--ema", "0.9", cwd=ROOT)
    payload = torch.load(tmp_path / "awp" / "last.pt", weights_only=True)
    steps = SMOKE_DEFAULTS["epochs"] * (SMOKE_DEFAULTS["train_size"] // SMOKE_DEFAULTS["batch_size"])
    assert payload["ema"]["updates"] == steps and payload["args"]["awp_warmup"] == 0
    _, config = load_model(tmp_path / "awp" / "last.pt")
    assert config["weights"] == "ema"
