"""Tests for utils/data.py: every source is generated in tmp_path, nothing touches the network."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from utils import data as D
from utils.data import BatchLoader, DatasetError, TensorPair, crop_flip, fixed_subset, load_dataset, split_holdout

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def no_download(monkeypatch):
    """Make every download attempt fail as it would offline."""
    def fail(name, root):
        raise OSError("network unreachable")
    monkeypatch.setattr(D, "_download_cifar", fail)


def _dump(path, obj):
    """Write a pickle as the CIFAR archives do (byte-string keys)."""
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _make_cifar_pickles(root, fine, n_per_file=4):
    """Write a tiny CIFAR-10 (or CIFAR-100 when ``fine``) folder in torchvision's pickle layout."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if fine else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    files = ["train", "test"] if fine else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    label_key, n_classes = (b"fine_labels", 100) if fine else (b"labels", 10)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, n_per_file).tolist()
        _dump(folder / name, {b"data": data, label_key: labels, b"batch_label": b"x"})
        written[name] = (data, labels)
    names = [f"c{i}".encode() for i in range(n_classes)]
    if fine:
        _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    else:
        _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
    return written


def test_cifar10_pickles(tmp_path):
    written = _make_cifar_pickles(tmp_path, fine=False)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar10", tmp_path, "test")
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.uint8
    assert test.y.dtype == torch.int64 and len(test) == 4
    data, labels = written["data_batch_2"]
    assert torch.equal(train.x[4:8], torch.from_numpy(data).view(4, 3, 32, 32))
    assert train.y[4:8].tolist() == labels
    assert train.classes == CIFAR10_NAMES


def test_cifar100_pickles(tmp_path):
    written = _make_cifar_pickles(tmp_path, fine=True)
    test = load_dataset("cifar100", tmp_path, "test", download=False)
    data, labels = written["test"]
    assert torch.equal(test.x, torch.from_numpy(data).view(4, 3, 32, 32))
    assert test.y.tolist() == labels
    assert len(test.classes) == 100 and test.classes[3] == "c3"


def test_cifar10_class_names_are_already_sorted():
    # Image folders are labelled in sorted order; this is why that equals CIFAR-10's own order.
    assert sorted(CIFAR10_NAMES) == CIFAR10_NAMES


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_image_folder(tmp_path, nested):
    root = tmp_path / "cifar10" if nested else tmp_path
    rng = np.random.default_rng(1)
    expected = {}
    for label, name in enumerate(CIFAR10_NAMES):
        for split in ("train", "test"):
            (root / split / name).mkdir(parents=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "train" / name / "0000.png")
        Image.fromarray(pixels).save(root / "train" / name / "0001.jpg", quality=95)
        Image.fromarray(pixels).save(root / "test" / name / "0000.png")
        expected[label] = pixels
    train = load_dataset("cifar10", tmp_path, "train", download=False)
    test = load_dataset("cifar10", tmp_path, "test", download=False)
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    assert train.y.tolist() == [c for c in range(10) for _ in range(2)]
    assert train.classes == CIFAR10_NAMES
    for label in range(10):  # PNG is lossless, so the first image of each class is exact
        assert torch.equal(test.x[label].permute(1, 2, 0), torch.from_numpy(expected[label]))
        assert torch.equal(train.x[2 * label], test.x[label])


def test_cifar_image_folder_wrong_class_count(tmp_path):
    for name in CIFAR10_NAMES[:3]:
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "train" / name / "a.png")
    with pytest.raises(DatasetError, match="3 class folders"):
        load_dataset("cifar10", tmp_path, download=False)


def _make_tiny_imagenet(root):
    """Write a 3-class Tiny-ImageNet in the official archive layout; return val labels by file."""
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # deliberately unsorted: wnids.txt order defines the labels
    (base / "val" / "images").mkdir(parents=True)
    (base / "test" / "images").mkdir(parents=True)  # unlabelled, like the real archive
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, wnid in enumerate(wnids):
        (base / "train" / wnid / "images").mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for k in range(2):
            color = (40 * i, 10 * k, 200)
            path = base / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            Image.new("RGB", (64, 64), color).save(path)
    Image.new("L", (64, 64), 77).save(base / "test" / "images" / "test_0.JPEG")
    val_labels = {"val_0.JPEG": "n03", "val_1.JPEG": "n02", "val_2.JPEG": "n01", "val_3.JPEG": "n03"}
    lines = []
    for k, (file_name, wnid) in enumerate(val_labels.items()):
        image = Image.new("L", (64, 64), 30 * k) if k == 0 else Image.new("RGB", (64, 64), (k, 0, 0))
        image.save(base / "val" / "images" / file_name)
        lines.append(f"{file_name}\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids, val_labels


def test_tiny_imagenet_archive_layout(tmp_path):
    wnids, val_labels = _make_tiny_imagenet(tmp_path)
    train = load_dataset("tiny-imagenet", tmp_path, "train")
    val = load_dataset("tiny-imagenet", tmp_path, "test")
    assert train.classes == wnids and val.classes == wnids
    assert train.x.shape == (6, 3, 64, 64) and train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert val.x.shape == (4, 3, 64, 64)
    assert val.y.tolist() == [wnids.index(w) for w in val_labels.values()]
    gray = val.x[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_tiny_imagenet_image_folder_layout(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            (tmp_path / split / wnid).mkdir(parents=True)
            Image.new("RGB", (64, 64)).save(tmp_path / split / wnid / "a.JPEG")
    val = load_dataset("tiny-imagenet", tmp_path, "test")
    assert val.classes == ["n01", "n02"] and val.y.tolist() == [0, 1]


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("tiny-imagenet", tmp_path / "nothing")
    message = str(info.value)
    assert str(tmp_path / "nothing") in message and "--data-dir" in message
    assert "tiny-imagenet-200.zip" in message


@pytest.mark.parametrize("download", [True, False])
def test_cifar_missing(tmp_path, download):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar100", tmp_path, download=download)
    message = str(info.value)
    assert str(tmp_path) in message and "--data-dir" in message and "cifar-100-python" in message
    assert ("download failed" in message) == download


def test_unknown_names():
    with pytest.raises(DatasetError, match="cifar10, cifar100, tiny-imagenet, synthetic"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="train, test"):
        load_dataset("synthetic", split="val")
    assert D.num_classes("cifar100") == 100 and D.image_size("tiny-imagenet") == 64
    assert D.image_size("cifar10") == 32 and D.default_augment("cifar10")
    assert not D.default_augment("tiny-imagenet")


def test_synthetic():
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    c = load_dataset("synthetic", seed=4)
    test = load_dataset("synthetic", split="test", seed=3)
    assert a.x.shape == (2000, 3, 32, 32) and len(test) == 500
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert torch.bincount(a.y, minlength=10).tolist() == [200] * 10
    small = load_dataset("synthetic", synthetic_size=25, synthetic_image_size=64)
    assert small.x.shape == (25, 3, 64, 64)
    assert sorted(torch.bincount(small.y).tolist()) == [2] * 5 + [3] * 5
    # Same class patterns across splits: class means of train and test agree closely.
    train_means = torch.stack([a.float()[a.y == k].mean(0) for k in range(10)])
    test_means = torch.stack([test.float()[test.y == k].mean(0) for k in range(10)])
    distances = torch.cdist(test_means.flatten(1), train_means.flatten(1))
    assert torch.equal(distances.argmin(1), torch.arange(10))


def _toy(n=23, size=8):
    """A small TensorPair whose pixel values encode the example index."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return TensorPair(x, torch.arange(n), [str(i) for i in range(n)])


def test_tensor_pair_helpers():
    data = _toy()
    assert data.float().dtype == torch.float32 and data.float().max() <= 1
    assert torch.equal(data.subset([3, 1]).y, torch.tensor([3, 1]))
    train, hold = split_holdout(data, 5, seed=1)
    assert len(hold) == 5 and len(train) == 18
    assert sorted(train.y.tolist() + hold.y.tolist()) == list(range(23))
    assert torch.equal(split_holdout(data, 5, seed=1)[1].y, hold.y)
    assert not torch.equal(split_holdout(data, 5, seed=2)[1].y, hold.y)
    sub = fixed_subset(data, 7, seed=0)
    assert len(sub) == 7 and torch.equal(fixed_subset(data, 3, seed=0).y, sub.y[:3])
    assert fixed_subset(data, None) is data and fixed_subset(data, 99) is data


def test_crop_flip_matches_manual_crop():
    x = _toy(n=2).x
    top, left, flip = torch.tensor([0, 6]), torch.tensor([3, 8]), torch.tensor([False, True])
    out = crop_flip(x, top, left, flip, padding=4)
    padded = F.pad(x, (4, 4, 4, 4))
    assert torch.equal(out[0], padded[0, :, 0:8, 3:11])
    assert torch.equal(out[1], padded[1, :, 6:14, 8:16].flip(-1))


def _is_crop_of(image, original, padding=4):
    """Whether ``image`` is a (possibly mirrored) crop of the zero-padded ``original``."""
    padded = F.pad(original, (padding,) * 4)
    size = original.shape[-1]
    return any(torch.equal(image, candidate[:, i:i + size, j:j + size])
               for candidate in (padded, padded.flip(-1))
               for i in range(2 * padding + 1) for j in range(2 * padding + 1))


def test_loader_augmentation():
    data = _toy(n=10)
    loader = BatchLoader(data, 4, shuffle=False, augment=True, seed=0)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2] and len(loader) == 3
    x = torch.cat([b for b, _ in batches])
    assert x.shape == (10, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    as_bytes = (x * 255).round().to(torch.uint8)
    assert all(_is_crop_of(as_bytes[i], data.x[i]) for i in range(10))
    assert not torch.equal(as_bytes, data.x)


def test_loader_order_is_reproducible_and_complete():
    data = _toy()
    loader = BatchLoader(data, 5, shuffle=True, augment=True, seed=7, drop_last=False)
    first = [torch.cat([y for _, y in loader]) for _ in range(2)]  # epochs 0 and 1
    assert sorted(first[0].tolist()) == list(range(23))
    assert not torch.equal(first[0], first[1])
    loader.set_epoch(1)
    xs, ys = zip(*loader)
    assert torch.equal(torch.cat(ys), first[1])
    fresh = BatchLoader(data, 5, shuffle=True, augment=True, seed=7)
    fresh.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(fresh, zip(xs, ys)))
    assert len(BatchLoader(data, 5, shuffle=True, augment=False, drop_last=True)) == 4


@pytest.mark.parametrize("n", [24, 23])
def test_loader_shards(n):
    data = _toy(n=n)
    world = 3
    shards = []
    for rank in range(world):
        loader = BatchLoader(data, 4, shuffle=True, augment=False, seed=5,
                             rank=rank, world_size=world)
        loader.set_epoch(2)
        shards.append(torch.cat([y for _, y in loader]).tolist())
        assert len(loader) == 2
    assert {len(s) for s in shards} == {8}
    seen = sum(shards, [])
    assert set(seen) == set(range(n))
    assert len(seen) - n == 24 - n  # only the wrap-around padding repeats examples
    single = BatchLoader(data, 12, shuffle=True, augment=False, seed=5)
    order = single.indices(2)
    for rank in range(world):  # rank r holds global positions r, r+world, ...
        assert shards[rank] == torch.cat([order, order[:24 - n]])[rank::world].tolist()


# ----------------------------------------------------------------------------- synthetic data a smoke run can learn

def test_synthetic_classes_are_learnable_and_an_eps_8_attack_breaks_some_not_all():
    """Template matching on the class patterns (the linear classifier the data are built for): clean
    accuracy far above chance, and the exact L∞ margin of each example says an attack of ε = 8/255
    breaks part of the correctly classified images but leaves others (clipping to [0, 1] aside)."""
    test = D.make_synthetic("test", 500, 16, seed=0)
    x = test.float().flatten(1) - 0.5
    patterns = D._synthetic_patterns(0, 10, 16).flatten(1)
    scores = x @ patterns.T
    correct = scores.argmax(1) == test.y
    assert correct.float().mean() > 0.6  # chance: 0.1
    margin = scores.gather(1, test.y[:, None]) - scores                               # s_y - s_c
    budget = (8 / 255) * (patterns[test.y][:, None, :] - patterns[None]).abs().sum(2)  # ε ||p_y - p_c||_1
    robust = correct & ((margin > budget) | (torch.arange(10)[None] == test.y[:, None])).all(1)
    share = robust.sum() / correct.sum()
    assert 0.05 < share < 0.95, share


@pytest.mark.slow
def test_a_smoke_resnet_learns_and_attacks_break_some_but_not_all(tmp_path):
    """The documented smoke run (train_CIFAR10_ResNet.py --smoke) learns the synthetic classes in its
    two epochs, and PGD at ε = 8/255 breaks some of the smoke test images, not all."""
    import json

    import test_white_attack
    from train_CIFAR10_ResNet import DEFAULTS
    from utils.training.cli import main as train_main
    assert train_main(DEFAULTS, ["--smoke", "--quiet", "--out-dir", str(tmp_path), "--run-name", "r"]) == 0
    out = tmp_path / "eval"
    assert test_white_attack.main(["--ckpt", str(tmp_path / "r" / "best.pt"), "--attacks", "fgsm,pgd40", "--n-examples",
                                   "64", "--indicators", "0", "--quiet", "--device", "cpu", "--out-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    clean = sum(results["clean"]["correct"])
    pgd = next(a for a in results["attacks"] if a["name"] == "pgd40")["robust_count"]
    assert clean >= 0.35 * 64  # chance: 6.4 of 64
    assert 0 < pgd < clean  # the attack breaks some, not all
