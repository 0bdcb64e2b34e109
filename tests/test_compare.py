"""Several checkpoints in one command (docs/evaluation.md#comparing-models): the Wilson interval and the
paper-protocol column on hand numbers, the paired difference and when pairing is refused, sub-folder names,
and test_white_attack.py --ckpt a.pt b.pt (one subset, one table, each model resumable in its own folder,
bad input refused before any work)."""
import json
from pathlib import Path

import pytest
import torch

import test_white_attack
from models import create_model
from utils.evaluation import compare, stats


def test_comparison_uses_the_one_statistics_module():
    assert compare.wilson_interval is stats.wilson_interval
    assert compare.paired_difference_interval is stats.paired_difference_interval
    low, high = compare.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    low, high = compare.wilson_interval(0, 100)
    assert low == 0.0 and high == pytest.approx(0.0370, abs=1e-4)


def _report(worst, indices=(0, 1, 2, 3), labels=(3, 1, 4, 1)):
    return {"meta": {"indices": None if indices is None else list(indices)},
            "labels": None if labels is None else list(labels), "worst_case": {"correct": list(worst)}}


def test_paired_difference_to_the_first_model():
    a, b = _report([1, 1, 0, 0]), _report([1, 0, 0, 0])
    assert compare.pairing_refusal(["a", "b"], [a, b]) is None
    pair, = compare.paired_rows(["a", "b"], [a, b])
    # b − a on the same four examples: (a, b, c, d) = (1, 0, 1, 2), difference −1/4, Newcombe's method 10
    assert pair["difference"] == -0.25 and (pair["only_first"], pair["only_second"]) == (0, 1)
    assert (pair["low"], pair["high"]) == pytest.approx(stats.newcombe_paired_interval(1, 0, 1, 2))
    assert pair["claim"] == "not resolved by these 4 examples"
    lines = "\n".join(compare.paired_markdown([pair], None))
    assert "| b | -25.00 | [" in lines and "not training seeds, other test sets or other attacks" in lines
    n = 40
    up = compare.paired_rows(["a", "b"], [_report([0] * n, range(n), [0] * n), _report([1] * n, range(n), [0] * n)])
    assert up[0]["claim"] == "b above a" and up[0]["low"] > 0


def test_pairing_is_refused_without_the_same_recorded_images_and_labels():
    a = _report([1, 1, 0, 0])
    unrecorded = compare.pairing_refusal(["a", "b"], [a, _report([1, 0, 0, 0], indices=None)])
    assert unrecorded.startswith("b's results.json records no test-image indices")
    both_unrecorded = [_report([1, 0, 0, 0], indices=None), _report([1, 0, 0, 0], indices=None)]
    assert "records no test-image indices" in compare.pairing_refusal(["a", "b"], both_unrecorded)  # None == None is no pairing
    assert "other test images" in compare.pairing_refusal(["a", "b"], [a, _report([1, 0, 0, 0], indices=(0, 1, 2, 5))])
    assert "other labels" in compare.pairing_refusal(["a", "b"], [a, _report([1, 0, 0, 0], labels=(3, 1, 4, 2))])
    assert compare.paired_markdown([], "x differs") == ["", "No paired worst-case differences: x differs."]


def test_folder_names_are_distinct():
    assert compare.folder_names(["a/best.pt", "b/best.pt", "c/last.pt"]) == ["a_best", "b_best", "last"]
    assert compare.folder_names(["x/m.pt", "x/m.pth"]) == ["x_m", "x_m_2"]


def test_paper_protocol_is_the_per_example_worst_of_the_standalone_paper_attacks():
    report = {"clean": {"correct": [1, 1, 1, 1, 0]}, "attacks": [
        {"name": "pgd40", "family": "paper", "standalone": True, "in_worst_case": True, "correct": [1, 1, 0, 1, 0]},
        {"name": "cw40", "family": "paper", "standalone": True, "in_worst_case": True, "correct": [1, 0, 1, 1, 0]},
        {"name": "autoattack", "family": "paper", "standalone": False, "in_worst_case": True,
         "correct": [0, 1, 1, 1, 1]},  # cascade row: saw survivors only, not a paper-protocol figure
        {"name": "joint", "family": "joint", "standalone": False, "in_worst_case": True, "correct": [1, 1, 1, 0, 0]}]}
    assert compare.paper_protocol(report) == (0.4, ["pgd40", "cw40"])


def checkpoint(path, seed):
    torch.manual_seed(seed)
    model = create_model("wrn-16-1", 10, False)
    model.train()
    with torch.no_grad():
        model(torch.rand(8, 3, 16, 16))
    torch.save({"model": model.eval().state_dict(), "model_config": {"arch": "wrn-16-1", "num_classes": 10,
                "reverse_attention": False, "image_size": 16}, "args": {"dataset": "synthetic"}}, path)
    return path


@pytest.mark.slow
def test_script_compares_models_on_one_subset_and_resumes(tmp_path, capsys):
    a, b = checkpoint(tmp_path / "a.pt", 0), checkpoint(tmp_path / "b.pt", 1)
    out = tmp_path / "cmp"
    argv = ["--ckpt", str(a), str(b), "--n-examples", "8", "--attacks", "fgsm,pgd10", "--budget", "small",
            "--quiet", "--indicators", "4", "--out-dir", str(out)]
    assert test_white_attack.main(argv) == 0
    table = json.loads((out / "comparison.json").read_text())
    assert [m["model"] for m in table["models"]] == ["a", "b"] and table["meta"]["n"] == 8
    for row in table["models"]:
        results = json.loads((out / row["model"] / "results.json").read_text())
        assert row["worst_case"] == results["worst_case"]["accuracy"] and row["clean"] == results["clean"]["accuracy"]
        assert row["paper_attacks"] == ["fgsm"]
        low, high = row["worst_case_ci95"]
        assert low <= row["worst_case"] <= high
    md = (out / "comparison.md").read_text()
    assert "| model | clean | paper protocol | worst case | 95 % interval | FLAGs |" in md and md in capsys.readouterr().out
    pair, = table["paired"]  # b − a on the same eight images
    assert table["paired_refusal"] is None and pair["model"] == "b" and pair["baseline"] == "a" and pair["n"] == 8
    worst = {r["model"]: r["worst_case"] for r in table["models"]}
    assert pair["difference"] == pytest.approx(worst["b"] - worst["a"]) and "Paired worst-case differences to a" in md
    # a finished model is reused; a lost one is evaluated again
    kept = (out / "a" / "results.json").stat().st_mtime_ns
    (out / "b" / "results.json").unlink()
    assert test_white_attack.main(argv) == 0
    assert (out / "a" / "results.json").stat().st_mtime_ns == kept
    assert json.loads((out / "comparison.json").read_text())["models"] == table["models"]


def test_script_refuses_a_missing_checkpoint_before_any_work(tmp_path, capsys):
    a = checkpoint(tmp_path / "a.pt", 0)
    out = tmp_path / "cmp"
    code = test_white_attack.main(["--ckpt", str(a), str(tmp_path / "gone.pt"), "--out-dir", str(out)])
    assert code == 2 and capsys.readouterr().err.startswith("error: checkpoint ") and not out.exists()
    code = test_white_attack.main(["--ckpt", str(a), str(a), "--out-dir", str(out)])
    assert code == 2 and "same checkpoint twice" in capsys.readouterr().err and not out.exists()


def test_models_of_other_image_sizes_or_labels_are_refused(tmp_path):
    """Models trained on 32×32 and 16×16 images cannot see the same test images: refused before any
    evaluation; models whose results carry other labels or images are refused after."""
    from types import SimpleNamespace

    from utils.evaluation.errors import EvaluationError

    args = SimpleNamespace(compare=["plain32/best.pt", "plain16/best.pt"], dataset=None)
    sizes = {"plain32/best.pt": 32, "plain16/best.pt": 16}
    load = lambda path: (None, {"image_size": sizes[path]}, {"dataset": "synthetic"})
    with pytest.raises(EvaluationError, match=r"different sizes \(plain32/best.pt: 32×32, plain16/best.pt: 16×16\)"):
        compare.preflight(args, load)
    compare.preflight(SimpleNamespace(compare=list(sizes), dataset=None),
                      lambda path: (None, {"image_size": 32}, {"dataset": "synthetic"}))  # one size: accepted

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b""), b.write_bytes(b"")
    out = tmp_path / "cmp"

    def evaluate(labels_of):
        def one(args_one):
            sub = Path(args_one.out_dir)
            sub.mkdir(parents=True)
            labels = labels_of[Path(args_one.ckpt).name]
            meta = {"dataset": "synthetic", "indices": [0, 1, 2], "subset_seed": 0}
            (sub / "results.json").write_text(json.dumps({"meta": meta, "labels": labels}))
        return one

    run_args = SimpleNamespace(compare=[str(a), str(b)], export_robustbench=None, out_dir=str(out), dataset=None)
    with pytest.raises(EvaluationError, match="b's test images carry other labels than a's"):
        compare.run_compare(run_args, evaluate({"a.pt": [0, 1, 2], "b.pt": [0, 1, 3]}))


def test_a_comparison_of_smoke_runs_says_it_is_no_evaluation():
    from utils.evaluation.report import SMOKE_LABEL

    meta = {"dataset": "synthetic", "n": 4, "subset_seed": 0, "eps_text": "8/255", "smoke": True}
    rows = [{"model": "a", "clean": 1.0, "paper_protocol": 0.5, "worst_case": 0.25, "worst_case_count": 1, "n": 4,
             "worst_case_ci95": [0.05, 0.7], "flags": []}]
    text = compare.markdown_table(rows, meta)
    assert text.splitlines()[2] == SMOKE_LABEL and "not a robustness evaluation" in text
    assert SMOKE_LABEL not in compare.markdown_table(rows, dict(meta, smoke=False))
