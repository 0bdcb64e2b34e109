"""benchmarks/eval_cascade.py: both modes run, give the same worst case, the cascade attacks
fewer examples, a finished benchmark is read back instead of rerun, and bad input touches nothing."""
import json

import numpy as np
import pytest

from benchmarks import eval_cascade
from test_eval_trust import _checkpoint

ATTACKS = "fgsm,pgd10,st-pgd-ce-t1,transfer-nora"


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt, out = _checkpoint(root / "run"), root / "out"
    argv = ["--ckpt", str(ckpt), "--out-dir", str(out), "--attacks", ATTACKS, "--n-examples", "64", "--json",
            "--", "--eps", "64/255"]
    return argv, out


def _run(argv, capsys):
    code = eval_cascade.main(argv)
    return code, capsys.readouterr()


def test_both_modes_agree_and_the_cascade_attacks_only_survivors(bench_run, capsys):
    argv, out = bench_run
    code, printed = _run(argv, capsys)
    assert code == 0, printed.err
    report = json.loads(printed.out)
    assert report["worst_case_differs_on"] == 0
    cascade, full = (next(m for m in report["modes"] if m["mode"] == name) for name in ("cascade", "no-cascade"))
    assert cascade["worst_case"] == full["worst_case"] and cascade["clean_correct"] == full["clean_correct"]
    # every stage after the full-set ones receives exactly the examples nothing before it broke
    saved = json.loads((out / "cascade" / "results.json").read_text())
    alive = np.array(saved["clean"]["correct"], bool)
    for attack in saved["attacks"]:
        if not attack["standalone"]:
            assert np.array_equal(np.array(attack["received"], bool), alive), attack["name"]
        alive &= np.array(attack["correct"], bool)
    assert full["clean_correct"] > 0
    assert full["examples_attacked"] == full["clean_correct"] * full["attacks"]
    assert cascade["examples_attacked"] < full["examples_attacked"]  # fgsm at 64/255 breaks some
    assert all((out / mode / "results.json").exists() for mode in ("cascade", "no-cascade"))


def test_a_finished_benchmark_is_read_back_not_rerun(bench_run, capsys):
    argv, out = bench_run
    timing = out / "cascade" / eval_cascade.TIMING
    if not timing.exists():
        _run(argv, capsys)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    split = argv.index("--")
    code, printed = _run(argv[:split] + ["--modes", "cascade"] + argv[split:], capsys)
    assert code == 0
    assert [m["mode"] for m in json.loads(printed.out)["modes"]] == ["cascade"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_finished_benchmark_with_other_settings_is_refused(bench_run, capsys):
    argv, out = bench_run
    if not (out / "cascade" / eval_cascade.TIMING).exists():
        _run(argv, capsys)
    with pytest.raises(SystemExit) as stop:
        eval_cascade.main(argv[:-1] + ["32/255"])
    assert stop.value.code == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "MISSING.pt"], "not found"),
    (["--modes", "cascade,fast"], "--modes takes"),
    (["--out-dir", "FILE"], "is a file"),
])
def test_bad_input_is_one_line_and_touches_nothing(argv, message, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    (tmp_path / "FILE").write_text("x")
    full = {"--ckpt": str(ckpt), "--out-dir": str(tmp_path / "out")}
    full.update({k: str(tmp_path / v) if k != "--modes" else v for k, v in zip(argv[::2], argv[1::2])})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        eval_cascade.main([item for pair in full.items() for item in pair])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_failing_mode_is_one_error_line_and_records_no_timing(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "run")
    code = eval_cascade.main(["--ckpt", str(ckpt), "--out-dir", str(tmp_path / "out"), "--attacks", "fgsm",
                              "--n-examples", "8", "--parallel", "--", "--eps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "run failed (exit 2)" in err[0]
    assert not list((tmp_path / "out").rglob(eval_cascade.TIMING))
    assert "--eps" in (tmp_path / "out" / "cascade.log").read_text()  # the child's own error line is in its log


def test_progress_lines_count_the_attacks_a_running_mode_saved(tmp_path, monkeypatch, capsys):
    """The children run --quiet: while one runs, the benchmark says how many attacks it finished."""
    import subprocess
    import sys
    import time
    (tmp_path / "cascade").mkdir()
    (tmp_path / "cascade" / "results.partial.json").write_text(json.dumps({"attacks": [{}, {}]}))
    monkeypatch.setattr(eval_cascade, "PROGRESS_EVERY", 0.05)
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    log = open(tmp_path / "cascade.log", "a")  # noqa: SIM115 — closed by wait_mode
    args = type("Args", (), {"ckpt": "x.pt", "attacks": "fgsm", "n_examples": 4, "budget": "small", "extra": [],
                             "parallel": False})()
    eval_cascade.wait_mode(args, (process, log, time.perf_counter(), tmp_path / "cascade"))
    assert "[eval_cascade] cascade: 2 attacks finished" in capsys.readouterr().err
