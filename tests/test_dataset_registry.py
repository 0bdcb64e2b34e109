"""Datasets are a registry: a new dataset is one `register_dataset` entry, after which every script's
--dataset accepts it. A toy dataset registered here trains through the training command line."""
import json

import pytest
import torch

from train import DEFAULTS as TRAIN
from train_baselines import DEFAULTS as BASELINES
from utils import data
from utils.training import cli


def _toy_loader(root, split, download):
    """4 classes of 8×8 images whose mean brightness is the class (learnable, deterministic)."""
    count = 24 if split == "train" else 8
    y = torch.arange(count) % 4
    x = (40 + 50 * y).view(-1, 1, 1, 1).expand(count, 3, 8, 8).to(torch.uint8).clone()
    return data.TensorPair(x, y.long(), [f"level{c}" for c in range(4)])


@pytest.fixture
def toy_dataset():
    spec = data.register_dataset(data.DatasetSpec("toy4", 4, 8, False, _toy_loader, "test dataset"))
    yield spec
    data.unregister_dataset("toy4")


def test_builtin_datasets_are_registry_entries():
    assert dict(data.DATASETS) == {"cifar10": 10, "cifar100": 100, "tiny-imagenet": 200, "synthetic": 10}
    assert [data.image_size(n) for n in ("cifar10", "tiny-imagenet")] == [32, 64]
    assert data.default_augment("cifar100") and not data.default_augment("tiny-imagenet")
    with pytest.raises(data.DatasetError, match="valid names are: cifar10"):
        data.num_classes("imagenet")


def test_registering_twice_or_nonsense_is_refused(toy_dataset):
    with pytest.raises(ValueError, match="already registered"):
        data.register_dataset(toy_dataset)
    with pytest.raises(ValueError, match="num_classes"):
        data.register_dataset(data.DatasetSpec("one-class", 1, 8, False, _toy_loader))


def test_a_registered_dataset_is_known_everywhere(toy_dataset, tmp_path):
    assert data.DATASETS["toy4"] == 4 and data.image_size("toy4") == 8 and not data.default_augment("toy4")
    test = data.load_dataset("toy4", tmp_path, "test")
    assert test.x.shape == (8, 3, 8, 8) and test.y.tolist() == [0, 1, 2, 3] * 2
    assert "toy4" in cli.build_parser(BASELINES).format_help()


@pytest.mark.slow
def test_a_registered_dataset_trains_with_ancra_through_the_training_command(toy_dataset, tmp_path):
    code = cli.main(TRAIN, ["--dataset", "toy4", "--data-dir", str(tmp_path), "--arch", "resnet18",
                            "--method", "pgd-at-ancra", "--epochs", "1", "--milestones", "1", "--batch-size", "8",
                            "--eval-size", "8", "--attack-steps", "1", "--eval-steps", "1", "--device", "cpu",
                            "--out-dir", str(tmp_path / "runs"), "--run-name", "toy", "--quiet"])
    assert code == 0
    run = tmp_path / "runs" / "toy"
    args = json.loads((run / "args.json").read_text())
    assert (args["dataset"], args["method"], args["anc"], args["ra"]) == ("toy4", "pgd-at", True, True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1
    assert (run / "last.pt").is_file()
