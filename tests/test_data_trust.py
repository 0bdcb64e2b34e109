"""Issue 19, data and checkpoint reading: crafted or damaged files are refused in one sentence
(exit code 2 through the scripts), no code from a data file ever runs, nothing is created."""
import os
import pickle
import re

import numpy as np
import pytest
import torch

import test_white_attack
from train_CIFAR10_WideResNet import DEFAULTS as WRN
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
    """The single error line of stderr (besides the note saying which data folder was used)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("data: ")]
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
    assert train_main(WRN, argv) == 2
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
    assert train_main(WRN, argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data_batch_2" in line and "label 99" in line
    assert not out.exists()


# ----------------------------------------------------------------------------- 5, 6: checkpoint reading


def _foreign_files(folder):
    """Files that are not checkpoints at all, by name."""
    from PIL import Image
    files = {"random": folder / "random.pt", "json": folder / "config.pt", "png": folder / "image.pt",
             "empty": folder / "empty.pt"}
    files["random"].write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tolist()))
    files["json"].write_text('{"arch": "wrn-16-1"}')
    Image.new("RGB", (4, 4)).save(files["png"], format="PNG")
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize("kind,expected", [("random", "not a PyTorch checkpoint"), ("json", "looks like a JSON file"),
                                           ("png", "looks like a PNG image"), ("empty", "the file is empty")])
def test_files_that_are_not_checkpoints_are_not_called_pickled_code(tmp_path, kind, expected):
    from models import CheckpointError, read_checkpoint
    path = _foreign_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(str(path))
    message = str(err.value)
    assert expected in message and "pickled" not in message and "\n" not in message


def test_real_pickles_with_code_are_still_refused_as_such(tmp_path):
    from models import CheckpointError, read_checkpoint
    path = tmp_path / "exploit.pt"
    _dump(path, _Exploit(tmp_path))
    with pytest.raises(CheckpointError, match="holds pickled Python code or objects"):
        read_checkpoint(str(path))
    assert not (tmp_path / MARKER).exists()


def _config(**changes):
    config = {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": False, "image_size": 16}
    return {k: v for k, v in dict(config, **changes).items() if v != "drop"}


@pytest.mark.parametrize("model_config,args,expected", [
    (_config(num_classes=-3), None, "num_classes -3 is not a positive integer"),
    (_config(num_classes="10"), None, "num_classes '10' is not a positive integer"),
    (_config(num_classes=True), None, "num_classes True is not a positive integer"),
    (_config(reverse_attention="yes"), None, "reverse_attention 'yes' is not true, false or null"),
    (_config(normalization={"mean": [0.5, 0.5, 0.5]}), None, "normalization .* is unusable"),
    (_config(normalization={"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}), None, "std must be positive"),
    (_config(image_size="big"), None, "image_size 'big'"),
    ([1, 2], None, "model_config is a list"),
    (_config(), [1, 2], "args is a list, not a dictionary"),
    (_config(), {"dataset": "cifar10", "data_seed": "x"}, "data_seed 'x'"),
])
def test_malformed_config_or_args_is_one_sentence(tmp_path, tiny_model, capsys, model_config, args, expected):
    from models import CheckpointError, load_model
    model = tiny_model("wrn-16-1", 10, reverse_attention=False)
    payload = {"model": model.state_dict(), "model_config": model_config, "args": args}
    with pytest.raises(CheckpointError, match=expected):
        load_model(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    out = tmp_path / "eval"
    code = test_white_attack.main(["--ckpt", str(path), "--dataset", "synthetic", "--n-examples", "2",
                                   "--out-dir", str(out), "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and re.search(expected, line) and "the file is damaged" in line
    assert not out.exists()


def test_training_resume_of_a_malformed_checkpoint_is_one_sentence(tmp_path, tiny_model):
    from models import CheckpointError
    from utils.checkpoint import load_training_checkpoint
    model = tiny_model("wrn-16-1", 10, reverse_attention=False)
    payload = {"model": model.state_dict(), "model_config": _config(), "optimizer": {}, "scheduler": {}, "rng": {},
               "epoch": 1, "args": ["not", "a", "dict"]}
    torch.save(payload, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="args is a list"):
        load_training_checkpoint(tmp_path / "last.pt")


FACTORY = """
import torch

def build():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
"""


@pytest.mark.parametrize("kind,expected", [("truncated", "truncated or damaged zip"), ("empty", "the file is empty"),
                                           ("folder", "is a folder, not a file")])
def test_unreadable_weights_for_a_model_factory_are_one_line(tmp_path, capsys, kind, expected):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    weights = tmp_path / "weights.pt"
    if kind == "folder":
        weights.mkdir()
    else:
        torch.save(torch.nn.Linear(3 * 32 * 32, 10).state_dict(), weights)
        whole = weights.read_bytes()
        weights.write_bytes(whole[: len(whole) // 3] if kind == "truncated" else b"")
    out = tmp_path / "eval"
    code = test_white_attack.main(["--model-factory", f"{factory}:build", "--weights", str(weights), "--dataset",
                                   "synthetic", "--n-examples", "2", "--out-dir", str(out), "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"--weights file {weights}" in line and expected in line
    assert not out.exists()


# ----------------------------------------------------------------------------- 2: which data folder


def test_data_folder_order_is_flag_then_dot_data_then_checkpoint_and_it_is_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    given, recorded = tmp_path / "given", tmp_path / "recorded"
    given.mkdir()
    recorded.mkdir()
    assert D.resolve_data_dir("cifar10", str(recorded), str(recorded)) == str(recorded)
    assert capsys.readouterr().err == f"data: {recorded} (given by --data-dir)\n"
    assert D.resolve_data_dir("cifar10", None, str(recorded)) == str(recorded)  # no ./data yet
    assert capsys.readouterr().err == f"data: {recorded} (recorded in the checkpoint; pass --data-dir to change)\n"
    (tmp_path / "data").mkdir()
    assert D.resolve_data_dir("cifar10", None, str(recorded)) == "./data"
    err = capsys.readouterr().err
    assert err.startswith(f"data: {tmp_path / 'data'} (the default folder; the checkpoint recorded {recorded}")
    assert D.resolve_data_dir("cifar10", str(given), str(recorded)) == str(given)
    assert D.resolve_data_dir("synthetic", str(given), str(recorded)) is None


def test_a_missing_recorded_data_folder_is_refused_and_never_created(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    gone = tmp_path / "gone" / "data"
    model = tiny_model("wrn-16-1", 10, reverse_attention=False)
    torch.save({"model": model.state_dict(),
                "model_config": {"arch": "wrn-16-1", "num_classes": 10, "reverse_attention": False, "image_size": 32},
                "args": {"dataset": "cifar10", "data_dir": str(gone)}}, tmp_path / "model.pt")
    out = tmp_path / "eval"
    code = test_white_attack.main(["--ckpt", str(tmp_path / "model.pt"), "--n-examples", "2", "--out-dir", str(out),
                                   "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"The data folder {gone} (recorded in" in line and "is not an existing folder" in line
    assert not (tmp_path / "gone").exists() and not out.exists() and not (tmp_path / "data").exists()
    with pytest.raises(DatasetError, match="is not an existing folder"):
        from utils.analysis.features import load_analysis
        load_analysis(str(tmp_path / "model.pt"))
    assert not (tmp_path / "gone").exists()


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    def fail_after_mkdir(name, root):
        root.mkdir(parents=True)
        raise OSError("network unreachable")
    monkeypatch.setattr(D, "_download_cifar", fail_after_mkdir)
    with pytest.raises(DatasetError, match="the download failed"):
        load_dataset("cifar10", tmp_path / "new" / "data", "test")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7: synthetic test split


def test_synthetic_examples_do_not_depend_on_the_split_size():
    small, large = D.make_synthetic("test", 16, 8, seed=2), D.make_synthetic("test", 1234, 8, seed=2)
    assert torch.equal(small.x, large.x[:16]) and torch.equal(small.y, large.y[:16])
    default = D.make_synthetic("test", None, 8, seed=2)
    assert torch.equal(default.x, large.x[:500]) and torch.equal(default.y, large.y[:500])
    for n in (7, 25, 1234):  # every prefix is balanced to within one example
        counts = torch.bincount(large.y[:n], minlength=10)
        assert counts.max() - counts.min() <= 1
    assert not torch.equal(D.make_synthetic("train", 16, 8, seed=2).x, small.x)  # the splits' streams differ


def test_evaluation_subset_examples_keep_their_identity_beyond_500(tiny_model):
    from utils.evaluation.command import load_test_subset
    config = {"num_classes": 10, "image_size": 8}
    few = load_test_subset(config, {"dataset": "synthetic"}, n_examples=16)
    many = load_test_subset(config, {"dataset": "synthetic"}, n_examples=600)
    position = {index: i for i, index in enumerate(many.indices)}
    for i, index in enumerate(few.indices):
        assert torch.equal(few.x[i], many.x[position[index]]) and few.y[i] == many.y[position[index]]


def test_absurd_n_examples_is_one_line(tmp_path, tiny_model, capsys):
    from utils.evaluation.catalogue import EvaluationError
    from utils.evaluation.command import load_test_subset
    with pytest.raises(EvaluationError, match="--n-examples 20000000 is more synthetic 32×32 images than fit"):
        load_test_subset({"num_classes": 10, "image_size": 32}, {"dataset": "synthetic"}, n_examples=20_000_000)
    cifar10(tmp_path / "data")
    with pytest.raises(EvaluationError, match="--n-examples 5 is more than the 4 test images of cifar10; use at most 4"):
        load_test_subset({"num_classes": 10, "image_size": 32}, {"dataset": "cifar10"}, n_examples=5,
                         data_dir=str(tmp_path / "data"))
    with pytest.raises(DatasetError, match="between 0 and"):
        D.make_synthetic("test", 20_000_000, 32)


# ----------------------------------------------------------------------------- 4: image folders

NAMES = [f"class{i}" for i in range(10)]


def image_folders(root, size=32):
    """CIFAR-10 image folders with one random PNG per class and split."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in NAMES:
        for split in ("train", "test"):
            (root / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / name / "a.png")
    return root


def test_a_decompression_bomb_is_one_sentence(tmp_path, monkeypatch):
    from PIL import Image
    image_folders(tmp_path)
    for limit, expected in ((400, "decompression bomb"), (1000, "decompression bomb")):  # error, then warning
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # a 32×32 image now counts as a bomb
        with pytest.raises(DatasetError, match=expected) as err:
            load_dataset("cifar10", tmp_path, "train", download=False)
        assert "class0/a.png" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    image_folders(tmp_path)
    os.mkfifo(tmp_path / "train" / "class3" / "b.jpg")
    with pytest.raises(DatasetError, match="is not a regular file") as err:  # would hang forever in open()
        load_dataset("cifar10", tmp_path, "train", download=False)
    assert "class3/b.jpg" in str(err.value)


def test_sixteen_bit_grey_pngs_are_scaled_not_clipped(tmp_path):
    from PIL import Image
    image_folders(tmp_path)
    grey = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(grey).save(tmp_path / "test" / "class0" / "a.png")
    test = load_dataset("cifar10", tmp_path, "test", download=False)
    expected = torch.from_numpy(np.rint(grey / 257).astype(np.uint8))
    assert all(torch.equal(test.x[0, c], expected) for c in range(3))
    assert test.x[0].max() == 255 and 0 < int(test.x[0, 0, 4, 0]) < 255  # spread, not saturated
    assert int(test.x[0, 0, 16, 0]) == round(16 * 32 * 64 / 257)


def test_an_empty_or_missing_class_folder_is_refused(tmp_path):
    image_folders(tmp_path)
    (tmp_path / "train" / "class4" / "a.png").unlink()
    with pytest.raises(DatasetError, match="class4 holds no images") as err:
        load_dataset("cifar10", tmp_path, "train", download=False)
    assert "\n" not in str(err.value)
    (tmp_path / "train" / "class4").rmdir()  # now 9 class folders: the class count check refuses it
    with pytest.raises(DatasetError, match="9 class folders"):
        load_dataset("cifar10", tmp_path, "train", download=False)
    image_folders(tmp_path / "other")
    (tmp_path / "other" / "test" / "class7" / "a.png").unlink()
    (tmp_path / "other" / "test" / "class7").rmdir()
    with pytest.raises(DatasetError, match="class7 is missing"):
        load_dataset("cifar10", tmp_path / "other", "test", download=False)


def test_sixteen_bit_rgb_pngs_keep_their_range(tmp_path):
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    image_folders(tmp_path)
    pixels = np.zeros((32, 32, 3), dtype=">u2")
    pixels[0, 0], pixels[0, 1] = (0, 32896, 65535), (257, 1000, 60000)
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(32))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", 32, 32, 16, 2, 0, 0, 0)  # 16 bits per channel, RGB
    (tmp_path / "test" / "class0" / "a.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    test = load_dataset("cifar10", tmp_path, "test", download=False)
    assert test.x[0, :, 0, 0].tolist() == [0, 128, 255] and test.x[0, :, 0, 1].tolist() == [1, 3, 234]


@pytest.mark.parametrize("sigma", [torch.tensor([0.2, 0.0, 0.2]), torch.tensor([0.2, float("nan"), 0.2])])
def test_unusable_mu_sigma_buffers_are_one_sentence(tiny_model, sigma):
    from models import CheckpointError, load_model
    state = dict(tiny_model("wrn-16-1", 10, reverse_attention=False).state_dict(), mu=torch.zeros(3), sigma=sigma)
    with pytest.raises(CheckpointError, match="mu/sigma buffers are no usable input normalization"):
        load_model(state, reverse_attention=False)


@pytest.mark.parametrize("mean,std", [(["a", 1, 1], [1, 1, 1]), ([[0.5]], [1.0]), ("0.5", 0.2), (True, 0.2)])
def test_normalization_values_that_are_not_numbers_are_refused(mean, std):
    from models import NormalizationError
    from models.normalization import check_normalization
    with pytest.raises(NormalizationError, match="must be numbers"):
        check_normalization(mean, std)


@pytest.mark.parametrize("line", ['{"epoch": 1', '["epoch", 1]', '{"loss": 1}', '{"epoch": "2"}'])
def test_a_damaged_metrics_file_is_one_sentence_naming_the_line(tmp_path, line):
    from utils.checkpoint import RunDirError, read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n\n' + line + "\n")
    with pytest.raises(RunDirError, match=r"metrics.jsonl is damaged \(line 3 is not an epoch record\)") as err:
        read_metrics(tmp_path, 5)
    assert "\n" not in str(err.value)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0.5}\n{"epoch": 2}\n')
    assert read_metrics(tmp_path, 1) == [{"epoch": 1, "loss": 0.5}]


def test_a_malicious_cifar100_meta_file_runs_nothing(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        _dump(folder / name, {b"data": np.zeros((2, 3072), dtype=np.uint8), b"fine_labels": [0, 99]})
    _dump(folder / "meta", {b"fine_label_names": _Exploit(tmp_path)})
    with pytest.raises(DatasetError, match="meta is not a CIFAR data file: it names the Python object posix.mkdir"):
        load_dataset("cifar100", tmp_path, "test")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("content,expected", [(b"n01\nn02\nn01\n", "lists 'n01' more than once"),
                                              (b"\xff\xfe\x00", "not classes of the training split"), (b"", "lists no class")])
def test_a_damaged_wnids_file_is_one_sentence(tmp_path, content, expected):
    base = tmp_path / "tiny-imagenet-200"
    (base / "train" / "n01").mkdir(parents=True)
    (base / "wnids.txt").write_bytes(content)
    with pytest.raises(DatasetError, match=expected):
        load_dataset("tiny-imagenet", tmp_path, "train")
