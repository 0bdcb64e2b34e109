"""reproduce.py verdict: the intervals (hand-computed), the families beyond the paper protocol, the
generated paragraph on hand-made results, the time budget's plan, the RESULTS.md writer and its
refusals, and (slow) the whole chain with --smoke."""
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import reproduce
from utils.reproduce import verdict, verdict_run
from utils.reproduce.cli import main, make_plan
from utils.reproduce.stats import Z95, paired_counts, paired_difference_interval, wilson_interval
from utils.reproduce.studies import STUDIES
from utils.reproduce.table import RowInput, build_table, render_markdown

ROOT = Path(__file__).resolve().parents[1]
Z2 = Z95 ** 2


# ---------------------------------------------------------------- intervals

def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.71675, half-width z·sqrt(0.016 + z²/400) / (1 + z²/10) = 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94332, abs=1e-5)
    # 0 of n: [0, z²/(n + z²)]; n of n: [n/(n + z²), 1]
    assert wilson_interval(0, 10) == pytest.approx((0.0, Z2 / (10 + Z2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z2), 1.0))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_paired_counts():
    assert paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (1, 2, 1, 1)
    with pytest.raises(ValueError):
        paired_counts([1], [1, 0])


def test_paired_interval_when_only_the_first_is_right():
    # b = n, a = c = d = 0: phi = 0 (empty margins); difference 1, low = 1 - sqrt((1 - l1)² + u2²) where
    # l1 = n/(n + z²) and u2 = z²/(n + z²), so low = 1 - √2·z²/(n + z²); high = 1
    ci = paired_difference_interval([1] * 10, [0] * 10)
    assert ci["difference"] == 1.0 and ci["only_first"] == 10 and ci["only_second"] == 0
    assert ci["low"] == pytest.approx(1 - math.sqrt(2) * Z2 / (10 + Z2)) and ci["high"] == 1.0


def test_paired_interval_of_identical_results():
    # identical rows (a = 3, d = 2): phi = 1, so each side is |(p - l) - (u - p)| of the Wilson interval of 3/5
    low, high = wilson_interval(3, 5)
    asymmetry = abs((0.6 - low) - (high - 0.6))
    ci = paired_difference_interval([1, 1, 1, 0, 0], [1, 1, 1, 0, 0])
    assert ci["difference"] == 0.0
    assert ci["low"] == pytest.approx(-asymmetry) and ci["high"] == pytest.approx(asymmetry)


def test_paired_interval_swaps_sign_and_contains_the_difference():
    first, second = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    ci, swapped = paired_difference_interval(first, second), paired_difference_interval(second, first)
    assert ci["difference"] == pytest.approx(0.3)
    assert ci["low"] < 0.3 < ci["high"]
    assert (swapped["low"], swapped["high"]) == pytest.approx((-ci["high"], -ci["low"]))


# ---------------------------------------------------------------- hand-made results

def _attack(name, family, correct, in_worst=True, reference=False):
    return {"name": name, "family": family, "correct": correct, "accuracy": sum(correct) / len(correct),
            "reference": reference, "in_worst_case": in_worst}


def _results(clean, attacks, indices=None, device="cuda:0", flags=()):
    over = [a["name"] for a in attacks if a["in_worst_case"] and not a["reference"]]
    worst = list(clean)
    for a in attacks:
        if a["name"] in over:
            worst = [w and c for w, c in zip(worst, a["correct"])]
    return {"meta": {"indices": indices or list(range(len(clean))), "device": device, "torch": "2.4.0",
                     "started": "2026-12-04T18:00:00", "seconds": 12.5, "n_examples": len(clean)},
            "clean": {"accuracy": sum(clean) / len(clean), "correct": list(clean)}, "attacks": attacks, "skipped": [],
            "worst_case": {"accuracy": sum(worst) / len(worst), "robust_count": sum(worst), "correct": worst,
                           "over": over},
            "sanity": [{"name": f, "status": "FLAG"} for f in flags] + [{"name": "fine", "status": "pass"}]}


def gated_row():
    """Six examples: the paper protocol leaves 0, 1, 2; joint breaks 1, straight-through breaks 2."""
    return _results([1, 1, 1, 1, 1, 0], [
        _attack("pgd40", "paper", [1, 1, 1, 0, 1, 0]),
        _attack("autoattack", "paper", [1, 1, 1, 1, 0, 0]),
        _attack("joint-pgd-ce-w2", "joint", [1, 0, 1, 1, 1, 1]),
        _attack("st-pgd-ce-t1", "straight-through", [1, 1, 0, 1, 1, 1]),
        _attack("square", "black-box", [1, 1, 1, 1, 1, 1]),
        _attack("pgd40-eps1", "sanity", [0, 0, 0, 0, 0, 0], in_worst=False),
        _attack("ref-fgsm", "reference", [0, 0, 0, 0, 0, 0], reference=True)], flags=["aux/final agreement"])


def steady_row():
    """Six examples: the paper protocol leaves 0, 1, 2 and nothing else breaks them."""
    return _results([1, 1, 1, 1, 0, 0], [
        _attack("pgd40", "paper", [1, 1, 1, 0, 0, 0]),
        _attack("autoattack", "paper", [1, 1, 1, 0, 0, 0]),
        _attack("square", "black-box", [1, 1, 1, 1, 1, 1])])


def test_families_count_what_the_paper_protocol_left():
    results = gated_row()
    assert verdict.paper_protocol_survivors(results) == [True, True, True, False, False, False]
    assert verdict.family_breaks(results) == {"joint": 1, "straight-through": 1, "black-box": 0}
    record = verdict.row_verdict(results)
    assert record["worst_case"]["count"] == 1 and record["paper_protocol"]["count"] == 3
    assert record["beyond_protocol"] == 2 and record["flags"] == ["aux/final agreement"]
    # AutoAttack right on 0-3 of 6, worst case on 0: the gap is 3/6, all discordant in AutoAttack's favour
    assert record["autoattack"]["accuracy"] == pytest.approx(4 / 6)
    assert record["autoattack_gap"]["difference"] == pytest.approx(0.5)
    assert record["autoattack_gap"]["only_first"] == 3 and record["autoattack_gap"]["only_second"] == 0
    assert record["collapsed"]  # 1/6 < 0.5 x 4/6
    assert not verdict.row_verdict(steady_row())["collapsed"]


def _labels():
    return {r.name: r.label for r in STUDIES["verdict"].rows}


def _settings(smoke=False, epochs=15):
    return {"dataset": "synthetic" if smoke else "cifar10", "epochs": epochs, "milestones": [9, 11, 13], "seed": 0,
            "n_examples": 6, "budget": "full", "smoke": smoke, "commit": "abc123"}


def test_paragraph_reports_a_collapsing_row_and_an_unresolved_gap():
    built = verdict.build_verdict({"pgd-at": None, "trades": steady_row(), "trades-ancra": gated_row()})
    text = verdict.verdict_paragraph(built, _labels(), _settings(), 120)
    ci = built["comparison"]["interval"]
    # TRADES-ANCRA keeps example 0 only, TRADES keeps 0, 1, 2: difference -2/6
    assert ci["difference"] == pytest.approx(-2 / 6) and ci["only_second"] == 2
    assert ci["low"] < 0 < ci["high"]
    assert "do not resolve a difference between TRADES-ANCRA and TRADES" in text
    assert "TRADES-ANCRA: worst case 16.7 %" in text and "**Its worst case collapses**" in text
    assert text.count("collapses") == 1  # TRADES does not
    assert "paper-protocol AutoAttack 66.7 %, so AutoAttack overstates it by +50.0 points" in text
    assert "(joint 1, straight-through 1)" in text and "sanity FLAGs: aux/final agreement" in text
    assert "Not finished yet: PGD-AT." in text and "not the paper's 120" in text


def test_paragraph_says_which_side_a_resolved_gap_falls():
    n = 40
    above = _results([1] * n, [_attack("pgd40", "paper", [1] * n)])
    below = _results([1] * n, [_attack("pgd40", "paper", [0] * n)])
    up = verdict.build_verdict({"trades": below, "trades-ancra": above})
    down = verdict.build_verdict({"trades": above, "trades-ancra": below})
    assert "TRADES-ANCRA keeps its worst case above TRADES" in verdict.verdict_paragraph(up, _labels(), _settings(), 120)
    assert "TRADES-ANCRA's worst case is below TRADES's" in verdict.verdict_paragraph(down, _labels(), _settings(), 120)


def test_no_paired_comparison_on_different_examples():
    other = steady_row()
    other["meta"]["indices"] = [9, 8, 7, 6, 5, 4]
    built = verdict.build_verdict({"trades": other, "trades-ancra": gated_row()})
    assert built["comparison"] == {"same_examples": False, "subject": "trades-ancra", "baseline": "trades",
                                   "interval": None}
    assert "different test examples" in verdict.verdict_paragraph(built, _labels(), _settings(), 120)


def _verdict_table(smoke=False, device="cuda:0"):
    study = STUDIES["verdict"]
    rows = {"pgd-at": steady_row(), "trades": steady_row(), "trades-ancra": gated_row()}
    for results in rows.values():
        results["meta"]["device"] = device
    items = [RowInput(study.row(name), "done", f"/runs/{name}", results, commit="abc123")
             for name, results in rows.items()]
    return build_table(study, _settings(smoke), items)


def test_table_carries_the_verdict_and_the_paper_figures():
    table = _verdict_table()
    assert set(table["verdict"]["rows"]) == {"pgd-at", "trades", "trades-ancra"}
    markdown = render_markdown(table)
    assert markdown.index("## Verdict") < markdown.index("## Paper protocol")
    assert table["verdict_paragraph"] in markdown
    # Wilson of 1/6 by hand: centre (1/6 + z²/12) / (1 + z²/6) = 0.2968, half-width 0.2667 → [3.0, 56.4]
    assert "| TRADES-ANCRA | 83.3 | 66.7 | 50.0 | 16.7 [3.0, 56.4] | 5 | 50.0 [" in markdown
    assert "| TRADES-ANCRA | not run | 1 | 1 | not run | not run | 0 | not run | 2 |" in markdown
    assert "| TRADES-ANCRA | paper Tables 1 and 2 (cifar10) | 81.70 |" in markdown  # the paper beside ours


# ---------------------------------------------------------------- the study and its options

def test_verdict_study_defaults(tmp_path):
    study = STUDIES["verdict"]
    assert [r.label for r in study.rows] == ["PGD-AT", "TRADES", "TRADES-ANCRA"]
    assert study.rows_per_device == 3 and study.verdict and study.evaluate
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))
    assert (plan.epochs, plan.milestones, plan.n_examples, plan.budget) == (15, (9, 11, 13), 1000, "full")
    assert plan.run_dir(study.row("trades")).name == "cifar10_resnet18_trades_s0_e15"
    assert make_plan(reproduce.parse_args(["verdict", "--epochs", "120", "--out-dir", str(tmp_path)])).epochs == 120
    assert make_plan(reproduce.parse_args(["table1", "--out-dir", str(tmp_path)])).epochs == 120


@pytest.mark.parametrize("argv, message", [
    (["table1", "--time-budget", "600"], "belong to the verdict study"),
    (["verdict", "--time-budget", "0"], "above 0"),
    (["verdict", "--time-budget", "nan"], "finite"),
    (["verdict", "--smoke", "--record", "R.md"], "a smoke or synthetic run is never recorded"),
])
def test_bad_verdict_options_are_refused_before_anything_is_created(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(reproduce.parse_args([*argv, "--out-dir", str(tmp_path / "out")]))
    except SystemExit as exit_:  # refused while parsing
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_record_refusals():
    assert "never recorded" in verdict.record_refusal(True, "synthetic", True)
    assert "no CUDA device" in verdict.record_refusal(False, "cifar10", False)
    assert verdict.record_refusal(False, "cifar10", True) is None
    assert "was not evaluated on a CUDA device" in verdict.record_problem(_verdict_table(device="cpu"))
    assert "never recorded" in verdict.record_problem(_verdict_table(smoke=True))


def test_record_appends_once_and_replaces_the_placeholder(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(verdict.RESULTS_HEADER + "\n" + verdict.NO_VERDICT_YET + "\n")
    table = _verdict_table()
    said = verdict.append_record(path, table, "NVIDIA H200", "python reproduce.py verdict --record RESULTS.md",
                                 "2026-12-04 20:00 UTC")
    assert said == f"recorded the verdict in {path}"
    text = path.read_text()
    assert verdict.NO_VERDICT_YET not in text and text.startswith(verdict.RESULTS_HEADER)
    assert "## Verdict of 2026-12-04 20:00 UTC, NVIDIA H200" in text
    assert "torch 2.4.0; commit abc123" in text and "(a short schedule, not the paper's 120 epochs)" in text
    assert "`python reproduce.py verdict --record RESULTS.md`" in text and table["verdict_paragraph"] in text
    assert verdict.append_record(path, table, "NVIDIA H200", "x", "y") == f"{path} already holds this verdict"
    assert path.read_text() == text
    with pytest.raises(ValueError, match="not recorded"):
        verdict.append_record(path, _verdict_table(device="cpu"), "-", "x", "y")


def test_results_md_holds_only_written_verdicts():
    text = (ROOT / "RESULTS.md").read_text()
    assert text.startswith(verdict.RESULTS_HEADER)
    sections = text.split("\n## ")[1:]
    if not sections:
        assert verdict.NO_VERDICT_YET in text
    for section in sections:
        assert section.startswith("Verdict of ") and "- GPU: " in section and "- command: `python reproduce.py verdict" \
            in section
    assert text.count("<!-- verdict ") == len(sections)


# ---------------------------------------------------------------- time budget

MEASURED = {"overhead_seconds": 10.0, "epoch_seconds": 20.0, "example_seconds": 0.125, "probe_seconds": 30.0}


def test_choose_schedule_by_hand():
    # cost = 10 + 20·epochs + 0.125·n
    assert verdict.choose_schedule(435, MEASURED, 15, 1000) == (15, 1000)   # 10 + 300 + 125 fits exactly
    assert verdict.choose_schedule(430, MEASURED, 15, 1000) == (14, 1000)   # 10 + 280 + 125 = 415
    assert verdict.choose_schedule(160, MEASURED, 15, 1000) == (5, 400)     # 5 epochs leave 50 s: 400 examples
    assert verdict.choose_schedule(60, MEASURED, 15, 1000) == (1, 200)      # 10 + 20 + 25 = 55
    with pytest.raises(verdict.BudgetError, match="need about 55 s"):
        verdict.choose_schedule(50, MEASURED, 15, 1000)


def _write_probe(probe, epoch_seconds, eval_seconds):
    for row in probe.rows:
        run = probe.run_dir(row)
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "seconds": epoch_seconds}) + "\n")
        evaluation = probe.eval_dir(row)
        evaluation.mkdir(parents=True)
        (evaluation / "results.json").write_text(json.dumps(
            {"meta": {"seconds": eval_seconds}, "clean": {}, "attacks": [], "worst_case": {}}))


def test_time_budget_probes_once_then_keeps_its_plan(tmp_path):
    side_by_side = replace(make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)])), slots=(None,) * 3)
    plan = side_by_side
    ticks = iter(range(0, 1000, 5))
    clock = lambda: float(next(ticks))
    probes = []

    def run_study(probe):
        probes.append(probe)
        assert probe.epochs == 1 and probe.n_examples == 32
        assert probe.rows[2].options[-4:] == ("--train-size", "10000", "--eval-size", "200")  # a fifth of each
        assert str(probe.study_dir).startswith(str(plan.study_dir / "probe"))
        _write_probe(probe, epoch_seconds=8.0, eval_seconds=1.6)
        return 0

    started = clock()  # 0; the probe starts at 5 and is measured at 10 (5 s); planning at 15
    chosen, budget = verdict_run.plan_within_budget(plan, 600.0, started, run_study, clock, echo=lambda _: None)
    measured = budget["measured"]
    assert measured["waves"] == 1 and measured["epoch_seconds"] == 8.0 * verdict.PROBE_FRACTION
    assert measured["example_seconds"] == pytest.approx(verdict.EVAL_SAFETY * 1.6 / 32)
    assert measured["overhead_seconds"] == 0.0  # 5 s of probe wall, 9.6 s measured inside it
    usable = verdict.MARGIN * (600 - 15 - verdict.TABLE_RESERVE)
    assert (chosen.epochs, chosen.n_examples) == verdict.choose_schedule(usable, measured, 15, 1000)
    # 0.9 x 575 = 517.5 s: 40 s per epoch and 0.1 s per example leave 10 epochs for 1000 examples
    assert (chosen.epochs, chosen.n_examples, chosen.milestones) == (10, 1000, (6, 8, 9))
    assert "shortened epochs 15 →" in verdict.budget_text(budget)
    again, _ = verdict_run.plan_within_budget(plan, 600.0, 0.0, run_study, clock, echo=lambda _: None)
    assert len(probes) == 1 and (again.epochs, again.n_examples) == (chosen.epochs, chosen.n_examples)
    # a budget that shortens nothing keeps the request's schedule (here the smoke runs' milestones)
    smoke = make_plan(reproduce.parse_args(["verdict", "--smoke", "--out-dir", str(tmp_path / "smoke")]))
    kept, _ = verdict_run.plan_within_budget(smoke, 1e6, 0.0, lambda probe: _write_probe(probe, 1.0, 1.0) or 0, clock,
                                         echo=lambda _: None)
    assert (kept.epochs, kept.milestones, kept.n_examples) == (smoke.epochs, smoke.milestones, smoke.n_examples)
    # with one slot the rows run one after the other: three waves, and the probe's wall time holds all three
    one_slot = verdict_run.measure_probe(verdict_run.probe_plan(replace(plan, slots=(None,))), 30.0)
    assert one_slot["waves"] == 3 and one_slot["epoch_seconds"] == 3 * 8.0 * verdict.PROBE_FRACTION
    assert one_slot["example_seconds"] == pytest.approx(3 * 2 * 1.6 / 32)
    assert one_slot["overhead_seconds"] == pytest.approx(30 - 3 * 9.6)


def test_smoke_probe_trains_on_all_smoke_images(tmp_path):
    plan = make_plan(reproduce.parse_args(["verdict", "--smoke", "--out-dir", str(tmp_path)]))
    probe = verdict_run.probe_plan(plan)
    assert probe.rows[0].options[-4:] == ("--train-size", "32", "--eval-size", "32") and probe.n_examples == 4
    assert probe.dataset == "synthetic" and probe.smoke and not probe.study.verdict


def test_phase_times_from_the_rows_files(tmp_path):
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path), "--epochs", "2"]))
    for i, row in enumerate(plan.rows):
        run = plan.run_dir(row)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 10.0 * (i + 1)}) + "\n"
                                                   for e in (1, 2)))
    times = verdict_run.phase_times(plan)
    assert times["train_seconds"] == 60.0 and times["epoch_seconds"] == 30.0 and times["evaluate_seconds"] is None
    assert times["rows"]["pgd-at"] == {"train_seconds": 20.0, "epoch_seconds": 10.0, "epochs_timed": 2,
                                       "evaluate_seconds": None}


# ---------------------------------------------------------------- slow: the whole chain

@pytest.mark.slow
def test_verdict_smoke_chain(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(ROOT / "reproduce.py"), "verdict", "--smoke", "--n-examples", "8",
                             "--out-dir", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((out / "verdict" / "table.json").read_text())
    assert [r["status"] for r in table["rows"]] == ["done"] * 3
    assert set(table["verdict"]["rows"]) == {"pgd-at", "trades", "trades-ancra"}
    assert table["verdict"]["comparison"]["same_examples"]
    assert table["timing"]["train_seconds"] > 0 and table["timing"]["evaluate_seconds"] > 0
    markdown = (out / "verdict" / "table.md").read_text()
    assert "## Verdict" in markdown and "## Time per phase" in markdown and "smoke run on synthetic data" in markdown
    assert "Training " in result.stdout and "evaluation " in result.stdout
    assert verdict.record_problem(table) == "a smoke or synthetic run is never recorded"


def test_run_verdict_records_nothing_after_a_failed_study(tmp_path, capsys):
    plan = make_plan(reproduce.parse_args(["verdict", "--out-dir", str(tmp_path)]))

    class Failing:
        def __init__(self, p):
            self.plan, self.echo = p, print

        def run(self):
            p = self.plan.study_dir
            p.mkdir(parents=True, exist_ok=True)
            self.write_table()
            return 1

        def write_table(self):
            items = [RowInput(row, "pending", f"/runs/{row.name}") for row in self.plan.rows]
            table = build_table(self.plan.study, _settings(), items)
            (self.plan.study_dir / "table.json").write_text(json.dumps(table))
            (self.plan.study_dir / "table.md").write_text(render_markdown(table))

    record = tmp_path / "RESULTS.md"
    args = SimpleNamespace(time_budget=None, record=str(record))
    assert verdict_run.run_verdict(plan, args, ["python", "reproduce.py"], make_run=Failing) == 1
    assert not record.exists() and "not recorded" in capsys.readouterr().out


def test_a_verdict_without_finished_rows_has_no_numbers():
    study = STUDIES["verdict"]
    items = [RowInput(row, "pending", f"/runs/{row.name}") for row in study.rows]
    table = build_table(study, _settings(), items)
    assert table["verdict"]["rows"] == {} and table["verdict"]["comparison"] is None
    assert table["verdict"]["pending"] == ["pgd-at", "trades", "trades-ancra"]
    paragraph = table["verdict_paragraph"]
    assert "waits for both rows" in paragraph and "%" not in paragraph.split("Intervals:")[0]
