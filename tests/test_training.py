"""The training engine: one step, evaluation, checkpoint files, RNG, schedule, curves, and a
measured check that PGD-AT buys robustness that standard training does not."""
import errno
import io
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from models import create_model
from utils import attacks, checkpoint, data
from utils.checkpoint import (
    RunDirError,
    atomic_save_many,
    capture_rng,
    load_scheduler_state,
    prepare_run_dir,
    read_metrics,
    remove_stale_temp_files,
    restore_rng,
    scheduler_state,
    write_metrics,
)
from utils.training import ancra, resume
from utils.training.ancra import TrainStep
from utils.training.config import PLAIN_SPEED, EvalConfig, MethodConfig, SpeedConfig
from utils.training.curves import plot_curves
from utils.training.errors import ConfigError
from utils.training.fast import FastStep
from utils.training.monitor import monitor_accuracy
from utils.training.records import RunInfo, resumed_records
from utils.training.schedule import Schedule, build_optimizer, build_scheduler
from utils.training.trainer import Trainer


def _batch(n=8, size=8, seed=0):
    pair = data.make_synthetic("train", n, size, seed)
    return pair.float(), pair.y


def _step(method="trades", anc=True, ra=True, seed=0, speed=PLAIN_SPEED):
    torch.manual_seed(seed)
    model = create_model("wrn-16-1", 10, reverse_attention=ra)
    optimizer = build_optimizer(model, Schedule(lr=0.05))
    config = MethodConfig(method=method, anc=anc, ra=ra, attack_steps=1)
    return FastStep(TrainStep(model, optimizer, config, num_classes=10), speed)


def test_method_names_and_invalid_combinations():
    assert MethodConfig("trades").name(True) == "trades-ancra"
    assert MethodConfig("mart", anc=False).name(True) == "mart-ra"
    assert MethodConfig("pgd-at").name(False) == "pgd-at-anc"
    assert MethodConfig("trades", anc=False).name(False) == "trades"
    with pytest.raises(ConfigError, match="--no-anc"):
        MethodConfig("standard", anc=True)
    with pytest.raises(ConfigError, match="strategy"):
        MethodConfig(strategy="closest")


def test_the_step_takes_ra_from_the_config_and_refuses_a_model_that_disagrees():
    for ra in (True, False):
        model = create_model("wrn-16-1", 10, reverse_attention=not ra)
        with pytest.raises(ValueError, match="RA heads"):
            TrainStep(model, build_optimizer(model, Schedule()), MethodConfig("trades", ra=ra), 10)


def test_resume_refuses_a_run_trained_with_another_attack_loss_than_its_method_gives():
    """--attack-loss is gone (the method decides); a run made with an override does not resume silently."""
    saved = {"method": "trades", "anc": False, "reverse_attention": False, "attack_loss": "ce"}
    with pytest.raises(ConfigError, match="attack loss 'kl'.*trained with 'ce'"):
        resume.refuse_identity_changes(saved, dict(saved, attack_loss="kl"))
    resume.refuse_identity_changes(saved, dict(saved))


def test_the_step_takes_beta_from_the_config_and_none_is_the_methods_default():
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, reverse_attention=False).train()
    x, y = _batch()
    x_adv = (x + 0.01).clamp(0, 1)
    losses = []
    for beta, used in ((None, 5.0), (1.5, 1.5)):
        config = MethodConfig("mart", anc=False, ra=False, beta=beta)
        _, got = TrainStep(model, build_optimizer(model, Schedule()), config, 10).loss(model, x, y, x_adv, None)
        _, want = ancra.training_loss("mart", model, x, y, x_adv, ra=False, beta=used)
        assert torch.equal(got["loss"], want["loss"])
        losses.append(got["loss"])
    assert not torch.equal(*losses)  # β matters here (KL > 0), so the comparison is sharp


def test_train_step_updates_weights_and_keeps_metrics_on_device():
    step = _step()
    x, y = _batch()
    before = [p.detach().clone() for p in step.model.parameters()]
    metrics = step(x, y, epoch=1)
    assert {"loss", "ce_nat", "kl", "anc", "acc_adv", "acc_neg"} <= set(metrics)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())
    changed = [not torch.equal(b, p) for b, p in zip(before, step.model.parameters())]
    assert sum(changed) > len(changed) // 2
    assert step.model.training


@pytest.mark.parametrize("method, anc, ra, joint, want", [
    # (loss, aux weight, batch, targeted examples) of each PGD call
    ("trades", True, True, True, [("ce", 2.0, 16, 8)]),                     # TRADES-ANCRA, one 2B batch
    ("trades", True, True, False, [("ce", 2.0, 8, 0), ("ce", 2.0, 8, 8)]),  # same, separate batches
    ("trades", False, False, True, [("kl", 0.0, 8, 0)]),                    # vanilla TRADES: its KL attack
    ("trades", False, True, True, [("ce", 2.0, 8, 0)]),                     # TRADES-RA: CE, as the reference
    ("mart", True, False, True, [("ce", 0.0, 16, 8)]),                      # MART-ANC: no aux term
])
def test_train_step_attack_settings(monkeypatch, method, anc, ra, joint, want):
    calls = []
    real_attack = attacks.pgd_steps

    def recording_attack(model, x, y, *args, **kwargs):
        targeted = torch.as_tensor(kwargs.get("targeted", False)).expand(x.shape[0])
        calls.append((kwargs["loss"], kwargs["aux_weight"], x.shape[0], int(targeted.sum())))
        return real_attack(model, x, y, *args, **kwargs)

    monkeypatch.setattr(ancra, "pgd_steps", recording_attack)  # the step's one attack entry
    step = _step(method, anc, ra, speed=SpeedConfig(joint_attacks=joint))
    step(*_batch(), epoch=12)
    assert calls == want


def test_standard_training_uses_clean_inputs(monkeypatch):
    monkeypatch.setattr(ancra, "pgd_steps", lambda *a, **k: pytest.fail("standard training must not attack"))
    metrics = _step("standard", anc=False, ra=False)(*_batch(), epoch=1)
    assert set(metrics) == {"acc_nat", "ce_nat", "loss"}


class MeanThreshold(nn.Module):
    """Predicts class 0 when the mean pixel exceeds 0.5, else class 1."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        m = x.mean((1, 2, 3)) * self.scale
        return torch.stack([m, torch.full_like(m, 0.5)], 1)


def test_monitor_accuracy_matches_hand_computed_accuracies():
    # grey levels / labels: 0.2→1 (robust), 0.8→0 (robust), 0.51→0 (eps-close: broken), 0.45→0 (wrong)
    levels = torch.tensor([51, 204, 130, 115] * 2, dtype=torch.uint8)
    labels = torch.tensor([1, 0, 0, 0] * 2)
    pair = data.TensorPair(levels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous(), labels, ["a", "b"])
    loader = data.BatchLoader(pair, 3, shuffle=False, augment=False)
    model = MeanThreshold()
    result = monitor_accuracy(model.train(), loader, EvalConfig(steps=20))
    assert result == {"nat": 0.75, "pgd": 0.5, "size": 8}
    assert model.training and model.scale.requires_grad


def test_rng_capture_restore_round_trip_is_weights_only_safe(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = capture_rng()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1]) and random.random() == draws[2]


def test_scheduler_state_round_trip_continues_the_schedule(tmp_path):
    params = nn.Linear(1, 1)
    schedule = Schedule(lr=0.1, milestones=(2, 4))
    optimizer = build_optimizer(params, schedule)
    scheduler = build_scheduler(optimizer, schedule)
    optimizer.step()
    scheduler.step()
    torch.save(scheduler_state(scheduler), tmp_path / "s.pt")
    fresh_opt = build_optimizer(params, schedule)
    fresh = build_scheduler(fresh_opt, schedule)
    load_scheduler_state(fresh, torch.load(tmp_path / "s.pt", weights_only=True))
    lrs = []
    for _ in range(3):
        fresh.step()
        lrs.append(fresh_opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.001])


def test_atomic_save_many_shares_one_write_and_survives_replacement(tmp_path):
    best, last = tmp_path / "best.pt", tmp_path / "last.pt"
    atomic_save_many({"epoch": 1}, [best, last])
    atomic_save_many({"epoch": 2}, [last])
    assert torch.load(best, weights_only=True) == {"epoch": 1}
    assert torch.load(last, weights_only=True) == {"epoch": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temp files left


def test_prepare_run_dir_refuses_existing_run_and_overwrite_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    prepare_run_dir(run)
    (run / "args.json").write_text("{}")
    (run / "epoch_10.pt").write_text("x")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="--resume .* --overwrite"):
        prepare_run_dir(run)
    prepare_run_dir(run, overwrite=True)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]


def test_curves_png_has_both_panels_data(tmp_path):
    records = [{"epoch": e, "lr": 0.01, "train": {"loss": 2.0 / e, "kl": 0.1, "acc_adv": 0.3},
                "test": {"nat": 0.5, "pgd": 0.2}, "val": {"nat": 0.4, "pgd": 0.1}, "eval_attack": "PGD-20"}
               for e in (1, 2, 3)]
    plot_curves(records, tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_pgd_at_is_clearly_more_robust_than_standard_training():
    """Same plain WRN-16-1, data, schedule and budget; only the training inputs differ."""
    train = data.make_synthetic("train", 2000, 16, seed=0)
    test = data.make_synthetic("test", 200, 16, seed=0)
    results = {}
    for method in ("standard", "pgd-at"):
        torch.manual_seed(0)
        model = create_model("wrn-16-1", 10, reverse_attention=False)
        schedule = Schedule(lr=0.05, weight_decay=5e-4, milestones=(3,))
        optimizer = build_optimizer(model, schedule)
        config = MethodConfig(method=method, anc=False, ra=False, attack_steps=3, step_size=2.5 * (8 / 255) / 3)
        trainer = Trainer(FastStep(TrainStep(model, optimizer, config, 10)), build_scheduler(optimizer, schedule),
                          data.BatchLoader(train, 64, shuffle=True, augment=False),
                          {"test": data.BatchLoader(test, 200, shuffle=False, augment=False)},
                          RunInfo(None, {}, {}), epochs=3, eval_config=EvalConfig(steps=10), quiet=True)
        results[method] = trainer.fit()[-1]["test"]
    print(results)
    assert results["pgd-at"]["nat"] > 0.8
    assert results["pgd-at"]["pgd"] >= results["standard"]["pgd"] + 0.15


def test_overwrite_replaces_only_a_run_of_ours_and_stale_temp_files_are_ours_only(tmp_path):
    folder = tmp_path / "stray"
    folder.mkdir()
    names = ["log.txt", "best.pt", ".last.pt.ab12cd34.tmp", "notes.txt"]
    for name in names:
        (folder / name).write_text("x")
    with pytest.raises(RunDirError, match=r"\(\.last\.pt\.ab12cd34\.tmp, best\.pt, log\.txt\) but no readable args\.json"):
        prepare_run_dir(folder, overwrite=True)
    (folder / "args.json").write_text("[1, 2]")  # not an args object either
    with pytest.raises(RunDirError, match="not a run of this project"):
        prepare_run_dir(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "args.json"])
    (folder / "args.json").write_text("{}")
    for name in (".metrics.jsonl.k_9x8y7z.tmp", ".epoch_20.pt.aaaaaaaa.tmp", ".notes.txt.abcdefgh.tmp", "x.tmp"):
        (folder / name).write_text("x")
    assert remove_stale_temp_files(folder) == [".epoch_20.pt.aaaaaaaa.tmp", ".last.pt.ab12cd34.tmp",
                                               ".metrics.jsonl.k_9x8y7z.tmp"]
    assert sorted(p.name for p in folder.iterdir()) == [".notes.txt.abcdefgh.tmp", "args.json", "best.pt", "log.txt",
                                                        "notes.txt", "x.tmp"]


def test_read_metrics_refuses_a_damaged_line_and_keeps_records_up_to_an_epoch(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n\n{"epoch": 2}\n{"epoch": 3}\n')
    assert [r["epoch"] for r in read_metrics(tmp_path, 2)] == [1, 2]
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    for damaged in ('{"epoch": 1}\n{"epoch": 2', '{"epoch": 1}\n["epoch", 2]\n', '{"epoch": 1}\n{"epoch": "2"}\n'):
        (tmp_path / "metrics.jsonl").write_text(damaged)
        with pytest.raises(RunDirError, match="is damaged \\(line 2 is not an epoch record\\)"):
            read_metrics(tmp_path)


def test_resumed_records_take_the_checkpoints_own_record(tmp_path):
    write_metrics(tmp_path, [{"epoch": 1, "v": "file"}, {"epoch": 2, "v": "old"}, {"epoch": 3, "v": "old"}])
    payload = {"epoch": 2, "metrics": {"epoch": 2, "v": "checkpoint"}}
    assert resumed_records(tmp_path, payload) == [{"epoch": 1, "v": "file"}, {"epoch": 2, "v": "checkpoint"}]
    write_metrics(tmp_path, [{"epoch": 1, "v": "file"}])  # the metrics write of epoch 2 failed
    assert resumed_records(tmp_path, payload)[-1] == {"epoch": 2, "v": "checkpoint"}
    assert resumed_records(tmp_path, {"epoch": 0, "metrics": None}) == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1  # reading writes nothing


@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_schedule_refuses_non_finite_values(field, value):
    with pytest.raises(ConfigError, match="finite"):
        Schedule(**{field: value})


class _FullDisk(io.FileIO):
    """A real file that takes ``room`` bytes and then fails as a full disk does."""

    room = 4096

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_full_disk_during_torch_save_raises_enospc_and_keeps_the_previous_files(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save_many({"epoch": 1}, [best, last])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: _FullDisk(path, "w"), raising=False)
    big = {"epoch": 2, "w": torch.zeros(10_000)}
    with pytest.raises(OSError) as failure:
        atomic_save_many(big, [best, last])
    assert failure.value.errno == errno.ENOSPC  # not torch's RuntimeError about stream positions
    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: _FullDisk(fd, "w"))
    with pytest.raises(OSError) as failure:
        checkpoint.atomic_save(big, last)
    assert failure.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
