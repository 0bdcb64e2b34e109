"""Issue 19, data and checkpoint reading: crafted or damaged files are refused in one sentence
(exit code 2 through the scripts), no code from a data file ever runs, nothing is created."""
import os
import pickle

import numpy as np
import pytest
import torch

import test_white_attack
from utils import data as D
from utils.data import DatasetError, load_dataset
from utils.training.cli import main as train_main

MARKER = "pwned_marker"


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Every download attempt fails as it would offline."""
    def fail(name, root):
        raise OSError("network unreachable")
    monkeypatch.setattr(D, "_download_cifar", fail)


class _Exploit:
    """Unpickling this would create the file ``MARKER`` in the current directory."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __reduce__(self):
        return os.mkdir, (os.path.join(self.folder, MARKER),)


def _dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=protocol)


def cifar10(root, n=4, data=None, labels=None, protocol=pickle.DEFAULT_PROTOCOL):
    """A tiny CIFAR-10 pickle folder; ``data``/``labels`` replace test_batch's content."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _dump(folder / name, {b"data": pixels, b"labels": rng.integers(0, 10, n).tolist()}, protocol)
    if data is not None or labels is not None:
        entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
                 b"labels": list(range(n)) if labels is None else labels}
        _dump(folder / "test_batch", entry, protocol)
    return folder


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- 1: no code from a pickle


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_style_pickles_load_with_every_protocol(tmp_path, protocol):
    folder = cifar10(tmp_path, data=np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072),
                     labels=[3, 9], n=2, protocol=protocol)
    _dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 2},
          protocol)
    test = load_dataset("cifar10", tmp_path, "test")
    assert test.y.tolist() == [3, 9] and test.classes[9] == "c9"
    assert test.x.flatten().tolist() == [i % 256 for i in range(2 * 3072)]


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder = cifar10(tmp_path, data=_Exploit(tmp_path))
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", tmp_path, "test")
    message = str(err.value)
    assert str(folder / "test_batch") in message and "posix.mkdir" in message and "\n" not in message
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("target", [os.system, eval, getattr])
def test_every_global_outside_numpy_arrays_is_refused(tmp_path, target):
    folder = tmp_path / "cifar-10-batches-py"
    cifar10(tmp_path)
    malicious = type("M", (), {"__reduce__": lambda self: (target, ("1",))})
    payload = pickle.dumps({b"data": malicious(), b"labels": []})
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(DatasetError, match=f"names the Python object .*{target.__name__}"):
        load_dataset("cifar10", tmp_path, "test")


def _cifar_checkpoint(path, model):
    torch.save({"model": model.state_dict(),
                "model_config": {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": False, "image_size": 32},
                "args": {"dataset": "cifar10"}}, path)
    return path


def test_malicious_data_folder_through_training_and_evaluation_scripts(tmp_path, capsys, tiny_model):
    data_dir = tmp_path / "data"
    cifar10(data_dir, data=_Exploit(tmp_path))
    (data_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        (data_dir / "cifar-10-batches-py" / "test_batch").read_bytes())
    out = tmp_path / "runs"
    argv = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--depth", "16", "--widen", "1", "--epochs", "1",
            "--out-dir", str(out), "--quiet"]
    assert train_main("wideresnet", argv) == 2
    assert "data_batch_3" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / MARKER).exists()
    ckpt = _cifar_checkpoint(tmp_path / "model.pt", tiny_model("wrn-16-1", 10, reverse_attention=False))
    eval_out = tmp_path / "eval"
    code = test_white_attack.main(["--ckpt", str(ckpt), "--data-dir", str(data_dir), "--n-examples", "2",
                                   "--out-dir", str(eval_out), "--quiet"])
    assert code == 2 and "test_batch" in one_error_line(capsys.readouterr().err)
    assert not eval_out.exists() and not (tmp_path / MARKER).exists()


# ----------------------------------------------------------------------------- 3: damaged pickles


@pytest.mark.parametrize("data,labels,expected", [
    (np.zeros((4, 3000), dtype=np.uint8), None, "N×3072"),
    (np.zeros((4, 3072), dtype=np.float32), None, "float32"),
    (None, [1, 2, 3], "3 labels for 4 images"),
    (None, [0, 1, 2, 10], "label 10 is outside 0..9"),
    (None, [0, 1, -1, 2], "label -1 is outside 0..9"),
    (None, ["a", 1, 2, 3], "list of integers"),
])
def test_damaged_pickles_are_one_sentence_naming_the_file(tmp_path, data, labels, expected):
    folder = cifar10(tmp_path, data=data, labels=labels)
    with pytest.raises(DatasetError, match=expected) as err:
        load_dataset("cifar10", tmp_path, "test")
    assert str(folder / "test_batch") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", None])
def test_truncated_or_garbage_pickle_is_refused(tmp_path, content):
    folder = cifar10(tmp_path)
    whole = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(whole[: len(whole) // 2] if content is None else content)
    with pytest.raises(DatasetError, match="truncated or not a CIFAR pickle") as err:
        load_dataset("cifar10", tmp_path, "test")
    assert str(folder / "test_batch") in str(err.value)


def test_meta_file_with_the_wrong_class_count_is_refused(tmp_path):
    folder = cifar10(tmp_path)
    _dump(folder / "batches.meta", {b"label_names": [b"a", b"b"]})
    with pytest.raises(DatasetError, match="must list 10 class names"):
        load_dataset("cifar10", tmp_path, "test")


def test_damaged_training_data_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    data_dir = tmp_path / "data"
    folder = cifar10(data_dir)
    _dump(folder / "data_batch_2", {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 99]})
    out = tmp_path / "runs"
    argv = ["--dataset", "cifar10", "--data-dir", str(data_dir), "--depth", "16", "--widen", "1", "--epochs", "1",
            "--out-dir", str(out), "--quiet"]
    assert train_main("wideresnet", argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data_batch_2" in line and "label 99" in line
    assert not out.exists()
