"""Feature analysis (docs/protocol.md §6): PP/NP metrics against direct computations, the .npz contract,
the histogram and UMAP figures, and the scripts' error handling, on a tiny synthetic checkpoint."""
import argparse
import json

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import draw_hist
import draw_umap
import feature_distance
from conftest import build_model
from utils import data as datasets
from utils.analysis.features import (
    FEATURE_KEYS,
    METRIC_KEYS,
    FeatureError,
    load_npz,
    method_label,
    pair_metrics,
    save_npz,
    summarize,
)
from utils.analysis.plots import (
    PANELS,
    combined_histogram,
    distinct_labels,
    histogram_caption,
    mixed_metadata,
    panel_histogram,
)
from utils.cli import eps_type

IMAGE_SIZE = 16
FAST = ["--steps", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A seeded RA wrn-16-1 saved in the project's checkpoint format, trained on 16×16 synthetic."""
    model = build_model("wrn-16-1", 10, True, input_size=IMAGE_SIZE, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(),
                "model_config": {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": True,
                                 "image_size": IMAGE_SIZE},
                "args": {"dataset": "synthetic", "method": "trades", "anc": True, "image_size": IMAGE_SIZE},
                "epoch": 1}, path)
    return path, model


def test_pair_metrics_on_hand_computed_pairs():
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [6.0, 8.0], [-1.0, -1.0]])
    cos, l2 = pair_metrics(a, b)
    np.testing.assert_allclose(cos, [0.0, 1.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(l2, [2 ** 0.5, 5.0, 8 ** 0.5], atol=1e-12)
    assert summarize([1.0, 2.0, 3.0, 6.0]) == {"min": 1.0, "max": 6.0, "mean": 3.0, "var": 3.5}


@pytest.mark.parametrize("args, ra, expected", [
    ({"method": "trades", "anc": True}, True, "TRADES-ANCRA"),
    ({"method": "pgd-at", "no_anc": True}, False, "PGD-AT"),
    ({"method": "mart", "anc": True}, False, "MART-ANC"),
    ({"method": "trades", "anc": False}, True, "TRADES-RA"),
    ({"method": "trades-ancra"}, None, "TRADES-ANCRA"),
    ({}, False, "MODEL"),
])
def test_method_label_tolerates_missing_keys(args, ra, expected):
    assert method_label(args, ra) == expected


def test_npz_round_trip_needs_no_pickle(tmp_path):
    result = {key: np.arange(3.0) for key in METRIC_KEYS}
    result.update(checkpoint="a.pt", label="TRADES", target_label=2, dataset="cifar10", strategy="random",
                  attack=json.dumps({"ae": {"steps": 10}}), seed=5, n_examples=3)
    save_npz(tmp_path / "r.npz", result)
    loaded = load_npz(tmp_path / "r.npz")
    assert loaded["label"] == "TRADES" and loaded["target_label"] == 2 and loaded["seed"] == 5
    assert json.loads(loaded["attack"]) == {"ae": {"steps": 10}}
    np.testing.assert_array_equal(loaded["pp_l2"], np.arange(3.0))
    np.savez(tmp_path / "bad.npz", pp_cos=np.zeros(2))
    with pytest.raises(FeatureError, match="lacks"):
        load_npz(tmp_path / "bad.npz")


def _test_split():
    return datasets.load_dataset("synthetic", split="test", synthetic_image_size=IMAGE_SIZE, seed=0)


def test_feature_distance_matches_direct_features(checkpoint, tmp_path, capsys):
    """Natural OEs (`random`): every stored array is recomputable from the model and the test set."""
    path, model = checkpoint
    out = tmp_path / "r.npz"
    code = feature_distance.main(["--ckpt", str(path), "--target-label", "3", "--n-examples", "6", "--strategy",
                                  "random", "--save-features", "--output", str(out), *FAST])
    assert code == 0
    assert "| NP | cosine |" in capsys.readouterr().out
    r = load_npz(out)
    for key in METRIC_KEYS + ("anchor_index", "negative_index"):
        assert r[key].shape == (6,), key
    for key in FEATURE_KEYS:
        assert r[key].shape == (6, 64), key
    assert (r["label"], r["target_label"], r["dataset"], r["strategy"], r["n_examples"]) == \
        ("TRADES-ANCRA", 3, "synthetic", "random", 6)
    assert json.loads(r["attack"])["ae"]["steps"] == 2
    test = _test_split()
    np.testing.assert_array_equal(r["anchor_index"], (test.y == 3).nonzero().flatten()[:6].numpy())
    assert (test.y[r["negative_index"]] != 3).all()
    with torch.no_grad():
        _, nat = model(test.float()[r["anchor_index"]], return_features=True)
        _, neg = model(test.float()[r["negative_index"]], return_features=True)
    np.testing.assert_allclose(r["feat_nat"], nat.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r["feat_neg"], neg.numpy(), rtol=1e-4, atol=1e-5)
    for prefix, other in (("pp", r["feat_adv"]), ("np", r["feat_neg"])):
        a, b = r["feat_nat"].astype(np.float64), other.astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        np.testing.assert_allclose(r[f"{prefix}_cos"], cos, rtol=1e-9)
        np.testing.assert_allclose(r[f"{prefix}_l2"], np.linalg.norm(a - b, axis=1), rtol=1e-9)
    assert (r["pp_l2"] > 0).all()  # the attack moved the features


def test_targeted_negatives_are_attacked_and_seeded(checkpoint, tmp_path):
    path, _ = checkpoint
    runs = []
    for name in ("a", "b"):
        assert feature_distance.main(["--ckpt", str(path), "--n-examples", "4", "--out-dir", str(tmp_path / name),
                                      "--save-features", *FAST]) == 0
        runs.append(load_npz(tmp_path / name / "features_TRADES-ANCRA_class0_random_adv.npz"))
    np.testing.assert_array_equal(runs[0]["np_l2"], runs[1]["np_l2"])
    assert json.loads(runs[0]["attack"])["oe"]["aux_weight"] == 2.0
    with torch.no_grad():
        _, natural_neg = checkpoint[1](_test_split().float()[runs[0]["negative_index"]], return_features=True)
    assert not np.allclose(runs[0]["feat_neg"], natural_neg.numpy(), atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar100"], "10 classes but cifar100 has 100"),
    (["--dataset", "cifar10"], "expects 16×16 images but cifar10 has 32×32"),
    (["--target-label", "12"], "--target-label must be in [0, 9]"),
])
def test_feature_distance_clear_errors(checkpoint, tmp_path, capsys, argv, message):
    path, _ = checkpoint
    assert feature_distance.main(["--ckpt", str(path), "--out-dir", str(tmp_path), *FAST, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("text, eps", [("8/255", 8 / 255), ("0.031", 0.031), ("8", 8 / 255), ("1", 1 / 255)])
def test_eps_takes_every_usual_spelling(text, eps):
    assert eps_type(text) == pytest.approx(eps)


@pytest.mark.parametrize("text", ["-1", "0", "300", "eight", "8/0"])
def test_eps_rejects_nonsense_with_a_hint(text):
    with pytest.raises(argparse.ArgumentTypeError, match="8/255"):
        eps_type(text)


def _fake_run(seed, target_label, label):
    rng = np.random.default_rng(seed)
    run = {"pp_cos": rng.uniform(0.8, 1.0, 50), "pp_l2": rng.gamma(2.0, 0.5, 50),
           "np_cos": rng.normal(0.5, 0.1, 50), "np_l2": rng.normal(6.0, 1.0, 50)}
    run.update(checkpoint=f"{label}.pt", label=label, target_label=target_label, dataset="cifar10",
               strategy="random_adv", attack="{}", seed=0, n_examples=50)
    return run


def test_histogram_panels_share_20_density_bins():
    runs = [_fake_run(0, 0, "TRADES"), _fake_run(1, 0, "TRADES-ANCRA")]
    fig = combined_histogram(runs, ["TRADES", "TRADES-ANCRA"])
    assert [ax.get_title() for ax in fig.axes] == [p[1] for p in PANELS]
    assert [ax.get_xlabel() for ax in fig.axes] == ["cosine similarity", "L2 distance"] * 2
    assert all(ax.get_ylabel() == "density" for ax in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["TRADES", "TRADES-ANCRA"]
    for ax in fig.axes:
        bars = [p for p in ax.patches if type(p).__name__ == "Rectangle"]
        assert len(bars) == 40
        lefts = [[b.get_x() for b in bars[:20]], [b.get_x() for b in bars[20:]]]
        assert lefts[0] == lefts[1]  # shared bin edges
        for method in (bars[:20], bars[20:]):
            assert sum(b.get_width() * b.get_height() for b in method) == pytest.approx(1.0)
    single = panel_histogram(PANELS[2], runs, ["x", "y"])
    assert len(single.axes) == 1 and single.axes[0].get_legend() is not None


def test_draw_hist_writes_images_and_warns_on_mixed_classes(tmp_path, capsys):
    paths = []
    for i, (cls, label) in enumerate([(0, "PGD-AT"), (0, "TRADES"), (4, "MART")]):
        paths.append(str(tmp_path / f"{label}.npz"))
        save_npz(paths[-1], _fake_run(i, cls, label))
    assert draw_hist.main([*paths, "--out-dir", str(tmp_path / "fig")]) == 0
    err = capsys.readouterr().err
    assert "different target_label" in err and paths[2] in err and "target_label=4" in err
    stems = ["hist_all"] + [p[3] for p in PANELS]
    for stem in stems:
        assert (tmp_path / "fig" / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
        image = mpimg.imread(tmp_path / "fig" / f"{stem}.png")
        assert image.shape[0] > 300 and image.shape[1] > 400 and image.std() > 0.05
    assert mixed_metadata([{"dataset": "a"}, {"dataset": "a"}], ["x", "y"], keys=("dataset",)) == []
    assert draw_hist.main([*paths, "--labels", "one", "--out-dir", str(tmp_path)]) == 2
    assert "give one label per file" in capsys.readouterr().err


@pytest.mark.slow
def test_draw_umap_is_reproducible(checkpoint, tmp_path):
    path, _ = checkpoint
    embeddings = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert draw_umap.main(["--ckpt", str(path), "--n-examples", "30", "--out-dir", str(out), *FAST]) == 0
        with np.load(out / "umap_embedding.npz", allow_pickle=False) as stored:
            embeddings.append(stored["embedding"])
            assert stored["labels"].shape == (60,) and stored["is_adv"].sum() == 30
            np.testing.assert_array_equal(stored["labels"][:30], stored["labels"][30:])
        assert embeddings[-1].shape == (60, 2) and np.isfinite(embeddings[-1]).all()
        image = mpimg.imread(out / "umap.png")
        assert image.shape[0] > 300 and image.std() > 0.05
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


def test_more_examples_than_the_test_set_holds_is_refused_in_one_line(checkpoint, tmp_path, capsys):
    """As the evaluation: never silently fewer examples than asked (the synthetic test split holds 500)."""
    path, _ = checkpoint
    assert draw_umap.main(["--ckpt", str(path), "--n-examples", "1000", "--out-dir", str(tmp_path / "u"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-examples 1000 is more than the 500 test images" in err
    assert feature_distance.main(["--ckpt", str(path), "--n-examples", "1000", "--out-dir", str(tmp_path / "f"),
                                  *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test images of class 0; use at most 50" in err
    assert not (tmp_path / "u").exists() and not (tmp_path / "f").exists()


def test_two_files_of_one_method_get_distinct_labels_and_a_caption_names_class_dataset_eps_runs():
    runs = [_fake_run(0, 3, "TRADES-ANCRA"), _fake_run(1, 3, "TRADES-ANCRA"), _fake_run(2, 3, "TRADES")]
    runs[0]["checkpoint"], runs[1]["checkpoint"] = "runs/seed0/best.pt", "runs/seed1/best.pt"
    for run in runs:
        run["attack"] = json.dumps({"ae": {"eps": 8 / 255, "steps": 10}})
    files = ["a.npz", "b.npz", "c.npz"]
    labels = distinct_labels([r["label"] for r in runs], runs, files)
    assert labels == ["TRADES-ANCRA (seed0/best.pt)", "TRADES-ANCRA (seed1/best.pt)", "TRADES"]
    runs[1]["checkpoint"] = "other/seed0/best.pt"  # the same run name: the file names tell them apart
    assert distinct_labels(["x", "x"], runs[:2], files[:2]) == ["x (a.npz)", "x (b.npz)"]
    caption = histogram_caption(runs, files)
    assert caption.startswith("class 3 of cifar10 (test split), adversarial examples PGD-10 at ε = 8/255")
    assert "NP strategy random_adv, n = 50" in caption and "runs: seed0/best.pt; seed0/best.pt; TRADES.pt" in caption
    fig = combined_histogram(runs, labels, caption=caption)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == labels
    assert fig.legends[1].get_title().get_text() == caption


def test_eps_sweep_title_names_the_run_not_only_best_pt():
    from utils.evaluation.review import run_label
    assert run_label("/x/runs/cifar10_resnet18_trades-ancra_s0/best.pt") == "cifar10_resnet18_trades-ancra_s0/best.pt"
    assert run_label("robustbench:cifar10/Linf/Carmon2019Unlabeled") == "robustbench:cifar10/Linf/Carmon2019Unlabeled"
    assert run_label("my_models.py:build") == "my_models.py:build" and run_label("best.pt") == "best.pt"
