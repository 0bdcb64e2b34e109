"""benchmarks/gpu_session.py: the plan of each part, the time boxes, the data checks, the markdown
tables from hand-made records, and (slow) the whole dry run on the CPU."""
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_session as gs


def cifar_tree(root, per_class=1, classes=gs.CLASSES):
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (root / split / name / f"{i:04d}.jpg").write_bytes(b"")
    return root


# ---------------------------------------------------------------- the plan

def test_variants_are_checked_and_kept_in_order(tmp_path, capsys):
    args = gs.parse_args(["--dry-run", "--variants", "compiled,eager", "--out-dir", str(tmp_path / "o")])
    assert args.variants == ("eager", "compiled")
    assert gs.bench_groups(gs.make_plan(True, ("eager",))) == [("resnet18", "eager")]
    with pytest.raises(SystemExit):
        gs.parse_args(["--dry-run", "--variants", "jit", "--out-dir", str(tmp_path / "o")])
    assert "--variants takes eager and/or compiled" in capsys.readouterr().err


def test_the_real_plan_benchmarks_every_method_on_both_archs_eager_first():
    plan = gs.make_plan(dry_run=False)
    assert gs.bench_groups(plan) == [("resnet18", "eager"), ("wrn-34-10", "eager"), ("resnet18", "compiled"),
                                     ("wrn-34-10", "compiled")]
    command = gs.bench_command(plan, "wrn-34-10", "compiled")
    methods = command[command.index("--method") + 1:command.index("--batch-size")]
    assert methods == ["pgd-at", "trades", "mart", "pgd-at-ancra", "trades-ancra", "mart-ancra"]
    assert "--compile" in command and "--no-compile" not in command
    assert command[command.index("--peak-tflops") + 1] == "989" and command[command.index("--device") + 1] == "cuda"
    assert "--no-compile" in gs.bench_command(plan, "resnet18", "eager")


def test_training_points_at_the_cifar_root_and_torchrun_runs_one_process(tmp_path):
    plan = gs.make_plan(dry_run=False)
    command = gs.train_command(plan, tmp_path / "cifar10-jpeg", tmp_path / "train", "compiled", "compiled")
    assert command[1].endswith("train_CIFAR10_ResNet.py")
    for option, value in (("--method", "trades"), ("--dataset", "cifar10"), ("--data-dir", str(tmp_path / "cifar10-jpeg")),
                          ("--epochs", "2"), ("--seed", "0"), ("--run-name", "compiled")):
        assert command[command.index(option) + 1] == value
    assert "--compile" in command and "--no-anc" not in command and "--no-ra" not in command
    torchrun = gs.train_command(plan, tmp_path, tmp_path / "t", "one", "eager", epochs=1, torchrun=True)
    assert torchrun[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    assert torchrun[torchrun.index("--epochs") + 1] == "1" and "--no-compile" in torchrun
    evaluation = gs.eval_command(plan, tmp_path / "best.pt", tmp_path, tmp_path / "eval")
    assert evaluation[evaluation.index("--attacks") + 1] == "all" and evaluation[evaluation.index("--budget") + 1] == "full"
    assert evaluation[evaluation.index("--n-examples") + 1] == "1000"


def test_the_evaluation_follows_the_first_training_whichever_variants_run():
    assert gs.part_order(("eager", "compiled")) == ["train-eager", "eval", "train-compiled", "torchrun", "bench"]
    assert gs.part_order(("compiled",)) == ["train-compiled", "eval", "torchrun", "bench"]


def test_time_box_is_the_next_parts_share_of_what_is_left():
    parts = ["train-eager", "eval", "train-compiled", "torchrun", "bench"]
    assert gs.time_box(540, parts) == pytest.approx((540 - 15) * 0.17 / 0.95)
    assert gs.time_box(115, ["bench"]) == pytest.approx(100)  # the last part gets all but the reserve
    assert gs.time_box(10, ["bench"]) == 1.0


# ---------------------------------------------------------------- the data

def test_find_cifar_root_finds_the_nested_folder_and_refuses_a_missing_class(tmp_path):
    root = cifar_tree(tmp_path / "a" / "cifar10-jpeg")
    assert gs.find_cifar_root(tmp_path) == root
    cifar_tree(tmp_path / "b", classes=gs.CLASSES[:9])
    assert gs.find_cifar_root(tmp_path / "b") is None


def test_an_archive_is_unpacked_once_and_reused(tmp_path):
    cifar_tree(tmp_path / "src" / "cifar10-jpeg")
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar10-jpeg", arcname="cifar10-jpeg")
    assert gs.check_data(archive) == archive
    root = gs.unpack(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "cifar10-jpeg" and (root / "test" / "truck" / "0000.jpg").is_file()
    (root / "marker").write_text("kept")
    assert gs.unpack(archive, tmp_path / "out") == root and (root / "marker").exists()  # not unpacked again


def test_an_archive_with_a_path_out_of_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(gs.SessionError, match="refusing member '../escape.txt'"):
        gs.check_data(archive)


@pytest.mark.parametrize("argv, message", [
    ([], "pass --data PATH"),
    (["--dry-run", "--data", "x"], "not both"),
    (["--data", "NOWHERE/cifar10-jpeg.tar.gz"], "NOWHERE/cifar10-jpeg.tar.gz not found"),
    (["--dry-run", "--budget-s", "10"], "--budget-s must be at least 30"),
    (["--dry-run", "--budget-s", "nan"], "nan"),
])
def test_bad_input_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        gs.parse_args([*argv, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_folder_without_cifar_classes_and_an_earlier_session_are_refused(tmp_path, capsys):
    cifar_tree(tmp_path / "data", classes=gs.CLASSES[1:])
    with pytest.raises(SystemExit):
        gs.parse_args(["--data", str(tmp_path / "data"), "--out-dir", str(tmp_path / "o")])
    assert "ten CIFAR-10 classes" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / gs.SESSION_FILE).write_text("{}")
    assert gs.main(["--dry-run", "--out-dir", str(tmp_path / "old")]) == 2
    assert "already holds a GPU session" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "old").iterdir()] == [gs.SESSION_FILE]  # nothing written


# ---------------------------------------------------------------- running a part

def test_a_part_past_its_time_box_is_stopped_and_a_failing_one_reported(tmp_path):
    sleeper = gs.run_part("slow", [sys.executable, "-c", "import time; time.sleep(60)"], 1.0, tmp_path / "slow.log")
    assert sleeper.status == "timed out after 1 s" and sleeper.seconds < 15
    failing = gs.run_part("bad", [sys.executable, "-c", "print('{\"a\": 1}'); raise SystemExit(3)"], 30,
                          tmp_path / "bad.log")
    assert failing.status == "failed (exit 3)"
    assert gs.read_json_lines(tmp_path / "bad.log") == [{"a": 1}]  # the command line itself is skipped


# ---------------------------------------------------------------- the markdown

def bench_row(method, compiled, ips):
    return {"arch": "resnet18", "method": method, "compile": compiled, "images_per_s": ips, "step_ms": 1000 * 128 / ips,
            "gflop_per_step": 500.0, "tflops": 0.5 * ips / 1000, "bf16_peak_tflops": 989.0,
            "peak_source": "nominal (--peak-tflops)", "peak_fraction": 0.5 * ips / 1000 / 989}


def session_record():
    run = lambda name, status="ok": gs.PartRun(name, [], status, 12.0, f"logs/{name}.log", 100.0)  # noqa: E731
    epoch = lambda e, nat, pgd, s: {"epoch": e, "test": {"nat": nat, "pgd": pgd}, "seconds": s}  # noqa: E731
    attack = lambda name, alone, received, broken, s: {  # noqa: E731
        "name": name, "standalone": alone, "received_count": received, "broken_count": broken, "seconds": s}
    return {"device_name": "NVIDIA H200", "torch": "2.11.0", "date": "2026-12-04 18:00 UTC", "commit": "abc123",
            "command": "python benchmarks/gpu_session.py --data D --out-dir O", "dry_run": False, "budget_s": 540.0,
            "elapsed_s": 500.0,
            "runs": [run("train-eager"), run("eval"), run("train-compiled", "timed out after 100 s"), run("torchrun"),
                     run("bench:resnet18:eager"), run("bench:resnet18:compiled", "failed (exit 1)")],
            "bench": [bench_row("pgd-at", False, 2000.0)],
            "train": {"eager": [epoch(1, 0.4, 0.25, 30.0), epoch(2, 0.5, 0.3, 28.5)], "compiled": [epoch(1, 0.41, 0.26, 60.0)]},
            "eval": {"meta": {"batch_size": 5120, "batch_size_note": "auto on CUDA", "attack_dtype": "bf16"},
                     "labels": [0] * 1000, "clean": {"accuracy": 0.5, "seconds": 0.5},
                     "worst_case": {"accuracy": 0.2},
                     "attacks": [attack("pgd40", True, 1000, 280, 3.0), attack("autoattack", False, 220, 20, 20.5)]},
            "eval_ckpt": "train/eager/best.pt",
            "torchrun": [epoch(1, 0.39, 0.24, 31.0)]}


def test_markdown_tables_from_a_hand_made_record():
    plan = gs.make_plan(dry_run=False)
    page = gs.render(session_record(), plan)
    assert page.startswith("## GPU session\n") and "NVIDIA H200; torch 2.11.0; 2026-12-04 18:00 UTC; commit abc123" in page
    assert "Peak used: 989 TFLOP/s bf16 (nominal (--peak-tflops))" in page
    assert "| resnet18 | pgd-at | eager | 2000.0 | 64.0 | 500.0 | 1.0 | 0.1 % |" in page
    assert "| resnet18 | trades | eager | ok | | | | |" in page  # the group ran but gave no row for it
    assert "| resnet18 | pgd-at | compiled | failed (exit 1) | | | | |" in page
    assert "| wrn-34-10 | mart-ancra | compiled | not run (no time left) | | | | |" in page
    assert "| 1 | 40.0 % | 25.0 % | 30.0 | 41.0 % | 26.0 % | 60.0 |" in page
    assert "| 2 | 50.0 % | 30.0 % | 28.5 | — | — | — |" in page
    assert "batch 5120 (auto on CUDA)" in page and "Process wall 12.0 s, clean pass and attacks 24.0 s" in page
    assert "clean 50.0 %, worst case 20.0 %" in page
    assert "| 1 | pgd40 (full set) | 1000 | 280 | 3.0 |" in page and "| 2 | autoattack | 220 | 20 | 20.5 |" in page
    assert "| 1 | 39.0 % | 24.0 % | 31.0 | ok |" in page
    assert "- train-compiled: timed out after 100 s (log: logs/train-compiled.log)" in page


def test_markdown_of_an_evaluation_stopped_by_its_time_box():
    attacks = session_record()["eval"]["attacks"]
    record = dict(session_record(), eval={"status": "partial", "meta": {}, "attacks": attacks})
    page = gs.render(record, gs.make_plan(dry_run=False))
    assert "**Partial** (ok): the 2 attacks that finished took 23.5 s" in page and "no worst case" in page
    assert "| 2 | autoattack | 220 | 20 | 20.5 |" in page


def test_markdown_of_a_session_where_nothing_finished():
    record = dict(session_record(), runs=[], bench=[], train={}, eval=None, eval_ckpt=None, torchrun=None)
    page = gs.render(record, gs.make_plan(dry_run=True))
    assert "| epoch | eager clean | eager PGD-20 | eager s | compiled clean |" in page
    assert "| — | no epoch finished | | | | | |" in page
    eager_only = gs.render(record, gs.make_plan(dry_run=True, variants=("eager",)))
    assert "| epoch | eager clean | eager PGD-20 | eager s |\n|---:|---:|---:|---:|\n| — | no epoch finished | | |" in eager_only
    assert "No results (not run)." in page and "No epoch finished (not run)." in page
    assert "Peak used: — TFLOP/s bf16 (measured)" in page


@pytest.mark.slow
def test_train_step_takes_a_nominal_peak_and_a_small_image_size(capsys):
    from benchmarks.train_step import main

    main(["--arch", "wrn-16-1", "--method", "pgd-at", "--batch-size", "2", "--attack-steps", "1", "--steps", "1",
          "--warmup", "0", "--device", "cpu", "--image-size", "8", "--peak-tflops", "100", "--json"])
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["image_size"] == 8 and row["bf16_peak_tflops"] == 100 and row["peak_source"].startswith("nominal")
    assert row["peak_fraction"] == pytest.approx(row["tflops"] / 100, abs=1e-3)


# ---------------------------------------------------------------- the whole dry run

@pytest.mark.slow
def test_dry_run_exercises_every_part(tmp_path):
    """Eager only: torch.compile on a CPU takes many minutes (the compiled commands are checked above)."""
    out = tmp_path / "session"
    assert gs.main(["--dry-run", "--variants", "eager", "--out-dir", str(out), "--budget-s", "1500"]) == 0
    record = json.loads((out / gs.SESSION_FILE).read_text())
    page = (out / gs.REPORT_FILE).read_text()
    statuses = {run["name"]: run["status"] for run in record["runs"]}
    assert statuses == {"train-eager": "ok", "eval": "ok", "torchrun": "ok", "bench:resnet18:eager": "ok"}
    assert [r["epoch"] for r in record["train"]["eager"]] == [1, 2] and record["torchrun"][0]["epoch"] == 1
    assert {(r["method"], r["compile"]) for r in record["bench"]} == {("pgd-at", False), ("trades-ancra", False)}
    assert {a["name"] for a in record["eval"]["attacks"]} == {"fgsm", "pgd10", "aux1-pgd-ce"}
    assert record["eval_ckpt"] == "train/eager/best.pt" and len(record["eval"]["labels"]) == 4
    assert Path(record["data_dir"]).name == "cifar10-jpeg" and "dry run" in page  # unpacked from the dry archive
    for heading in ("### (a)", "### (b)", "### (c)", "### (d)"):
        assert heading in page
    assert "| resnet18 | trades-ancra | eager |" in page and "| 2 |" in page and "PGD-1" in page


def test_the_training_reads_the_found_folder_with_cifar10s_label_order(tmp_path):
    """The folder handed to --data-dir is read by utils/data.py with labels 0 airplane … 9 truck
    (sorted folder names, which for CIFAR-10 is the official order)."""
    from utils import data

    assert sorted(gs.CLASSES) == list(gs.CLASSES)
    root = gs.unpack(gs.write_dry_data(tmp_path, per_class=(1, 2)), tmp_path / "unpacked")
    test = data.load_dataset("cifar10", root, "test", download=False)
    assert test.x.shape == (20, 3, 32, 32) and sorted(test.y.tolist()) == sorted(list(range(10)) * 2)
    assert list(test.classes) == list(gs.CLASSES)
