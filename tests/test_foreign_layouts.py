"""Foreign state dicts through ``load_model``: each layout is rebuilt here from its own parameter
names and forward (TRADES / RobustBench WideResNet, TRADES/MART ResNet-18 with ``linear``,
RobustBench PreActResNet-18, normalisation inside the model), saved, loaded, and must give the
same logits as the reference module."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    CheckpointError,
    Normalized,
    create_model,
    has_reverse_attention,
    load_model,
    parse_normalization,
    ra_policy,
)

CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def randomize_batchnorms(model, seed=1):
    """Non-trivial eval-mode BatchNorms (random affine and running statistics), so a BN that is
    skipped, shared or misplaced changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def same_logits(a, b):
    scale = b.abs().max().item()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def saved(tmp_path, module, name="ref.pt", wrap=None):
    """Save a state dict the way the foreign code does (optionally inside a dict under ``wrap``)."""
    path = tmp_path / name
    state = module.state_dict()
    torch.save({wrap: state} if wrap else state, path)
    return str(path)


# ---------------------------------------------------------------- TRADES / RobustBench WideResNet

class TradesWideBlock(nn.Module):
    """TRADES's WRN block: with a width change the input is replaced by relu(bn1 x) for both paths."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equalInOut = cin == cout
        self.convShortcut = None if self.equalInOut else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
        else:
            x = self.relu1(self.bn1(x))
            out = x
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equalInOut else self.convShortcut(x)) + out


class TradesStage(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TradesWideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    """TRADES / Carmon / RobustBench WideResNet; ``sub_block1`` is built but never used."""

    def __init__(self, depth, widen, num_classes=10, sub_block1=True):
        super().__init__()
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = TradesStage(n, w[0], w[1], 1)
        if sub_block1:
            self.sub_block1 = TradesStage(n, w[0], w[1], 1)
        self.block2 = TradesStage(n, w[1], w[2], 2)
        self.block3 = TradesStage(n, w[2], w[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU()
        self.fc = nn.Linear(w[3], num_classes)
        self.channels = w[3]

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.view(-1, self.channels))


@pytest.mark.parametrize("depth,widen", [(16, 2), (34, 10)])
def test_trades_wrn_loads_as_plain_only_when_asked(tmp_path, depth, widen):
    torch.manual_seed(0)
    reference = randomize_batchnorms(TradesWideResNet(depth, widen))
    path = saved(tmp_path, reference)
    with pytest.raises(CheckpointError, match="--reverse-attention on .*--reverse-attention off"):
        load_model(path)  # RA or plain cannot be read from the weights
    model, config = load_model(path, reverse_attention=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
    assert (config["arch"], config["reverse_attention"], config["source"]) == (f"wrn-{depth}-{widen}", False,
                                                                                "parameter names")
    assert config["adaptations"] == []


def test_wrn_saved_without_sub_block1_loads_and_nothing_else_may_be_missing(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorms(TradesWideResNet(16, 2, num_classes=100, sub_block1=False))
    path = saved(tmp_path, reference, wrap="state_dict")
    model, config = load_model(path, reverse_attention=False)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
    assert config["num_classes"] == 100 and config["adaptations"] == ["unused sub_block1 absent"]

    state = reference.state_dict()
    del state["block2.layer.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r": 1 keys missing \(e\.g\. block2\.layer\.0\.conv1\.weight\)$"):
        load_model(state, reverse_attention=False)
    partial = dict(TradesWideResNet(16, 2, num_classes=100).state_dict())
    del partial["sub_block1.layer.1.conv2.weight"]  # sub_block1 present but incomplete: refused
    with pytest.raises(CheckpointError, match=r"1 keys missing \(e\.g\. sub_block1\.layer\.1\.conv2\.weight\)"):
        load_model(partial, reverse_attention=False)


# ---------------------------------------------------------------- ResNet-18 with `linear`

class LinearBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def _stages(block, widths=(64, 128, 256, 512)):
    """Four stages of two blocks each, as ResNet-18 / PreActResNet-18 lay them out."""
    stages, cin = [], 64
    for i, width in enumerate(widths):
        stages.append(nn.Sequential(block(cin, width, 1 if i == 0 else 2), block(width, width, 1)))
        cin = width
    return stages


class LinearResNet18(nn.Module):
    """ResNet-18 of the TRADES / RobustBench / MART / AWP code: classifier called ``linear``."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(LinearBasicBlock)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).view(x.shape[0], -1))


def test_resnet18_with_linear_classifier_is_renamed_to_fc(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorms(LinearResNet18(10))
    path = saved(tmp_path, reference, wrap="net")
    model, config = load_model(path, reverse_attention=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
    assert config["arch"] == "resnet18" and config["adaptations"] == ["classifier 'linear' renamed to 'fc'"]
    assert "fc.weight" in model.state_dict() and torch.equal(model.fc.bias, reference.linear.bias)


# ---------------------------------------------------------------- PreActResNet-18 layouts

class RobustBenchPreActBlock(nn.Module):
    """RobustBench PreActBlock (``v2=False``: the projection shortcut sees the raw input x) or
    PreActBlockV2 (``v2=True``: it sees relu(bn1 x))."""

    def __init__(self, cin, cout, stride, v2=False):
        super().__init__()
        self.v2 = v2
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(out if self.v2 else x)
        else:
            shortcut = x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class RobustBenchPreActResNet18(nn.Module):
    """RobustBench PreActResNet-18; ``bn_before_fc`` with V2 blocks is Rice2020's layout; ``mu``/``sigma``
    buffers are Wong2020Fast's normalisation inside the model."""

    def __init__(self, num_classes=10, v2=False, bn_before_fc=False, normalize=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(
            lambda cin, cout, stride: RobustBenchPreActBlock(cin, cout, stride, v2))
        self.bn_before_fc = bn_before_fc
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)
        if normalize:
            self.register_buffer("mu", torch.tensor(CIFAR10[0]).view(1, 3, 1, 1))
            self.register_buffer("sigma", torch.tensor(CIFAR10[1]).view(1, 3, 1, 1))

    def forward(self, x):
        if hasattr(self, "mu"):
            x = (x - self.mu) / self.sigma
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        return self.linear(F.avg_pool2d(out, 4).view(x.shape[0], -1))


def test_robustbench_preact_resnet18_is_its_own_plain_architecture(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorms(RobustBenchPreActResNet18(10))
    path = saved(tmp_path, reference)
    model, config = load_model(path)  # plain only: nothing to guess
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
        v2 = RobustBenchPreActResNet18(10, v2=True).eval()
        v2.load_state_dict(reference.state_dict())
        assert not same_logits(v2(x), reference(x))  # the shortcut input matters: a different network
    assert (config["arch"], config["reverse_attention"], config["image_size"]) == ("preact-resnet18-rb", False, 32)
    with pytest.raises(CheckpointError, match="cannot build an RA preact-resnet18-rb .*plain only"):
        load_model(path, reverse_attention=True)


def test_rice2020_preact_layout_is_our_preact_resnet18_on_32px(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorms(RobustBenchPreActResNet18(10, v2=True, bn_before_fc=True))
    model, config = load_model(saved(tmp_path, reference), reverse_attention=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
    assert (config["arch"], config["image_size"]) == ("preact-resnet18", 32)


# ---------------------------------------------------------------- normalisation inside the model

def test_wong2020fast_mu_sigma_buffers_become_a_normalized_wrapper(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorms(RobustBenchPreActResNet18(10, normalize=True))
    path = saved(tmp_path, reference)
    model, config = load_model(path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert same_logits(model.eval()(x), reference(x))
    assert isinstance(model, Normalized) and config["normalization"]["mean"] == pytest.approx(CIFAR10[0])
    assert "input normalization taken from the mu/sigma buffers" in config["adaptations"]
    assert load_model(path, normalization="cifar10")[1]["normalization"] == config["normalization"]
    with pytest.raises(CheckpointError, match="carries its own input normalization"):
        load_model(path, normalization="imagenet")


def test_load_model_normalization_argument_wraps_and_is_recorded(tmp_path):
    torch.manual_seed(0)
    inner = randomize_batchnorms(LinearResNet18(10))
    path = saved(tmp_path, inner)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model, config = load_model(path, reverse_attention=False, normalization=(mean, std))
    x = torch.rand(2, 3, 32, 32)
    by_hand = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert same_logits(model.eval()(x), inner(by_hand))
    assert config["normalization"] == {"mean": pytest.approx(list(mean)), "std": pytest.approx(list(std))}
    assert load_model(path, reverse_attention=False)[1]["normalization"] is None


def test_normalized_keeps_the_ra_api(tiny_model):
    model = tiny_model("wrn-16-1", 10)
    wrapped = Normalized(model, *CIFAR10)
    x = torch.rand(3, 3, 16, 16)
    inner_x = (x - torch.tensor(CIFAR10[0]).view(1, 3, 1, 1)) / torch.tensor(CIFAR10[1]).view(1, 3, 1, 1)
    y = torch.tensor([1, 2, 3])
    with torch.no_grad():
        logits, aux, feats = wrapped(x, y, return_aux=True, return_features=True)
        want_logits, want_aux, want_feats = model(inner_x, y, return_aux=True, return_features=True)
        with ra_policy(wrapped, "identity"):
            identity = wrapped(x)
        with ra_policy(model, "identity"):
            want_identity = model(inner_x)
    assert torch.equal(logits, want_logits) and torch.equal(feats, want_feats)
    assert all(torch.equal(a, b) for a, b in zip(aux, want_aux)) and len(aux) == 2
    assert torch.equal(identity, want_identity) and not torch.equal(identity, wrapped(x))
    assert has_reverse_attention(wrapped) and not has_reverse_attention(Normalized(create_model("resnet18", 10, False),
                                                                                    *CIFAR10))
    assert list(wrapped.state_dict()) == ["module." + k for k in model.state_dict()]  # mean/std not persisted
    reloaded, config = load_model(wrapped.state_dict(), reverse_attention=True)  # the module. prefix is stripped
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(inner_x), model(inner_x))
    assert config["normalization"] is None  # the wrapper's mean/std are not in the state dict


def test_parse_normalization_presets_explicit_values_and_errors():
    assert parse_normalization("CIFAR10") == CIFAR10
    assert parse_normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert parse_normalization("cifar100")[1] == (0.2673, 0.2564, 0.2762)
    assert parse_normalization("none") is None
    assert parse_normalization("0.5,0.5,0.5/0.25,0.5,1") == ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert parse_normalization("0.5/0.2") == ((0.5,), (0.2,))
    for bad, why in [("cifar", "cannot read normalization"), ("0.5,0.5/0.2,0.2", "1 or 3 means"),
                     ("0.5,0.5,0.5/0.2,0,0.2", "std must be positive"), ("1,2,3/4,5", "as many stds"),
                     ("a,b,c/1,1,1", "cannot read")]:
        with pytest.raises(ValueError, match=why):
            parse_normalization(bad)
