"""reproduce.py: studies, milestone scaling, scheduling, the table, the BatchNorm check, the
runner's resume/failure logic (fake children), signal forwarding, and (slow) the whole
``table1 --smoke`` chain interrupted, failed, resumed and rerun."""
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import reproduce
from utils import data, recipe
from utils.reproduce import bn, commands, paper
from utils.reproduce.cli import make_plan
from utils.reproduce.commands import EvaluationTool
from utils.reproduce.launcher import Launcher
from utils.reproduce.plan import Plan
from utils.reproduce.runner import StudyRun, failure_line
from utils.reproduce.schedule import device_slots, run_concurrently
from utils.reproduce.state import finished_results, training_progress
from utils.reproduce.studies import STUDIES, run_name, scale_milestones, select_rows
from utils.reproduce.table import RowInput, build_table, render_markdown

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- studies and schedules

def test_milestones_scale_the_recipe_and_stay_increasing():
    assert scale_milestones(120) == (75, 90, 100) == tuple(recipe.MILESTONES)
    assert scale_milestones(15) == (9, 11, 13)       # 9.375, 11.25, 12.5 (half up)
    assert scale_milestones(30) == (19, 23, 25)      # 18.75, 22.5, 25
    assert scale_milestones(1) == (1, 2, 3)          # all round to <= 1, then pushed up
    for epochs in range(1, 200):
        m = scale_milestones(epochs)
        assert m[0] >= 1 and all(a < b for a, b in itertools.pairwise(m))
    with pytest.raises(ValueError):
        scale_milestones(0)


def test_studies_are_the_papers_rows():
    assert [r.label for r in STUDIES["table1"].rows] == ["PGD-AT", "TRADES", "MART", "PGD-AT-ANCRA", "TRADES-ANCRA",
                                                          "MART-ANCRA"]
    assert [r.label for r in STUDIES["ablation"].rows] == ["TRADES", "TRADES-ANC", "TRADES-RA", "TRADES-ANCRA"]
    ablation = STUDIES["ablation"]
    assert ablation.row("trades-anc").options == ("--method", "trades", "--no-ra")
    assert not ablation.row("trades-anc").reverse_attention and ablation.row("trades-ra").reverse_attention
    assert ablation.row("trades").home == "table1" and ablation.row("trades-anc").home is None
    assert {r.arch for r in STUDIES["wrn"].rows} == {"wrn-34-10", "wrn-28-10"}
    for study in STUDIES.values():
        for row in study.rows:
            assert study.dataset in data.DATASETS
            assert row.paper is None or row.paper in paper.REPORTED
            assert row.shares_final_bn == (study.name in ("wrn", "tiny-imagenet"))
    assert paper.REPORTED["cifar10/trades-ancra"].figures["pgd40+p"] == 61.68
    assert paper.REPORTED["ablation/trades-ra"].figures["autoattack"] == 61.02


def test_separate_batchnorm_row_is_the_wrn_row_plus_the_option_in_its_own_run_folder():
    wrn = STUDIES["wrn"]
    base, ablation = wrn.row("wrn-34-10-trades-ancra"), wrn.row("wrn-34-10-trades-ancra-sepbn")
    assert ablation.options == base.options + ("--separate-bn",) and ablation.paper is None
    assert run_name(ablation, "cifar10", 0, 120) == "cifar10_wrn-34-10_trades-ancra_sepbn_s0"
    assert run_name(ablation, "cifar10", 0, 120) != run_name(base, "cifar10", 0, 120)


def test_row_selection_and_run_names():
    table1 = STUDIES["table1"]
    assert [r.name for r in select_rows(table1, "mart,pgd-at")] == ["pgd-at", "mart"]  # study order
    with pytest.raises(ValueError, match="no row nope"):
        select_rows(table1, "pgd-at,nope")
    row = table1.row("trades-ancra")
    assert run_name(row, "cifar10", 0, 120) == "cifar10_resnet18_trades-ancra_s0"  # the scripts' default name
    assert run_name(row, "cifar10", 1, 15, smoke=True) == "smoke_cifar10_resnet18_trades-ancra_s1_e15"


def test_bad_options_are_refused_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, message in ((["table1", "--only", "nope"], "no row nope"),
                          (["tiny-imagenet", "--dataset", "imagenet-1k"], "not a registered dataset"),
                          (["table1", "--epochs", "0"], "--epochs"),
                          (["table1", "--gpus", "0,0", "--nproc-per-row", "2"], "names a GPU twice"),
                          (["table1", "--smoke", "--dataset", "cifar10"], "--smoke trains"),
                          (["table1", "--rows-per-gpu", "0"], "--rows-per-gpu"),
                          (["table1", "--gpus", "0,1,2", "--nproc-per-row", "2"], "groups"),
                          ([], "name a study")):
        assert reproduce.main(reproduce.parse_args(argv + ["--out-dir", str(out)])) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_plan_defaults_for_smoke_and_shortened_schedules(tmp_path):
    plan = make_plan(reproduce.parse_args(["table1", "--smoke", "--out-dir", str(tmp_path)]))
    assert (plan.dataset, plan.epochs, plan.n_examples, plan.budget) == ("synthetic", 2, 16, "small")
    plan = make_plan(reproduce.parse_args(["ablation", "--epochs", "15", "--out-dir", str(tmp_path)]))
    assert (plan.dataset, plan.milestones, plan.n_examples, plan.budget) == ("cifar10", (9, 11, 13), 1000, "full")
    shared = plan.run_dir(plan.study.row("trades"))
    assert shared == tmp_path / "table1" / "runs" / "cifar10_resnet18_trades_s0_e15"
    assert plan.eval_dir(plan.study.row("trades-anc")).parent.parent == tmp_path / "ablation" / "runs"


# ---------------------------------------------------------------- scheduling

def test_device_slots():
    assert device_slots(None, 1) == (None,)
    assert device_slots("0,1,2,3", 1) == ("0", "1", "2", "3")
    assert device_slots("0,1,2,3", 2) == ("0,1", "2,3")
    for gpus, nproc in (("0,1,2", 2), ("a,b", 1), ("0,1", 0)):
        with pytest.raises(ValueError):
            device_slots(gpus, nproc)


def test_rows_run_concurrently_one_per_slot():
    lock, running, log = threading.Lock(), {}, []

    def work(item, slot):
        with lock:
            assert slot not in running, "two rows on one slot"
            running[slot] = item
            log.append(("start", item, slot, len(running)))
        time.sleep(0.05)
        with lock:
            del running[slot]

    left = run_concurrently(range(7), ("0", "1", "2"), work, threading.Event())
    assert left == []
    assert sorted(item for kind, item, _, _ in log) == list(range(7))
    assert max(n for *_, n in log) == 3  # three slots really ran side by side
    assert [item for _, item, _, _ in log[:3]] == [0, 1, 2]


def test_no_new_row_starts_after_a_stop():
    stop, started = threading.Event(), []

    def work(item, slot):
        started.append(item)
        stop.set()

    assert run_concurrently(range(5), (None,), work, stop) == [1, 2, 3, 4]
    assert started == [0]


# ---------------------------------------------------------------- the table

def _results(clean, attacks, flags=(), skipped=(), n=4):
    return {"meta": {"n_examples": n}, "clean": {"accuracy": clean},
            "attacks": [{"name": name, "family": "paper", "accuracy": acc, "paper_last_iterate": last}
                        for name, acc, last in attacks],
            "skipped": list(skipped), "worst_case": {"accuracy": 0.25, "robust_count": 1, "over": [a[0] for a in attacks]},
            "sanity": [{"name": f, "status": "FLAG"} for f in flags] + [{"name": "fine", "status": "pass"}]}


def _settings(smoke=False):
    return {"dataset": "cifar10", "epochs": 15, "milestones": [9, 11, 13], "seed": 0, "n_examples": 4,
            "budget": "full", "smoke": smoke, "commit": "abc"}


def test_table_puts_paper_and_ours_side_by_side_and_never_numbers_for_pending_rows():
    study = STUDIES["table1"]
    done = _results(0.75, [("pgd40", 0.25, 0.5), ("fgsm", 0.5, 0.5), ("ref-fgsm", 0.5, 0.75)], flags=["robust ≤ clean"],
                    skipped=["pgd40+p"])
    items = [RowInput(study.row("pgd-at"), "done", "/runs/a", done, commit="c1"),
             RowInput(study.row("trades"), "pending (trained 3/15 epochs)", "/runs/b"),
             RowInput(study.row("mart"), "failed: evaluation: error: boom", "/runs/c")]
    table = build_table(study, _settings(smoke=True), items)
    first, pending, failed = table["rows"]
    assert first["ours"]["pgd40"] == {"robust": 0.25, "last_iterate": 0.5, "text": "25.00"}
    assert first["ours"]["natural"]["text"] == "75.00"
    assert first["ours"]["pgd40+p"]["text"] == "n/a (plain model)"
    assert first["ours"]["autoattack"]["text"] == "not run (smoke)"
    assert first["ours"]["cw40"]["text"] == "not run"
    assert first["reference"]["ref-fgsm"]["text"] == "75.00"
    assert first["flags"] == ["robust ≤ clean"] and first["worst_case"]["accuracy"] == 0.25
    assert first["paper"]["figures"]["pgd40"] == 44.35 and first["batchnorm"] == "n/a"
    assert pending["ours"] is None and pending["worst_case"] is None
    assert failed["ours"] is None and failed["flags"] is None
    markdown = render_markdown(table)
    assert "| PGD-AT | paper Table 1 (cifar10) | 80.90 | 44.35 | 58.41 | 46.72 | 42.14 |" in markdown
    assert "|  | ours | 75.00 | 25.00 | 50.00 | not run | not run (smoke) | n/a (plain model)" in markdown
    assert "|  | ours, paper's count | 75.00 | 50.00 | 50.00 |" in markdown
    assert "reference code's FGSM/C&W, not robustness" in markdown
    protocol = markdown.split("## Paper protocol")[1].split("## Reference")[0].splitlines()
    ours = [line for line in protocol if line.startswith("|  | ours |")]
    assert len(ours) == 1 + 2  # one line for the done row, one per pending or failed row (no "paper's count")
    for line in ours[1:]:
        cells = [c.strip() for c in line.strip(" |").split("|")][1:]
        assert not any(c.replace(".", "").isdigit() for c in cells), line
    assert "| TRADES | pending (trained 3/15 epochs) | — | — | n/a | n/a | 4 |" in markdown
    # a failed row's reason is written once, in the summary's status column; elsewhere one short cell
    assert markdown.count("error: boom") == 1
    assert "| MART | failed: evaluation: error: boom | — | — | n/a | n/a | 4 |" in markdown
    assert "|  | ours | failed (reason below) | — | — |" in markdown
    assert markdown.count("pending (trained 3/15 epochs)") == 3  # once per section
    assert "15 epochs with lr x0.1 after epochs 9 11 13 (the paper: 120 epochs, 75 90 100)" in markdown


def test_table_batchnorm_columns_only_for_shared_final_batchnorm_rows():
    wrn = STUDIES["wrn"].rows[0]
    done = _results(0.5, [("pgd40", 0.25, 0.25)])
    table = build_table(STUDIES["wrn"], _settings(), [RowInput(wrn, "done", "/r", done, {"eval": 0.165, "batch_stats": 0.984})])
    assert table["rows"][0]["batchnorm"] == {"eval": 0.165, "batch_stats": 0.984}
    assert "| 16.50 | 98.40 |" in render_markdown(table)


# ---------------------------------------------------------------- BatchNorm check

def test_batch_statistics_accuracy_by_hand():
    """Logits = BN(x) with running mean (100, -100): eval mode predicts class 1 for both examples
    (50 %); the batch's own statistics give (1, -1) and (-1, 1): both right (100 %)."""
    model = nn.Sequential(nn.BatchNorm1d(2))
    model[0].running_mean.copy_(torch.tensor([100.0, -100.0]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    x, y = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 1])
    assert bn.batch_statistics_accuracy(model, x, y, batch_size=2) == {"eval": 0.5, "batch_stats": 1.0}
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics untouched
    with pytest.raises(ValueError):
        bn.batch_statistics_accuracy(model, x, y, batch_size=1)


# ---------------------------------------------------------------- the runner, with fake children

class FakeChildren:
    """Stands in for the scripts: training writes last.pt/best.pt, evaluation results.json."""

    def __init__(self, fail_eval_of=(), epoch_cap=None, delay=0.0):
        self.commands, self.fail_eval_of, self.epoch_cap, self.delay = [], set(fail_eval_of), epoch_cap, delay
        self.devices = []

    def run(self, command, env, log_path, prefix="", keep_fds=()):
        self.commands.append(command)
        self.devices.append((prefix, env.get("CUDA_VISIBLE_DEVICES")))
        time.sleep(self.delay)
        script = Path(next(part for part in command if part.endswith(".py"))).name
        if script.startswith("train_"):
            run_dir = Path(command[command.index("--resume") + 1]) if "--resume" in command else \
                Path(command[command.index("--out-dir") + 1]) / command[command.index("--run-name") + 1]
            epochs = int(command[command.index("--epochs") + 1]) if "--epochs" in command else \
                json.loads((run_dir / "args.json").read_text())["epochs"]
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "args.json").write_text(json.dumps({"epochs": epochs}))
            done = min(epochs, self.epoch_cap or epochs)
            torch.save({"epoch": done, "args": {"epochs": epochs}}, run_dir / "last.pt")
            torch.save({"epoch": done}, run_dir / "best.pt")
            return 0, [f"epoch {done}/{epochs}"]
        if script == "test_white_attack.py":
            out = Path(command[command.index("--out-dir") + 1])
            if out.parent.name.split("_")[2] in self.fail_eval_of:
                return 2, ["error: boom in the evaluation"]
            previous = out / "results.partial.json" if (out / "results.partial.json").exists() else out / "results.json"
            if "--resume" in command and not previous.exists():  # test_white_attack.py's own rules
                return 2, [f"error: nothing to resume in {out} (no results.json or results.partial.json); drop --resume"]
            if "--resume" not in command and previous.exists():
                return 2, [f"error: {out} already holds an evaluation; pass --resume to continue it"]
            if "--resume" in command:
                try:
                    json.loads(previous.read_text())
                except ValueError as err:
                    return 1, ["Traceback (most recent call last):", f"json.decoder.JSONDecodeError: {err}"]
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(_results(0.5, [("pgd40", 0.25, 0.5)], n=4)))
            return 0, []
        raise AssertionError(f"unexpected command {command}")

    def forward(self, signum):
        pass


def _plan(tmp_path, only="pgd-at,trades,mart"):
    study = STUDIES["table1"]
    return Plan(study, select_rows(study, only), tmp_path, "cifar10", 2, (1, 2, 3), 4)


def _run(plan, children):
    lines = []
    code = StudyRun(plan, launcher=children, tool=EvaluationTool(resume=True, reference=False), echo=lines.append).run()
    return code, lines


def test_runner_trains_evaluates_then_reports_everything_already_done(tmp_path):
    children = FakeChildren()
    code, lines = _run(_plan(tmp_path), children)
    assert code == 0 and len(children.commands) == 6
    assert any(line.startswith("[row 1/3 pgd-at] training (new run") and "left: 3 to train, 3 to evaluate" in line
               for line in lines)
    table = json.loads((tmp_path / "table1" / "table.json").read_text())
    assert [r["status"] for r in table["rows"]] == ["done"] * 3
    mtimes = [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.pt"))]
    again = FakeChildren()
    code, lines = _run(_plan(tmp_path), again)
    assert code == 0 and again.commands == []
    assert sum("already done" in line for line in lines) == 3
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.pt"))] == mtimes


def test_runner_gives_each_concurrent_row_its_own_gpus(tmp_path):
    study = STUDIES["table1"]
    plan = Plan(study, study.rows, tmp_path, "cifar10", 2, (1, 2, 3), 4, slots=("0,1", "2,3"), nproc=2)
    children = FakeChildren(delay=0.05)
    code, _ = _run(plan, children)
    assert code == 0 and len(children.commands) == 12
    by_row = {}
    for prefix, devices in children.devices:
        by_row.setdefault(prefix, set()).add(devices)
    assert all(len(devices) == 1 for devices in by_row.values())  # train and evaluate on the same slot
    assert set().union(*by_row.values()) == {"0,1", "2,3"}        # both slots worked
    trains = [c for c in children.commands if "torch.distributed.run" in c]
    assert len(trains) == 6 and all("--nproc_per_node=2" in c for c in trains)


def test_runner_reports_a_failed_evaluation_and_finishes_the_other_rows(tmp_path):
    code, lines = _run(_plan(tmp_path), FakeChildren(fail_eval_of={"trades"}))
    assert code == 1 and any(line.startswith("[row 2/3 trades] failed: evaluation: error: boom") for line in lines)
    rows = json.loads((tmp_path / "table1" / "table.json").read_text())["rows"]
    assert [r["status"][:6] for r in rows] == ["done", "failed", "done"]
    assert rows[1]["status"].startswith("failed: evaluation: error: boom in the evaluation")
    assert rows[1]["ours"] is None
    retry = FakeChildren()
    assert _run(_plan(tmp_path), retry)[0] == 0
    assert [Path(c[1]).name for c in retry.commands] == ["test_white_attack.py"]  # only the failed step again


def test_runner_resumes_a_stopped_run_with_only_its_folder(tmp_path):
    _run(_plan(tmp_path, "pgd-at"), FakeChildren(epoch_cap=1))  # training "stopped" after epoch 1
    plan = _plan(tmp_path, "pgd-at")
    assert training_progress(plan.run_dir(plan.rows[0])) == (1, 2)
    children = FakeChildren()
    assert _run(plan, children)[0] == 0
    train = children.commands[0]
    assert train[1].endswith("train_baselines.py")
    assert train[2:] == ["--resume", str(plan.run_dir(plan.rows[0])), "--quiet"]


def test_runner_refuses_a_run_folder_of_another_schedule(tmp_path):
    _run(_plan(tmp_path, "pgd-at"), FakeChildren())
    plan = _plan(tmp_path, "pgd-at")
    torch.save({"epoch": 2, "args": {"epochs": 5}}, plan.run_dir(plan.rows[0]) / "last.pt")
    (plan.eval_dir(plan.rows[0]) / "results.json").unlink()
    code, lines = _run(plan, FakeChildren())
    assert code == 1 and any("was started for 5 epochs, not 2" in line for line in lines)


def test_runner_never_starts_over_an_unreadable_last_pt(tmp_path):
    _run(_plan(tmp_path, "pgd-at,trades"), FakeChildren(epoch_cap=1))
    plan = _plan(tmp_path, "pgd-at,trades")
    (plan.run_dir(plan.rows[0]) / "last.pt").write_bytes(b"garbage")
    children = FakeChildren()
    code, lines = _run(plan, children)
    assert code == 1 and any("cannot read" in line and "last.pt" in line for line in lines)
    assert children.commands[0][2:4] == ["--resume", str(plan.run_dir(plan.rows[1]))]
    assert not any(str(plan.run_dir(plan.rows[0])) in " ".join(c) for c in children.commands)  # row 1 untouched
    rows = json.loads((tmp_path / "table1" / "table.json").read_text())["rows"]
    assert rows[0]["status"].startswith("failed: cannot read") and rows[1]["status"] == "done"
    assert (plan.run_dir(plan.rows[0]) / "last.pt").read_bytes() == b"garbage"


def test_commands_of_a_row():
    plan = Plan(STUDIES["table1"], STUDIES["table1"].rows, Path("/o"), "cifar10", 15, (9, 11, 13), 100, nproc=2,
                data_dir="/d")
    row = plan.study.row("mart-ancra")
    train = commands.train_command(plan, row, resume=False)
    assert train[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert train[5].endswith("train_CIFAR10_ResNet.py")
    assert train[6:] == ["--method", "mart", "--dataset", "cifar10", "--epochs", "15", "--milestones", "9", "11",
                         "13", "--seed", "0", "--out-dir", "/o/table1/runs", "--run-name",
                         "cifar10_resnet18_mart-ancra_s0_e15", "--quiet", "--data-dir", "/d"]
    tool = EvaluationTool(resume=False, reference=True)
    evaluate = commands.evaluate_command(plan, row, tool, resume=True)
    assert evaluate[evaluate.index("--attacks") + 1] == "all,reference" and "--resume" not in evaluate
    assert evaluate[evaluate.index("--budget") + 1] == "full"
    smoke = commands.smoke_attacks(reference=False).split(",")
    assert {"fgsm", "pgd40", "cw40", "fgsm+p", "pgd40+p", "cw40+p"} <= set(smoke)
    assert not any(name.startswith(("autoattack", "square")) or "apgd" in name for name in smoke)


def test_an_evaluation_is_done_only_when_its_results_json_is_complete(tmp_path):
    path = tmp_path / "results.json"
    assert finished_results(tmp_path) is None
    full = _results(0.5, [("pgd40", 0.25, 0.5)])
    path.write_text(json.dumps(full)[:-20])                       # cut off while being written
    assert finished_results(tmp_path) is None
    path.write_text(json.dumps({k: v for k, v in full.items() if k != "worst_case"}))
    assert finished_results(tmp_path) is None
    path.write_text(json.dumps(dict(full, complete=False)))       # a resumable evaluation's partial file
    assert finished_results(tmp_path) is None
    path.write_text(json.dumps(full))
    assert finished_results(tmp_path) == full


def test_failure_line():
    assert failure_line(2, ["x", "error: no such checkpoint", ""]) == "error: no such checkpoint"
    assert failure_line(1, ["Traceback", "ValueError: bad", ""]) == "exit code 1: ValueError: bad"


def test_launcher_forwards_a_stop_once_and_lets_the_child_finish(tmp_path):
    child = ("import signal, sys, time\n"
             "def stop(*_):\n    print('saved last.pt', flush=True); sys.exit(130)\n"
             "signal.signal(signal.SIGTERM, stop)\nprint('epoch 1/9', flush=True)\ntime.sleep(30)\n")
    echoed, launcher, result = [], Launcher(echo=None), {}
    launcher.echo = echoed.append
    thread = threading.Thread(target=lambda: result.update(
        out=launcher.run([sys.executable, "-c", child], dict(os.environ), tmp_path / "log", "[row]")))
    thread.start()
    deadline = time.time() + 20
    while not echoed and time.time() < deadline:
        time.sleep(0.05)
    launcher.forward(signal.SIGTERM)
    thread.join(20)
    code, tail = result["out"]
    assert code == 130 and tail[-1] == "saved last.pt" and echoed == ["[row] epoch 1/9"]
    assert "saved last.pt" in (tmp_path / "log").read_text()


# ---------------------------------------------------------------- slow: the whole smoke chain

def _reproduce(out, *extra, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "reproduce.py"), "table1", "--smoke", "--out-dir", str(out),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _replace(path, data):
    """Give ``path`` new contents in a new file (writing in place would change its hard links too)."""
    path.unlink()
    path.write_bytes(data)


@pytest.fixture(scope="module")
def smoke_chain(tmp_path_factory):
    """Run 1 stopped by SIGINT to its process group once the first row is trained; row 1's best.pt
    corrupted; run 2 (row 1's evaluation fails, the rest completes); best.pt restored; run 3
    completes; run 4 has nothing to do."""
    out = tmp_path_factory.mktemp("repro")
    plan = make_plan(reproduce.parse_args(["table1", "--smoke", "--out-dir", str(out)]))
    first = plan.run_dir(plan.rows[0])
    process = _reproduce(out)
    deadline = time.time() + 300
    while (training_progress(first) or (0,))[0] < plan.epochs and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    record = {"run1": (process.wait(120), process.stdout.read())}
    record["table1"] = (out / "table1" / "table.json").read_text()
    best = (first / "best.pt").read_bytes()
    record["last1"] = (first / "last.pt").stat().st_mtime_ns
    results = plan.eval_dir(plan.rows[0]) / "results.json"
    if results.exists():
        results.unlink()
    _replace(first / "best.pt", b"not a checkpoint")  # best.pt, last.pt are hard links of one file
    for name in ("run2", "run3", "run4"):
        if name == "run3":
            _replace(first / "best.pt", best)
        if name == "run4":
            record["mtimes"] = {str(p): p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".pt", ".json")
                                and "state" not in p.name and "table" not in p.name}
        started = time.time()
        process = _reproduce(out)
        record[name] = (process.wait(900), process.stdout.read(), time.time() - started)
        record[name + "_table"] = json.loads((out / "table1" / "table.json").read_text())
    record.update(out=out, plan=plan, first=first)
    return record


@pytest.mark.slow
def test_smoke_chain_interrupt_keeps_the_finished_training(smoke_chain):
    code, output = smoke_chain["run1"]
    assert code == 130, output
    assert "SIGINT" in output and "run the same command again" in output
    rows = json.loads(smoke_chain["table1"])["rows"]
    assert all(r["ours"] is None for r in rows)  # nothing evaluated yet: no numbers at all
    assert (smoke_chain["first"] / "last.pt").stat().st_mtime_ns == smoke_chain["last1"]  # never retrained
    assert smoke_chain["run2"][1].count("training (new run") == 5  # rows 2-6 only


@pytest.mark.slow
def test_smoke_chain_failed_evaluation_is_reported_and_the_rest_completes(smoke_chain):
    code, output, _ = smoke_chain["run2"]
    assert code == 1, output
    rows = smoke_chain["run2_table"]["rows"]
    assert rows[0]["status"].startswith("failed: evaluation: error:") and "checkpoint" in rows[0]["status"]
    assert [r["status"] for r in rows[1:]] == ["done"] * 5


@pytest.mark.slow
def test_smoke_chain_rerun_completes_the_table_then_has_nothing_to_do(smoke_chain):
    code, output, _ = smoke_chain["run3"]
    assert code == 0, output
    assert "training (" not in output and "evaluating" in output  # only row 1's evaluation ran
    table = smoke_chain["run3_table"]
    assert [r["status"] for r in table["rows"]] == ["done"] * 6
    for row in table["rows"]:
        assert row["ours"]["natural"]["robust"] is not None and row["worst_case"]["accuracy"] is not None
        assert row["flags"] is not None and row["paper"]["figures"]["natural"] > 0
        assert row["ours"]["autoattack"]["text"] == "not run (smoke)"
    markdown = (smoke_chain["out"] / "table1" / "table.md").read_text()
    assert "pending" not in markdown and "failed" not in markdown
    code, output, seconds = smoke_chain["run4"]
    assert code == 0 and output.count("already done") == 6, output
    assert seconds < 60
    for path, mtime in smoke_chain["mtimes"].items():
        assert Path(path).stat().st_mtime_ns == mtime, path


def test_bn_refuses_a_device_that_is_not_here_before_writing(tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "bn.json"
    assert bn.main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(out), "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cuda:7" in err and not out.exists()
    with pytest.raises(SystemExit) as stop:
        bn.parse_args(["--ckpt", "x.pt", "--out", str(out), "--device", "tpu"])
    assert stop.value.code == 2 and bn.parse_args(["--ckpt", "x.pt", "--out", str(out)]).device == "auto"
