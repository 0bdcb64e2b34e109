"""Model zoo: ``create_model`` builds any backbone plain or with reverse attention."""
import re

from .preact_resnet import PreActResNet, preact_resnet18
from .resnet import ResNet, resnet18
from .reverse_attention import MaskPolicy, ra_policy
from .wideresnet import WideResNet

ARCH_HELP = "resnet18, preact-resnet18, or wrn-D-K (e.g. wrn-34-10, wrn-28-10)"
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")


def canonical_arch(arch):
    """The architecture's canonical name (lower case; ``preactresnet18`` → ``preact-resnet18``)."""
    arch = arch.lower()
    return "preact-resnet18" if arch == "preactresnet18" else arch


def create_model(arch, num_classes, reverse_attention=True, image_size=None):
    """Build ``arch`` with ``num_classes`` outputs; ``image_size`` only matters for preact-resnet18 (default 64)."""
    arch = canonical_arch(arch)
    if arch == "resnet18":
        return resnet18(num_classes, reverse_attention)
    if arch == "preact-resnet18":
        return preact_resnet18(num_classes, reverse_attention, image_size or 64)
    match = _WRN.match(arch)
    if match:
        depth, widen = int(match.group(1)), int(match.group(2))
        return WideResNet(depth, widen, num_classes, reverse_attention)
    raise ValueError(f"unknown architecture {arch!r}; choose {ARCH_HELP}")


def unwrap(model):
    """The bare model inside DataParallel / DDP / ``torch.compile`` wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def has_reverse_attention(model):
    """True when ``model`` (possibly DDP/DataParallel/compile-wrapped) has RA heads."""
    return bool(getattr(unwrap(model), "reverse_attention", False))


from .loading import CheckpointError, load_model, model_config, read_checkpoint  # noqa: E402  (needs create_model)

__all__ = [
    "create_model", "canonical_arch", "has_reverse_attention", "unwrap", "ra_policy", "MaskPolicy",
    "ResNet", "WideResNet", "PreActResNet", "ARCH_HELP",
    "load_model", "read_checkpoint", "model_config", "CheckpointError",
]
