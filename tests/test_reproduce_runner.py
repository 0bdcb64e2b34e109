"""reproduce.py's runner: several rows on one device, children that outlive a killed reproduce.py,
a rerun that sees a row still running, and recovery from what an interrupted or hand-edited run
leaves behind (an empty or cut-off evaluation, a run folder without last.pt, a replaced best.pt)."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import reproduce
from test_reproduce import FakeChildren, _plan, _run
from utils.reproduce import cli
from utils.reproduce.cli import make_plan
from utils.reproduce.commands import EvaluationTool
from utils.reproduce.launcher import Launcher
from utils.reproduce.plan import Plan
from utils.reproduce.runner import StudyRun, describe_slots, row_lock
from utils.reproduce.schedule import device_slots, run_concurrently
from utils.reproduce.state import evaluates_checkpoint, record_evaluated_checkpoint
from utils.reproduce.studies import STUDIES, select_rows

ROOT = Path(__file__).resolve().parents[1]


def _table(tmp_path):
    return json.loads((tmp_path / "table1" / "table.json").read_text())["rows"]


def _evaluations(children):
    return [c for c in children.commands if Path(c[1]).name == "test_white_attack.py"]


# ---------------------------------------------------------------- several rows on one device

def test_device_slots_can_share_a_device():
    assert device_slots("0,0,0", 1) == ("0", "0", "0")
    assert device_slots("0", 1, rows_per_gpu=3) == ("0", "0", "0")
    assert device_slots("0,1", 1, rows_per_gpu=2) == ("0", "1", "0", "1")  # spread over the GPUs first
    assert device_slots("0,1,2,3", 2, rows_per_gpu=2) == ("0,1", "2,3", "0,1", "2,3")
    assert device_slots(None, 1, rows_per_gpu=3) == (None, None, None)     # three rows on the default device
    with pytest.raises(ValueError, match="--rows-per-gpu"):
        device_slots("0", 1, rows_per_gpu=0)
    with pytest.raises(ValueError, match="names a GPU twice"):
        device_slots("0,0", 2)


def test_describe_slots():
    assert describe_slots(("0", "1", "0", "1")) == "2 on GPU 0, 2 on GPU 1"
    assert describe_slots(("0,1", "0,1")) == "2 on GPUs 0,1"
    assert describe_slots((None, None)) == "2 on the default device"


def test_rows_per_gpu_comes_from_the_option_else_the_study(tmp_path, monkeypatch):
    args = reproduce.parse_args(["table1", "--rows-per-gpu", "3", "--out-dir", str(tmp_path)])
    assert make_plan(args).slots == (None, None, None)
    assert make_plan(reproduce.parse_args(["table1", "--out-dir", str(tmp_path)])).slots == (None,)
    study = dataclasses.replace(STUDIES["table1"])
    object.__setattr__(study, "rows_per_device", 3)  # how a study asks for concurrent rows by default
    monkeypatch.setitem(cli.STUDIES, "table1", study)
    assert make_plan(reproduce.parse_args(["table1", "--out-dir", str(tmp_path)])).slots == (None,) * 3
    args = reproduce.parse_args(["table1", "--rows-per-gpu", "1", "--out-dir", str(tmp_path)])
    assert make_plan(args).slots == (None,)  # the option wins


def test_three_slots_on_one_device_run_three_items_at_once():
    lock, running, peak = threading.Lock(), [0], [0]

    def work(_item, slot):
        assert slot == "0"
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.1)
        with lock:
            running[0] -= 1

    assert run_concurrently(range(6), ("0", "0", "0"), work, threading.Event()) == []
    assert peak[0] == 3


def test_three_rows_share_one_gpu_in_the_runner(tmp_path):
    study = STUDIES["table1"]
    plan = Plan(study, select_rows(study, "pgd-at,trades,mart"), tmp_path, "cifar10", 2, (1, 2, 3), 4,
                slots=device_slots("0", 1, rows_per_gpu=3))
    spans, lock = {}, threading.Lock()

    class Timed(FakeChildren):
        def run(self, command, env, log_path, prefix="", keep_fds=()):
            started = time.monotonic()
            result = super().run(command, env, log_path, prefix, keep_fds)
            if Path(command[1]).name.startswith("train_"):
                with lock:
                    spans[prefix] = (started, time.monotonic())
            return result

    children = Timed(delay=0.3)
    code, lines = _run(plan, children)
    assert "up to 3 rows at a time: 3 on GPU 0" in lines
    assert code == 0 and [r["status"] for r in _table(tmp_path)] == ["done"] * 3
    assert {device for _, device in children.devices} == {"0"}
    starts, ends = zip(*spans.values())
    assert len(spans) == 3 and max(starts) < min(ends)  # the three trainings overlapped


def test_launcher_runs_real_children_side_by_side(tmp_path):
    child = "import sys, time; print('start', time.time(), flush=True); time.sleep(1.0); print('end', time.time())"
    launcher, results = Launcher(echo=lambda _line: None, poll=0.05), {}

    def work(item, _slot):
        results[item] = launcher.run([sys.executable, "-c", child], dict(os.environ), tmp_path / f"{item}.log")

    run_concurrently(range(3), (None,) * 3, work, threading.Event())
    spans = []
    for code, tail in results.values():
        assert code == 0
        spans.append([float(line.split()[1]) for line in tail if line.startswith(("start", "end"))])
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # all three were running at one moment


# ---------------------------------------------------------------- children outlive a killed reproduce.py

PARENT = """
import os, sys
from utils.reproduce.launcher import Launcher
code, tail = Launcher(echo=lambda line: print(line, flush=True), poll=0.05).run(
    [sys.executable, "-c", sys.argv[1]], dict(os.environ), sys.argv[2], "[row]")
"""
CHILD = """
import pathlib, sys, time
folder = pathlib.Path({folder!r})
print('epoch 1/2', flush=True)
while not (folder / 'go').exists():
    time.sleep(0.05)
for _ in range(200):
    print('epoch 2/2 and a long line to fill any buffer ' * 4, flush=True)
(folder / 'finished').write_text('ok')
"""


def test_a_child_finishes_its_step_after_reproduce_py_is_killed(tmp_path):
    log = tmp_path / "row.reproduce.log"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD.format(folder=str(tmp_path)), str(log)],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not (log.exists() and "epoch 1/2" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    parent.kill()  # SIGKILL: no handler, no cleanup
    parent.wait(10)
    (tmp_path / "go").write_text("")
    while not (tmp_path / "finished").exists() and time.time() < deadline + 30:
        time.sleep(0.05)
    assert (tmp_path / "finished").exists(), log.read_text()
    assert sum(line.startswith("epoch 2/2") for line in log.read_text().splitlines()) == 200


# ---------------------------------------------------------------- a rerun sees a row that still runs

def _done_once(tmp_path, only="pgd-at,trades"):
    assert _run(_plan(tmp_path, only), FakeChildren())[0] == 0
    return _plan(tmp_path, only)


def test_a_rerun_refuses_a_row_whose_training_still_holds_the_run_folder(tmp_path):
    plan = _plan(tmp_path, "pgd-at,trades")
    _run(plan, FakeChildren(epoch_cap=1))  # both rows trained 1 of 2 epochs
    busy = plan.run_dir(plan.rows[0])
    (busy / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                            "started": "2026-01-01T00:00:00", "command": "train_baselines.py"}))
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 1
    assert any(line.startswith("[row 1/2 pgd-at] not started:") and f"pid {os.getpid()}" in line and
               "wait for it to finish" in line for line in lines)
    assert not any(str(busy) in " ".join(c) for c in children.commands)  # nothing started on it
    assert "still running in another process: pgd-at" in lines[-1]
    assert [r["status"] for r in _table(tmp_path)] == ["running in another process (rerun when it finishes)", "done"]


def test_a_stale_training_lock_does_not_block_the_row(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren(epoch_cap=1))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (plan.run_dir(plan.rows[0]) / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert _run(plan, FakeChildren())[0] == 0


def test_a_rerun_refuses_a_row_whose_step_outlived_its_reproduce_py(tmp_path):
    plan = _done_once(tmp_path)
    row = plan.rows[0]
    with row_lock(plan.runs_dir(row), plan.run_dir(row).name) as held:  # as an orphaned child holds it
        assert held is not None
        children = FakeChildren()
        code, lines = _run(plan, children)
    assert code == 1 and children.commands == []
    assert any("another process still works on" in line and f"pid {os.getpid()}" in line for line in lines)
    assert not any(line.startswith("[row 1/2") and "already done" in line for line in lines)
    assert sum("already done" in line for line in lines) == 1
    assert _run(plan, FakeChildren())[0] == 0  # once it is over, the rerun is clean


# ---------------------------------------------------------------- evaluations left behind

def test_an_evaluation_stopped_before_its_first_attack_starts_afresh(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren())
    eval_dir = plan.eval_dir(plan.rows[0])
    for name in ("results.json", "report.md", "checkpoint.json"):
        (eval_dir / name).unlink(missing_ok=True)
    assert eval_dir.is_dir() and not any(eval_dir.iterdir())  # what Ctrl-C in the first attack leaves
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 0, lines
    assert len(_evaluations(children)) == 1 and "--resume" not in _evaluations(children)[0]


def test_a_partial_evaluation_is_resumed(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren())
    eval_dir = plan.eval_dir(plan.rows[0])
    os.replace(eval_dir / "results.json", eval_dir / "results.partial.json")
    children = FakeChildren()
    assert _run(plan, children)[0] == 0
    assert "--resume" in _evaluations(children)[0]


def test_a_cut_off_results_json_is_moved_aside_and_evaluated_again(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren())
    eval_dir = plan.eval_dir(plan.rows[0])
    text = (eval_dir / "results.json").read_text()
    (eval_dir / "results.json").write_text(text[: len(text) // 2])
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 0, lines
    assert any("note: results.json was cut off or unreadable" in line for line in lines)
    assert "--resume" not in _evaluations(children)[0]
    kept = list(eval_dir.glob("results.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_text() == text[: len(text) // 2]  # moved, never deleted
    assert json.loads((eval_dir / "results.json").read_text())["clean"]["accuracy"] == 0.5
    assert _table(tmp_path)[0]["status"] == "done"


# ---------------------------------------------------------------- the evaluated checkpoint

def test_a_run_folder_without_last_pt_is_refused_never_overwritten(tmp_path):
    plan = _done_once(tmp_path)
    run_dir = plan.run_dir(plan.rows[0])
    (run_dir / "last.pt").unlink()
    (run_dir / "epoch_2.pt").write_bytes(b"weights")
    before = sorted(p.name for p in run_dir.iterdir())
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 1 and children.commands == []
    assert any("holds best.pt, epoch_2.pt but no last.pt" in line and "move the folder away" in line for line in lines)
    assert sorted(p.name for p in run_dir.iterdir()) == before
    status = _table(tmp_path)[0]["status"]
    assert status.startswith("failed: training:") and _table(tmp_path)[0]["ours"] is None  # no old numbers


def test_a_run_folder_that_never_finished_an_epoch_starts_over(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    run_dir = plan.run_dir(plan.rows[0])
    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text("{}")
    (run_dir / "log.txt").write_text("started\n")
    children = FakeChildren()
    assert _run(plan, children)[0] == 0
    assert "--overwrite" in children.commands[0]


def test_an_evaluation_of_another_best_pt_is_never_reported(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren())
    run_dir, eval_dir = plan.run_dir(plan.rows[0]), plan.eval_dir(plan.rows[0])
    (run_dir / "best.pt").unlink()
    torch.save({"epoch": 2, "retrained": True}, run_dir / "best.pt")  # retrained by hand with --overwrite
    table = StudyRun(plan, launcher=FakeChildren(), tool=EvaluationTool(True, False), echo=lambda _l: None)
    table.write_table()
    assert _table(tmp_path)[0]["ours"] is None  # the old numbers are not shown for the new checkpoint
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 0 and len(_evaluations(children)) == 1 and "--resume" not in _evaluations(children)[0]
    assert any("holds an evaluation of another best.pt" in line for line in lines)
    moved = list(run_dir.glob(f"{eval_dir.name}.other-checkpoint-*"))
    assert len(moved) == 1 and (moved[0] / "results.json").exists()
    assert evaluates_checkpoint(eval_dir, run_dir / "best.pt")


def test_an_evaluation_is_kept_while_its_best_pt_is_missing(tmp_path):
    plan = _plan(tmp_path, "pgd-at")
    _run(plan, FakeChildren())
    run_dir, eval_dir = plan.run_dir(plan.rows[0]), plan.eval_dir(plan.rows[0])
    os.replace(run_dir / "best.pt", tmp_path / "elsewhere.pt")
    os.replace(eval_dir / "results.json", eval_dir / "results.partial.json")
    _run(plan, FakeChildren())  # (the real evaluation would fail on the missing checkpoint; the fake ignores it)
    assert (eval_dir / "results.partial.json").exists() and not list(run_dir.glob("*other-checkpoint*"))


def test_the_evaluated_checkpoint_is_its_content(tmp_path):
    ckpt, eval_dir = tmp_path / "best.pt", tmp_path / "eval"
    eval_dir.mkdir()
    ckpt.write_bytes(b"model A")
    assert not evaluates_checkpoint(eval_dir, ckpt)          # no record and no results: nothing evaluated
    record_evaluated_checkpoint(eval_dir, ckpt)
    assert evaluates_checkpoint(eval_dir, ckpt)
    ckpt.unlink()
    ckpt.write_bytes(b"model A")                              # same bytes, new file and mtime
    os.utime(ckpt, ns=(1, 1))
    assert evaluates_checkpoint(eval_dir, ckpt)
    ckpt.write_bytes(b"model B")
    assert not evaluates_checkpoint(eval_dir, ckpt)
    ckpt.unlink()
    assert not evaluates_checkpoint(eval_dir, ckpt)


def test_an_evaluation_without_a_record_counts_only_when_newer_than_the_checkpoint(tmp_path):
    ckpt, eval_dir = tmp_path / "best.pt", tmp_path / "eval"
    eval_dir.mkdir()
    ckpt.write_bytes(b"model")
    (eval_dir / "results.json").write_text("{}")
    os.utime(ckpt, ns=(10**18, 10**18))
    os.utime(eval_dir / "results.json", ns=(2 * 10**18, 2 * 10**18))
    assert evaluates_checkpoint(eval_dir, ckpt)
    os.utime(ckpt, ns=(3 * 10**18, 3 * 10**18))
    assert not evaluates_checkpoint(eval_dir, ckpt)


# ---------------------------------------------------------------- slow: the WRN and Tiny-ImageNet studies

def _smoke(study, row, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "reproduce.py"), study, "--smoke", "--only", row, "--out-dir",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize("study,row", [("wrn", "wrn-34-10-trades-ancra"), ("tiny-imagenet", "trades-ancra")])
def test_smoke_study_completes_end_to_end(tmp_path, study, row):
    """One RA row per study (the whole study is several minutes per row on two CPU cores)."""
    done = _smoke(study, row, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = json.loads((tmp_path / study / "table.json").read_text())
    record = table["rows"][0]
    assert record["status"] == "done" and record["ours"]["natural"]["robust"] is not None
    assert set(record["batchnorm"]) >= {"eval", "batch_stats"}  # the shared-final-BatchNorm check ran
    assert record["worst_case"]["accuracy"] is not None
    again = _smoke(study, row, tmp_path)
    assert again.returncode == 0 and "already done" in again.stdout
