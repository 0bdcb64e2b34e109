"""Input normalisation inside the model, as many published checkpoints expect:
``Normalized(model, mean, std)`` maps [0, 1] images x to ``model((x - mean) / std)``."""
import argparse
import math

import torch
from torch import nn

PRESETS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NORMALIZATION_HELP = ("none, cifar10, cifar100, imagenet, or explicit per-channel MEAN/STD "
                      "such as 0.5,0.5,0.5/0.25,0.25,0.25")


class NormalizationError(ValueError, argparse.ArgumentTypeError):
    """A normalisation text that cannot be parsed (argparse prints its message as is)."""


class Normalized(nn.Module):
    """``x -> module((x - mean) / std, *args, **kwargs)``; extra arguments (labels,
    ``return_aux``, ``return_features``) pass through, so RA models keep their API.

    The wrapped model is ``.module`` so :func:`models.unwrap` and ``ra_policy`` reach it; mean
    and std are non-persistent buffers, so the state dict is the wrapped model's (``module.``-prefixed).
    """

    def __init__(self, module, mean, std):
        super().__init__()
        mean, std = check_normalization(mean, std)
        self.module = module
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x, *args, **kwargs):
        return self.module((x - self.mean) / self.std, *args, **kwargs)

    @property
    def normalization(self):
        """``{"mean": [...], "std": [...]}``, as load_model records it in the model config."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


def check_normalization(mean, std):
    """``(mean, std)`` as tuples of floats of one length (1 or 3); std entries must be positive."""
    mean, std = _floats(mean), _floats(std)
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise NormalizationError(f"normalization needs 1 or 3 means and as many stds; "
                                 f"got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise NormalizationError(f"normalization std must be positive and every value finite; "
                                 f"got mean {mean}, std {std}")
    return mean, std


def _floats(values):
    """A tuple of floats from a tensor, a number or a sequence of numbers (anything else is refused)."""
    try:
        if isinstance(values, torch.Tensor):
            return tuple(float(v) for v in values.detach().flatten().tolist())
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            return (float(values),)
        if isinstance(values, (str, bytes, dict)):
            raise TypeError
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise NormalizationError(f"normalization mean and std must be numbers; got {values!r}") from None


def parse_normalization(text):
    """``None`` for "none"/"off", a preset's ``(mean, std)``, or explicit "m1,m2,m3/s1,s2,s3"."""
    key = str(text).strip().lower()
    if key in ("", "none", "off"):
        return None
    if key in PRESETS:
        return PRESETS[key]
    parts = key.split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = ([float(v) for v in part.split(",")] for part in parts)
    except ValueError:
        raise NormalizationError(f"cannot read normalization {text!r}; give {NORMALIZATION_HELP}") from None
    return check_normalization(mean, std)
