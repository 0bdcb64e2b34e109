"""The architecture registry: built-in names and patterns, their defaults, help texts derived
from it, and a toy architecture registered here that builds and loads its own checkpoint
without any library edit."""
import pytest
import torch
from torch import nn

from models import (
    ArchInfo,
    CheckpointError,
    arch_help,
    arch_info,
    arch_names,
    canonical_arch,
    create_model,
    load_model,
    register_arch,
    unregister_arch,
)


class ToyNet(nn.Module):
    """A tiny plain network with a hidden width from its name (toy-H)."""

    def __init__(self, num_classes, hidden, image_size):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def build_toy(num_classes, reverse_attention, image_size, hidden, scale=None):
    model = ToyNet(num_classes, int(hidden), image_size)
    if scale is not None:
        with torch.no_grad():
            model.fc.weight.mul_(scale)
    return model


@pytest.fixture
def toy_arch():
    spec = register_arch("toy-H", build_toy, pattern=r"toy-(\d+)", weight_decay=1e-3, input_size=8,
                         supports_ra=False, options=("scale",), example="toy-16")
    yield spec
    unregister_arch("toy-H")


def test_builtin_defaults_come_from_the_registry():
    assert arch_info("resnet18") == ArchInfo("resnet18", 2e-4, 32, True)
    assert arch_info("WRN-34-10") == ArchInfo("wrn-34-10", 2e-4, 32, True)
    assert arch_info("preactresnet18") == ArchInfo("preact-resnet18", 5e-4, 64, True)
    assert arch_info("preact-resnet18-rb") == ArchInfo("preact-resnet18-rb", 5e-4, 32, False)
    assert canonical_arch("PreActResNet18") == "preact-resnet18"
    assert arch_names() == ["resnet18", "preact-resnet18", "preact-resnet18-rb", "wrn-D-K"]
    assert arch_help() == ("resnet18, preact-resnet18, preact-resnet18-rb (plain only) "
                           "or wrn-D-K (e.g. wrn-34-10, wrn-28-10)")
    assert create_model("preact-resnet18", 10).linear.in_features == 2048  # 64-px default input
    assert create_model("wrn-16-2", 10).fc.in_features == 128
    with pytest.raises(ValueError, match="unknown architecture 'wrn-34'; choose resnet18, .*wrn-D-K"):
        arch_info("wrn-34")


def test_arch_config_records_what_rebuilds_the_model():
    model = create_model("preactresnet18", 7, reverse_attention=False)
    assert model.arch_config == {"arch": "preact-resnet18", "num_classes": 7, "reverse_attention": False,
                                 "image_size": 64}
    assert create_model("wrn-16-1", 10, separate_bn=False).arch_config == {
        "arch": "wrn-16-1", "num_classes": 10, "reverse_attention": True, "image_size": 32}
    assert create_model("wrn-16-1", 10, separate_bn=True).arch_config["separate_bn"] is True


def test_options_and_plain_only_architectures_are_checked():
    with pytest.raises(ValueError, match="resnet18 takes no option 'separate_bn' \\(its options: none\\)"):
        create_model("resnet18", 10, separate_bn=True)
    with pytest.raises(ValueError, match="wrn-16-1 takes no option 'width'"):
        create_model("wrn-16-1", 10, width=3)
    with pytest.raises(ValueError, match="preact-resnet18-rb is plain only"):
        create_model("preact-resnet18-rb", 10)
    with pytest.raises(ValueError, match="already registered"):
        register_arch("resnet18", create_model, weight_decay=0, input_size=32)


def test_toy_architecture_registered_from_a_test_builds_and_loads_its_own_checkpoint(toy_arch, tmp_path):
    assert "toy-H (e.g. toy-16) (plain only)" in arch_help()
    assert arch_info("toy-16") == ArchInfo("toy-16", 1e-3, 8, False)
    torch.manual_seed(0)
    model = create_model("toy-16", 3, reverse_attention=False, scale=2.0)
    assert model.body[1].out_features == 16 and model.arch_config["scale"] == 2.0
    path = tmp_path / "toy.pt"
    torch.save({"model": model.state_dict(), "model_config": model.arch_config}, path)
    loaded, config = load_model(str(path))
    x = torch.rand(4, 3, 8, 8)
    assert isinstance(loaded, ToyNet) and torch.equal(loaded(x), model(x))
    assert config["arch"] == "toy-16" and config["scale"] == 2.0 and config["source"] == "checkpoint config"
    bare, config = load_model(model.state_dict(), arch="toy-16", num_classes=3)  # no layout inference: as stated
    assert torch.equal(bare(x), model(x)) and config["reverse_attention"] is False  # plain only: nothing to guess
    assert config["adaptations"] == ["layout given by arch/num_classes"]
    unregister_arch("toy-H")
    with pytest.raises(CheckpointError, match="unknown architecture 'toy-16'"):
        load_model(str(path))
    register_arch("toy-H", build_toy, pattern=r"toy-(\d+)", weight_decay=1e-3, input_size=8, supports_ra=False,
                  options=("scale",))
