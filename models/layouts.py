"""Recognising foreign state dicts (no saved config) by their parameter names and shapes.

Each ``infer_*`` returns a :class:`Layout` or None. A layout may rename keys into ours
(``linear`` → ``fc`` for ResNet-18) and lists what it changed in ``notes``; the loader reports them.
"""
from typing import NamedTuple


class Layout(NamedTuple):
    """A recognised state dict: architecture, classes, input size, the state in our key names, notes."""

    arch: str
    num_classes: int
    image_size: int
    state: dict
    notes: tuple = ()


def _blocks(state, stage):
    """Indices of the residual blocks stored under ``stage`` (e.g. ``layer4`` or ``block3.layer``)."""
    prefix = stage + "."
    return {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}


def _resnet18_stages(state):
    return all(_blocks(state, f"layer{i}") == {"0", "1"} for i in range(1, 5))


def infer_wrn(state):
    """TRADES / RobustBench WideResNet (``block1.layer.i`` ... ``bn1``, ``fc``), with or without ``sub_block1``."""
    if "block1.layer.0.conv1.weight" not in state or "fc.weight" not in state or "bn1.weight" not in state:
        return None
    n = len(_blocks(state, "block1.layer"))
    widen = state["block1.layer.0.conv1.weight"].shape[0] // 16
    notes = () if any(k.startswith("sub_block1.") for k in state) else ("unused sub_block1 absent",)
    return Layout(f"wrn-{6 * n + 4}-{widen}", state["fc.weight"].shape[0], 32, state, notes)


def infer_resnet18(state):
    """ResNet-18 with the CIFAR stem; a classifier named ``linear`` (TRADES, RobustBench, MART/AWP) becomes ``fc``."""
    if "bn1.weight" not in state or "layer4.0.conv1.weight" not in state or not _resnet18_stages(state):
        return None
    if "fc.weight" in state:
        return Layout("resnet18", state["fc.weight"].shape[0], 32, state)
    if "linear.weight" not in state:
        return None
    renamed = {("fc." + k[len("linear."):] if k.startswith("linear.") else k): v for k, v in state.items()}
    return Layout("resnet18", state["linear.weight"].shape[0], 32, renamed, ("classifier 'linear' renamed to 'fc'",))


def _preact_grid(state):
    return round((state["linear.weight"].shape[1] // 512) ** 0.5)


def infer_preact(state):
    """Our PreAct ResNet-18: final ``bn`` + ReLU, shortcut from relu(bn1 x); ``linear`` sized by the pooled grid."""
    if "bn.weight" not in state or "linear.weight" not in state or "bn1.weight" in state:
        return None
    if not _resnet18_stages(state):
        return None
    grid = _preact_grid(state)
    return Layout("preact-resnet18", state["linear.weight"].shape[0], 32 * grid, state)


def infer_preact_rb(state):
    """RobustBench's PreActResNet-18 (Wong2020Fast, ...): no final BN, shortcut from the block input."""
    if "linear.weight" not in state or "bn.weight" in state or "bn1.weight" in state:
        return None
    if "layer1.0.bn1.weight" not in state or not _resnet18_stages(state):
        return None
    grid = _preact_grid(state)
    return Layout("preact-resnet18-rb", state["linear.weight"].shape[0], 32 * grid, state)
