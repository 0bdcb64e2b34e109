"""The speed options change how a training step runs, never what it computes: the joint 2B
attack batch and channels-last give the plain step's loss and update (fp32, CPU, same seed),
bf16 autocast stays close, and the step never waits for the device."""
import json
from dataclasses import replace

import pytest
import torch

from models import create_model
from utils import data
from utils.training.ancra import TrainStep
from utils.training.config import TrainConfig
from utils.training.fast import FastStep
from utils.training.schedule import build_optimizer


def _run_step(speed, method="trades", anc=True, strategy="random_adv", ra=True, epoch=1, seed=0):
    """One TrainStep from fixed weights and RNG; returns (metrics, parameters after the update)."""
    torch.manual_seed(seed)
    config = replace(speed, method=method, anc=anc, ra=ra, strategy=strategy, attack_steps=3)
    model = create_model("wrn-16-1", 10, reverse_attention=ra).to(memory_format=config.memory_format())
    step = FastStep(TrainStep(model, build_optimizer(model, config), config, num_classes=10), config)
    pair = data.make_synthetic("train", 12, 8, seed)
    torch.manual_seed(seed + 1)
    metrics = step(pair.float(), pair.y, epoch)
    return metrics, [p.detach().clone() for p in model.parameters()]


def _assert_same_step(a, b, rtol=1e-4, atol=1e-5):
    (metrics_a, params_a), (metrics_b, params_b) = a, b
    assert metrics_a.keys() == metrics_b.keys()
    for name in metrics_a:
        torch.testing.assert_close(metrics_a[name], metrics_b[name], rtol=rtol, atol=atol, msg=name)
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol)


PLAIN = TrainConfig(joint_attacks=False, lr=0.1, weight_decay=2e-4).on("cpu")  # fp32, NCHW, separate attacks


@pytest.mark.parametrize("method, strategy, epoch", [
    ("trades", "random_adv", 1),   # TRADES-ANCRA
    ("pgd-at", "random_adv", 1),   # PGD-AT-ANCRA
    ("mart", "hard_adv", 11),      # MART-ANCRA with a logit-based negative choice after warm-up
])
def test_joint_attack_batch_gives_the_plain_step(method, strategy, epoch):
    _assert_same_step(_run_step(PLAIN, method, strategy=strategy, epoch=epoch),
                      _run_step(replace(PLAIN, joint_attacks=True), method, strategy=strategy, epoch=epoch))


def test_channels_last_gives_the_plain_step():
    _assert_same_step(_run_step(PLAIN), _run_step(replace(PLAIN, joint_attacks=True, channels_last=True)))


def test_speed_options_really_differ_from_a_changed_step():
    """The comparison above is sharp: a different RNG stream (other negatives and starts) fails it."""
    with pytest.raises(AssertionError):
        _assert_same_step(_run_step(PLAIN), _run_step(PLAIN, seed=1))


def test_bf16_autocast_step_stays_close_to_fp32():
    metrics_fp32, params_fp32 = _run_step(PLAIN)
    metrics_bf16, params_bf16 = _run_step(replace(PLAIN, amp=True))
    assert torch.isfinite(metrics_bf16["loss"])
    torch.testing.assert_close(metrics_bf16["loss"], metrics_fp32["loss"], rtol=0.05, atol=0.05)
    moved = sum((a - b).abs().sum() for a, b in zip(params_fp32, params_bf16))
    total = sum(p.abs().sum() for p in params_fp32)
    assert moved / total < 0.01
    assert all(p.dtype == torch.float32 for p in params_bf16)  # master weights stay fp32


def test_speed_defaults_per_device():
    speed = lambda config: (config.amp, config.channels_last, config.joint_attacks)
    assert speed(TrainConfig().on("cpu")) == (False, False, True)
    assert speed(TrainConfig().on("cuda")) == (True, True, True)
    assert speed(TrainConfig(amp=False).on("cuda")) == (False, False, True)
    assert speed(TrainConfig(amp=True).on("cpu")) == (True, True, True)
    assert speed(TrainConfig(channels_last=False).on("cuda")) == (True, False, True)


@pytest.mark.parametrize("speed", [PLAIN, replace(PLAIN, joint_attacks=True)])
def test_training_step_never_synchronises_with_the_device(monkeypatch, speed):
    """No .item(), .tolist(), bool() or float() of a tensor anywhere in the step (each would
    stall a GPU queue); checked by making them raise."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("host synchronisation inside the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    metrics, _ = _run_step(speed, "mart", strategy="soft_adv", epoch=11)
    assert "loss" in metrics


def test_benchmark_prints_one_json_object_per_configuration(capsys):
    from benchmarks.train_step import main

    main(["--arch", "wrn-16-1", "--method", "trades-ancra", "pgd-at", "--batch-size", "4", "--attack-steps", "1",
          "--steps", "1", "--warmup", "0", "--device", "cpu", "--json"])
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in printed.out.splitlines()]
    assert [r["method"] for r in rows] == ["trades-ancra", "pgd-at"]
    # progress on stderr, configuration by configuration (stdout keeps only the JSON rows)
    assert "[train_step] config 1/2 wrn-16-1 trades-ancra batch 4: timed round 1/1" in printed.err
    assert "[train_step] config 2/2 wrn-16-1 pgd-at batch 4: counting FLOPs" in printed.err
    for row in rows:
        assert {"arch", "method", "batch_size", "device", "dtype", "images_per_s", "step_ms", "model_pass_ms",
                "overhead", "tflops", "peak_fraction"} <= set(row)
        assert row["step_ms"] > 0 and row["model_pass_ms"] > 0
        assert row["overhead"] == pytest.approx(row["step_ms"] / row["model_pass_ms"], rel=0.01)
    # TRADES-ANCRA counts more FLOPs than PGD-AT: a 2B attack batch and three training forwards
    assert rows[0]["gflop_per_step"] > 1.5 * rows[1]["gflop_per_step"]


def test_benchmark_rejects_an_unknown_method():
    from benchmarks.train_step import parse_method

    with pytest.raises(SystemExit, match="unknown method 'trades-ancr'"):
        parse_method("trades-ancr")
    assert parse_method("trades") == ("trades", False, False)
    assert parse_method("mart-ancra") == ("mart", True, True)
