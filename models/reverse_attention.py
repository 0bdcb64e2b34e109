"""Reverse attention (RA), written once for every backbone (docs/protocol.md §1).

An RA block's feature map ``z`` (N×Ch×H×W) is classified by the shared classifier to give
auxiliary logits ``p``; a class ``c`` is chosen per example (the label when given, else
``argmax p``); ``z`` is multiplied by the classifier row ``Ω[c]`` reshaped to the pooled grid
and nearest-upsampled to H×W.

Evaluation code can change how the class (and so the mask) is chosen with :func:`ra_policy`,
which is how the adaptive attacks see through the argmax gate without touching the models.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .wrappers import unwrap

RA_BLOCKS = 2  # RA acts on the last two residual blocks of the last stage
POLICIES = ("default", "fixed", "straight_through", "soft", "identity")


@dataclass
class MaskPolicy:
    """How RA blocks pick their mask.

    - ``default``: label-selected when labels are passed, argmax of the block's own head otherwise;
    - ``fixed``: every block uses ``Ω[classes]`` (one class per example), whatever its head says;
    - ``straight_through``: forward with the argmax mask, backward through ``softmax(p/τ)·Ω``;
    - ``soft``: forward and backward through ``softmax(p/τ)·Ω``;
    - ``identity``: RA removed (mask of ones), heads still computed.
    """

    kind: str = "default"
    classes: Optional[torch.Tensor] = None
    tau: float = 1.0

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"unknown RA policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if self.kind == "fixed" and self.classes is None:
            raise ValueError("the 'fixed' RA policy needs `classes` (one class index per example)")


class ReverseAttentionMixin:
    """Shared RA forward for backbones that provide the hooks below.

    A backbone implements ``forward_trunk(x)`` (everything before the RA blocks),
    ``ra_blocks`` (the last two residual blocks of the last stage), ``block_output(h)``
    (the map z that a block hands to RA: identity for ResNet, relu(bn_final(h)) for
    pre-activation nets), ``pool(z)`` (the network's own pooling, flattened) and
    ``classifier`` (the shared linear layer). A backbone with ``separate_bn`` BatchNorms
    (``ra_bn``) takes ``block_output(h, index)`` with the RA block's index.
    """

    reverse_attention: bool
    pool_grid: int  # side of the pooled grid fed to the classifier (1 for global pooling)

    def forward(self, x, y=None, return_aux=False, return_features=False):
        h = self.forward_trunk(x)
        aux = []
        for index, block in enumerate(self.ra_blocks):
            h = block(h)
            if self.reverse_attention:
                h, p = self._attend(self._ra_map(h, index), y)
                aux.append(p)
        if not self.reverse_attention:
            h = self.block_output(h)
        features = self.pool(h)
        logits = self.classifier(features)
        if not (return_aux or return_features):
            return logits
        out = (logits,)
        if return_aux:
            out += (aux,)
        if return_features:
            out += (features,)
        return out

    def _ra_map(self, h, index):
        """The map z of RA block ``index``."""
        if getattr(self, "ra_bn", None) is None:
            return self.block_output(h)
        return self.block_output(h, index)

    def ra_norm(self, index, final):
        """The BatchNorm giving RA block ``index`` its map: the network's ``final`` one (shared by
        both RA blocks, as in the reference) unless ``separate_bn`` gave this block its own."""
        own = getattr(self, "ra_bn", None)
        if own is not None and index is not None and index < len(own):
            return own[index]
        return final

    def _attend(self, z, y):
        """Return (z ⊙ mask, auxiliary logits) for one RA block."""
        p = self.classifier(self.pool(z))
        policy = getattr(self, "_ra_policy", None) or MaskPolicy()
        if policy.kind == "identity":
            return z, p
        weight = self.classifier.weight
        if policy.kind in ("soft", "straight_through"):
            soft = class_mask(weight, torch.softmax(p / policy.tau, dim=1), self.pool_grid, z.shape[-2:])
            if policy.kind == "soft":
                return z * soft, p
            hard = class_mask(weight, p.argmax(1), self.pool_grid, z.shape[-2:])
            return z * (hard + soft - soft.detach()), p
        if policy.kind == "fixed":
            classes = policy.classes.to(z.device)
        elif y is not None:
            classes = y
        else:
            classes = p.argmax(1)
        return z * class_mask(weight, classes, self.pool_grid, z.shape[-2:]), p


def separate_norms(channels, separate_bn, reverse_attention):
    """``ra_bn`` for ``separate_bn``: one BatchNorm for every RA block but the last, whose output
    is the end of the network and keeps the final BatchNorm; None when the option is off."""
    if not separate_bn:
        return None
    if not reverse_attention:
        raise ValueError("separate_bn needs reverse attention (a plain network has only its final BatchNorm)")
    return nn.ModuleList([nn.BatchNorm2d(channels) for _ in range(RA_BLOCKS - 1)])


def class_mask(weight, classes, grid, spatial_size):
    """Mask Ω[c] (or Σ_c w_c Ω[c] for a N×C weighting) shaped N×Ch×H×W.

    ``weight`` is the classifier's C×R matrix with R = Ch·grid·grid (flattened channel-major,
    as ``torch.flatten`` lays out a pooled Ch×grid×grid map); each grid cell is repeated
    (nearest upsampling) over the H×W map.
    """
    rows = weight[classes] if classes.dim() == 1 else classes @ weight
    mask = rows.view(rows.shape[0], -1, grid, grid)
    if grid == 1:
        return mask  # broadcast over space
    return F.interpolate(mask, size=tuple(spatial_size), mode="nearest")


@contextmanager
def ra_policy(model: nn.Module, kind: str = "default", classes=None, tau: float = 1.0):
    """Temporarily change how ``model``'s RA blocks choose their masks (for adaptive attacks)."""
    target = unwrap(model)
    if not getattr(target, "reverse_attention", False):
        raise ValueError("ra_policy needs a model with reverse attention; this one is plain")
    previous = getattr(target, "_ra_policy", None)
    target._ra_policy = MaskPolicy(kind, classes, tau)
    try:
        yield model
    finally:
        target._ra_policy = previous
