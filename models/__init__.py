"""Model zoo: ``create_model`` builds any registered backbone plain or with reverse attention;
``load_model`` rebuilds one from a checkpoint (ours, or a foreign state dict it recognises)."""
from . import zoo  # noqa: F401  (registers the built-in architectures)
from .loading import (
    CheckpointError,
    checkpoint_model_config,
    load_model,
    read_checkpoint,
)
from .normalization import NORMALIZATION_HELP, NormalizationError, Normalized, parse_normalization
from .preact_resnet import PreActResNet
from .registry import (
    ArchInfo,
    arch_help,
    arch_info,
    arch_names,
    canonical_arch,
    create_model,
    register_arch,
    unregister_arch,
)
from .resnet import ResNet
from .reverse_attention import MaskPolicy, ra_policy
from .wideresnet import WideResNet
from .wrappers import has_reverse_attention, unwrap

ARCH_HELP = arch_help()  # the built-ins; call arch_help() to include architectures registered later

__all__ = [
    "ARCH_HELP",
    "NORMALIZATION_HELP",
    "ArchInfo",
    "CheckpointError",
    "MaskPolicy",
    "NormalizationError",
    "Normalized",
    "PreActResNet",
    "ResNet",
    "WideResNet",
    "arch_help",
    "arch_info",
    "arch_names",
    "canonical_arch",
    "checkpoint_model_config",
    "create_model",
    "has_reverse_attention",
    "load_model",
    "parse_normalization",
    "ra_policy",
    "read_checkpoint",
    "register_arch",
    "unregister_arch",
    "unwrap",
]
