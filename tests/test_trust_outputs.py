"""Trust, round three (issue 28), outside training: no output is written over an input or another
output of the same command; no robust figure without an attack of the threat model; options that
would change nothing are refused in one line; shared study records survive concurrent writers;
lock messages say which file to remove; no message relays advice to disable a safety check.

Read-only folders are simulated by patching ``os.access`` (so the tests also hold when they run as
root, for whom permission bits change nothing)."""
import argparse
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reproduce
import test_white_attack
from benchmarks import eval_cascade, gpu_session
from test_adaptive import result_like
from test_eval_trust import FAST, _call, _checkpoint, _snapshot
from test_robustbench import Small, registry
from test_robustbench import _wrn_checkpoint as plain_checkpoint
from test_verdict import _verdict_table
from utils import locks
from utils.cli import InertOptionError
from utils.evaluation import command, compare, robustbench, sweep
from utils.evaluation import options as eval_options
from utils.evaluation.catalogue import BUDGETS, Settings, attack_catalogue, select_attacks
from utils.evaluation.results import Evaluation
from utils.reproduce import cli, verdict, verdict_run
from utils.reproduce.state import StateFile

ROOT = Path(__file__).resolve().parents[1]
EVAL = [*FAST, "--indicators", "0"]


def _deny_writes(monkeypatch, module, folder):
    """``os.access`` as seen by ``module`` says ``folder`` (and what is below it) is not writable."""
    real = os.access
    folder = str(Path(folder).resolve())

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and str(Path(path).resolve()).startswith(folder):
            return False
        return real(path, mode, *args, **kwargs)
    monkeypatch.setattr(module.os, "access", access)


def _one_line_refusal(code, err, *needles):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------- outputs never over inputs or outputs

@pytest.fixture(scope="module")
def ra_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("i28") / "run")


def test_export_onto_the_evaluated_checkpoint_is_refused_and_nothing_changes(tmp_path, capsys):
    path = _checkpoint(tmp_path / "run")
    before = _snapshot(tmp_path)
    code, err = _call(test_white_attack.main, ["--ckpt", str(path), *EVAL, "--attacks", "fgsm", "--out-dir",
                                               str(tmp_path / "e"), "--export-robustbench", str(path)], capsys)
    _one_line_refusal(code, err, "is the input", "new .json file")
    assert _snapshot(tmp_path) == before and torch.load(path, weights_only=True)["epoch"] == 2


def test_export_onto_the_runs_own_results_is_refused(ra_ckpt, tmp_path, capsys):
    out = tmp_path / "e"
    for target in (out / "results.json", out / "report.md", out / "eps_sweep" / "x.json"):
        code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), *EVAL, "--attacks", "fgsm", "--out-dir",
                                                   str(out), "--export-robustbench", str(target)], capsys)
        _one_line_refusal(code, err, "an output of this evaluation")
        assert not out.exists()


def test_export_over_another_file_is_refused_but_an_earlier_export_is_rewritten_through_its_link(ra_ckpt, tmp_path,
                                                                                                 capsys):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}\n')
    code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), *EVAL, "--attacks", "fgsm", "--out-dir",
                                               str(tmp_path / "a"), "--export-robustbench", str(other)], capsys)
    _one_line_refusal(code, err, "not an earlier RobustBench export")
    assert other.read_text() == '{"mine": 1}\n' and not (tmp_path / "a").exists()

    export = tmp_path / "info.json"
    link = tmp_path / "latest.json"
    link.symlink_to(export.name)
    argv = ["--ckpt", str(ra_ckpt), *EVAL, "--attacks", "fgsm", "--export-robustbench", str(link)]
    assert test_white_attack.main([*argv, "--out-dir", str(tmp_path / "b")]) == 0   # a dangling link: its target made
    assert link.is_symlink() and robustbench.is_model_info(export)
    assert test_white_attack.main([*argv, "--out-dir", str(tmp_path / "c")]) == 0   # its own earlier output: rewritten
    assert link.is_symlink() and json.loads(export.read_text())["external"] is not None


# ---------------------------------------------------------------- no robust figure without a threat-model attack

def _hand(clean, results):
    return Evaluation(np.zeros(len(clean), int), np.array(clean, bool), {}, results)


def test_reference_attacks_alone_give_no_robust_figure_anywhere():
    evaluation = _hand([1, 1, 1, 0], [result_like("ref-fgsm", [1, 0, 1, 0])])
    evaluation.meta = {"eps": 8 / 255, "n_examples": 4, "subset_seed": 0, "dataset": "synthetic"}
    report = evaluation.to_json()
    assert evaluation.robust_accuracy() is None
    assert report["worst_case"]["accuracy"] is None and report["worst_case"]["robust_count"] is None
    assert report["worst_case"]["correct"] is None and "no attack of the threat model ran" in report["worst_case"][
        "missing"]
    text = evaluation.markdown()
    assert "There is no robust-accuracy figure: no attack of the threat model ran" in text
    assert "**75.00 %**" not in text and "| **worst case (threat model)** | — | — | — (none" in text
    info = robustbench.model_info(report)
    assert info["external"] is None and info["footnote"].startswith("No external robust accuracy")
    row = compare.row("m", report, Path("/nowhere"))
    assert row["worst_case"] is None and row["worst_case_ci95"] == [None, None] and row["paper_protocol"] is None
    table = compare.markdown_table([row], {"dataset": "synthetic", "n": 4, "subset_seed": 0, "eps_text": "8/255"})
    assert "| m | 75.00 % | — | — | — | none |" in table
    report["meta"]["indices"], report["labels"] = [0, 1, 2, 3], [0, 0, 0, 0]
    assert "m has no robust figure" in compare.pairing_refusal(["m", "n"], [report, report])  # never paired


def test_a_threat_model_attack_that_saw_only_some_examples_gives_no_figure():
    partial = result_like("pgd10", [1, 0, 1, 0])
    partial.received = np.array([1, 0, 0, 0], bool)  # attacked one of the three clean-correct examples
    evaluation = _hand([1, 1, 1, 0], [partial])
    assert "on every clean-correct example" in evaluation.missing_robust_figure()
    full = result_like("fgsm", [1, 0, 1, 0])
    assert _hand([1, 1, 1, 0], [full, partial]).robust_accuracy() == 0.5  # examples 0 and 2


def test_ref_fgsm_run_has_a_null_figure_and_the_export_is_refused_up_front(ra_ckpt, tmp_path, capsys):
    out = tmp_path / "e"
    code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), *EVAL, "--attacks", "ref-fgsm", "--out-dir",
                                               str(out), "--export-robustbench", str(tmp_path / "i.json")], capsys)
    _one_line_refusal(code, err, "--export-robustbench would change nothing", "no attack of the threat model")
    assert not out.exists()
    assert test_white_attack.main(["--ckpt", str(ra_ckpt), *EVAL, "--attacks", "ref-fgsm", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["worst_case"]["accuracy"] is None and results["worst_case"]["missing"]
    assert "There is no robust-accuracy figure" in (out / "report.md").read_text()


# ---------------------------------------------------------------- the ε-sweep

def test_a_repeated_sweep_radius_is_refused_in_one_line(ra_ckpt, capsys):
    for text in ("0,8,8,8/255", "0,8,8", "0.5,2,2/255", "8/255,0.0313725490196078,8"):
        with pytest.raises(argparse.ArgumentTypeError, match="names one radius"):
            sweep.parse_eps_sweep(text)
    code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), *EVAL, "--eps-sweep", "0,8,8,8/255"], capsys)
    _one_line_refusal(code, err, "give each radius once")


def test_the_high_end_check_is_not_run_on_a_small_largest_radius():
    def nested(accuracies, n=100):
        return {"c": [[i < round(a * n) for i in range(n)] for a in accuracies]}

    checks = {c["name"]: c for c in sweep.curve_checks((0, 4 / 255, 8 / 255), {"c": [0.9, 0.6, 0.4]},
                                                       nested([0.9, 0.6, 0.4]), n=100)}
    high = checks["c reaches ≤ 1 % at the largest ε"]
    assert high["status"] == "n/a" and "add 64/255" in high["message"] and "another class fits" not in high["message"]
    checks = {c["name"]: c for c in sweep.curve_checks((0, 8 / 255, 64 / 255), {"c": [0.9, 0.4, 0.2]},
                                                       nested([0.9, 0.4, 0.2]), n=100)}
    assert checks["c reaches ≤ 1 % at the largest ε"]["status"] == "FLAG"


# ---------------------------------------------------------------- options that would change nothing: evaluation

def test_aux_weight_on_a_plain_model_is_refused_not_reported(tmp_path, capsys):
    path = plain_checkpoint(tmp_path)
    out = tmp_path / "e"
    code, err = _call(test_white_attack.main, ["--ckpt", str(path), *EVAL, "--attacks", "all", "--aux-weight", "7",
                                               "--out-dir", str(out)], capsys)
    _one_line_refusal(code, err, "--aux-weight would change nothing", "no RA heads")
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (["--attacks", "fgsm", "--aux-weight", "7"], ("--aux-weight would change nothing", "no attack with p")),
    (["--attacks", "fgsm", "--full-set", "autoattack"], ("--full-set would change nothing", "does not run autoattack")),
    (["--attacks", "paper", "--full-set", "pgd40"], ("--full-set would change nothing", "always run on every example")),
    (["--attacks", "fgsm+p", "--taus", "1"], ("--taus would change nothing", "no straight-through")),
    (["--attacks", "fgsm+p", "--joint-weights", "1"], ("--joint-weights would change nothing", "no joint attack")),
])
def test_attack_options_the_chosen_attacks_do_not_use_are_refused(ra_ckpt, tmp_path, capsys, extra, needles):
    out = tmp_path / "e"
    code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), *EVAL, *extra, "--out-dir", str(out)], capsys)
    _one_line_refusal(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--no-cascade", "--full-set", "autoattack"], "--full-set would change nothing"),
    (["--weights", "w.pt"], "--weights would change nothing"),
    (["--threat-model", "L2"], "--threat-model would change nothing"),
])
def test_parse_time_inert_options_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        test_white_attack.parse_args(["--ckpt", "x.pt", *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and needle in err and err.count("\n") == 1


def test_used_attack_options_are_accepted():
    catalogue = attack_catalogue(Settings(budget=BUDGETS["small"]), 10, 2)
    specs, skipped = select_attacks("all", catalogue, True)
    given = ["aux_weight", "joint_weights", "taus", "full_set", "export_robustbench"]
    args = argparse.Namespace(attacks="all", eps=8 / 255, full_set=("autoattack", "autoattack+p"), given_options=given)
    command.check_attack_options(args, [(specs, skipped, 2)])
    plain, skipped = select_attacks("all", catalogue, False)  # AA+p is skipped for a plain model, and listed so
    args = argparse.Namespace(attacks="all", eps=8 / 255, full_set=("autoattack", "autoattack+p"),
                              given_options=["full_set"])
    command.check_attack_options(args, [(plain, skipped, 0)])
    args = argparse.Namespace(attacks="all", eps=8 / 255, full_set=(), given_options=["aux_weight"])
    with pytest.raises(InertOptionError, match="no RA heads"):
        command.check_attack_options(args, [(plain, skipped, 0)])
    command.check_attack_options(args, [(plain, skipped, 0), (specs, [], 2)])  # λ is used by one of the models


def test_compare_refuses_an_idle_option_before_the_first_evaluation_and_keeps_one_some_model_uses(
        ra_ckpt, tmp_path, capsys):
    plain = plain_checkpoint(tmp_path)
    (tmp_path / "b").mkdir()
    out = tmp_path / "cmp"
    code, err = _call(test_white_attack.main, ["--ckpt", str(plain), str(plain_checkpoint(tmp_path / "b")),
                                               *EVAL, "--attacks", "fgsm", "--aux-weight", "7", "--out-dir",
                                               str(out)], capsys)
    _one_line_refusal(code, err, "--aux-weight would change nothing")
    assert not out.exists()
    code, err = _call(test_white_attack.main, ["--ckpt", str(ra_ckpt), str(plain), *EVAL, "--attacks", "fgsm,fgsm+p",
                                               "--aux-weight", "7", "--out-dir", str(out)], capsys)
    assert code == 0, err  # λ changes the RA model's fgsm+p; the plain model skips it
    assert (out / "comparison.md").exists()


# ---------------------------------------------------------------- reproduce.py

def _reproduce(argv, capsys):
    code = cli.main(reproduce.parse_args(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["table1", "--smoke", "--gpus", ""], "--gpus would change nothing"),
    (["--list", "--smoke"], "--smoke would change nothing here: --list only prints"),
    (["table1", "--smoke", "--data-dir", "/d"], "--data-dir would change nothing"),
    (["table1", "--record", "R.md"], "belong to the verdict study"),
])
def test_reproduce_refuses_options_that_change_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = _reproduce([*argv, "--out-dir", str(tmp_path / "out")], capsys)
    _one_line_refusal(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_reproduce_refuses_a_read_only_out_dir_before_any_work(tmp_path, monkeypatch, capsys):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _deny_writes(monkeypatch, eval_options, read_only)
    code, err = _reproduce(["table1", "--smoke", "--out-dir", str(read_only / "x")], capsys)
    _one_line_refusal(code, err, "not writable")
    assert list(read_only.iterdir()) == []


def _verdict_argv(tmp_path, record):
    return ["verdict", "--dataset", "cifar10", "--out-dir", str(tmp_path / "out"), "--record", str(record)]


def test_record_into_a_read_only_folder_or_over_another_file_is_refused_up_front(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: True)  # --record needs a GPU run
    folder = tmp_path / "ro"
    folder.mkdir()
    _deny_writes(monkeypatch, cli, folder)
    code, err = _reproduce(_verdict_argv(tmp_path, folder / "RESULTS.md"), capsys)
    _one_line_refusal(code, err, "is not writable")
    other = tmp_path / "README.md"
    other.write_text("# Not verdicts\n")
    code, err = _reproduce(_verdict_argv(tmp_path, other), capsys)
    _one_line_refusal(code, err, "is not a file of recorded verdicts")
    assert other.read_text() == "# Not verdicts\n" and not (tmp_path / "out").exists()


def test_record_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "real" / "RESULTS.md"
    target.parent.mkdir()
    target.write_text(verdict.RESULTS_HEADER)
    link = tmp_path / "RESULTS.md"
    link.symlink_to(target)
    cli.check_record_path(str(link))  # its target is a file of verdicts: accepted
    verdict.append_record(link, _verdict_table(), "NVIDIA H200", "python reproduce.py verdict", "2026-12-07")
    assert link.is_symlink() and "## Verdict of 2026-12-07, NVIDIA H200" in target.read_text()


def test_a_failed_record_write_is_one_line(tmp_path, monkeypatch, capsys):
    plan = cli.make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))

    class Done:
        def __init__(self, p):
            self.plan = p

        def run(self):
            self.plan.study_dir.mkdir(parents=True, exist_ok=True)
            (self.plan.study_dir / "table.json").write_text(json.dumps(_verdict_table()))
            return 0

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(verdict_run, "finish", lambda *a, **k: None)
    monkeypatch.setattr(verdict, "atomic_write_text", full_disk)
    args = argparse.Namespace(time_budget=None, record=str(tmp_path / "RESULTS.md"))
    assert verdict_run.run_verdict(plan, args, ["python", "reproduce.py"], make_run=Done) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "rerun the same command" in err


WRITER = """
import sys
from utils.reproduce.state import StateFile
state = StateFile(sys.argv[1])
for i in range(40):
    state.update(sys.argv[2], status="running", step=i)
    state.update(sys.argv[2], **{"commit_training": "c-" + sys.argv[2]})
"""


def test_two_processes_writing_state_json_lose_nothing(tmp_path):
    path = tmp_path / "table1" / "state.json"
    path.parent.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), row], cwd=ROOT) for row in ("a", "b")]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    rows = StateFile(path).rows
    assert rows["a"]["commit_training"] == "c-a" and rows["b"]["commit_training"] == "c-b"
    assert rows["a"]["step"] == rows["b"]["step"] == 39


def test_a_state_file_sees_another_writers_rows(tmp_path):
    first, second = StateFile(tmp_path / "state.json"), StateFile(tmp_path / "state.json")
    first.update("a", commit_evaluation="x")
    second.update("b", status="done")
    assert first.get("b") == second.get("b") and second.get("a")["commit_evaluation"] == "x"


# ---------------------------------------------------------------- the benchmarks

def test_gpu_session_refuses_unpack_dir_where_nothing_is_unpacked(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_session.parse_args(["--dry-run", "--out-dir", str(tmp_path / "o"), "--unpack-dir", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--unpack-dir would change nothing" in err and err.count("\n") == 1


def test_eval_cascade_refuses_parallel_with_one_mode(ra_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        eval_cascade.parse_args(["--ckpt", str(ra_ckpt), "--out-dir", str(tmp_path / "o"), "--modes", "cascade",
                                 "--parallel"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--parallel would change nothing" in err and err.count("\n") == 1


# ---------------------------------------------------------------- locks and messages

def _lock(folder, **record):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / locks.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "started": "earlier",
                                                      "command": "test_white_attack.py", **record}))


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def test_a_reused_pid_is_a_stale_lock(tmp_path, live_pid, capsys):
    start = locks.process_start(live_pid)
    if start is None:
        pytest.skip("no /proc here: a process start time cannot be read")
    _lock(tmp_path / "a", pid=live_pid, pid_start=start + 1)  # the pid now belongs to a later process
    assert locks.lock_is_stale(locks.read_lock(tmp_path / "a"))
    with locks.FolderLock(tmp_path / "a"):
        assert locks.read_lock(tmp_path / "a")["pid"] == os.getpid()
    assert "removing the stale lock" in capsys.readouterr().err
    _lock(tmp_path / "b", pid=live_pid, pid_start=start, boot_id="another-boot")  # written before a reboot
    assert locks.boot_id() is None or locks.lock_is_stale(locks.read_lock(tmp_path / "b"))
    _lock(tmp_path / "c", pid=live_pid, pid_start=start, boot_id=locks.boot_id())  # the owner itself
    assert not locks.lock_is_stale(locks.read_lock(tmp_path / "c"))
    assert locks.owner_verified(locks.read_lock(tmp_path / "c"))


def test_an_unverifiable_live_lock_names_the_file_to_remove_shell_quoted(tmp_path, live_pid):
    folder = tmp_path / "my eval"
    _lock(folder, pid=live_pid)  # no start time recorded: the owner cannot be verified
    with pytest.raises(locks.LockError) as refused:
        locks.check_unlocked(folder, "an evaluation")
    message = str(refused.value)
    assert f"pid {live_pid}" in message and "cannot be shown to be that command" in message
    assert f"rm '{folder / locks.LOCK_NAME}'" in message and "\n" not in message


def test_the_resume_hint_is_shell_quoted(tmp_path):
    progress = command.Progress()
    progress.out_dir, progress.saved = tmp_path / "eval 1", 1
    assert f"--resume --out-dir '{tmp_path / 'eval 1'}'" in progress.resume_hint()


def test_a_pickle_in_robustbenchs_layout_is_refused_without_torchs_advice(tmp_path):
    path = robustbench.weight_path(tmp_path, "cifar10", "Linf", "Tiny")
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": Small()}, path)  # a pickled module: code, never run
    with pytest.raises(robustbench.RobustBenchError) as refused:
        robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())
    message = str(refused.value)
    assert "cannot read" in message and "pickled Python code" in message
    assert "weights_only" not in message and "trust" not in message.lower()
    path.write_bytes(pickle.dumps({"a": 1}))  # a plain pickle, not torch.save
    with pytest.raises(robustbench.RobustBenchError) as refused:
        robustbench.load_robustbench("Tiny", model_dir=tmp_path, registry=registry())
    assert "weights_only" not in str(refused.value)


def test_a_last_pt_with_code_is_reported_without_torchs_advice(tmp_path):
    from utils.checkpoint import LAST
    from utils.reproduce.state import RunStateError, training_progress
    torch.save({"epoch": 1, "args": {"epochs": 2}, "model": Small()}, tmp_path / LAST)
    with pytest.raises(RunStateError) as refused:
        training_progress(tmp_path)
    message = str(refused.value)
    assert "pickled Python objects" in message and "\n" not in message
    assert "weights_only" not in message and "trust" not in message.lower()


def test_the_training_stop_hint_is_shell_quoted(tmp_path):
    from types import SimpleNamespace

    from utils.training.errors import TrainingInterrupted
    from utils.training.trainer import Trainer
    run_dir = tmp_path / "my run"
    trainer = SimpleNamespace(run=SimpleNamespace(run_dir=run_dir), completed_epochs=1,
                              context=SimpleNamespace(enabled=False), stop=SimpleNamespace(reason="SIGTERM"))
    for mid_epoch in (True, False):
        with pytest.raises(TrainingInterrupted) as stopped:
            Trainer._stop_now(trainer, 2, mid_epoch=mid_epoch)
        assert f"--resume '{run_dir}'" in str(stopped.value)
