"""PreAct ResNet-18: ours for Tiny-ImageNet (64×64: 4×4 average pooling leaves a 2×2 grid for
``linear``; final BN+ReLU; shortcut from relu(bn1 x)) and RobustBench's variant (no final BN,
shortcut from the block input x), which is a different network with similar names."""
import torch
import torch.nn.functional as F
from torch import nn

from .reverse_attention import ReverseAttentionMixin, separate_norms


class PreActBlock(nn.Module):
    """out = conv2(relu(bn2(conv1(relu(bn1 x))))) + shortcut; a projection shortcut sees
    relu(bn1 x), or x itself with ``shortcut_from_input`` (RobustBench's PreActBlock)."""

    def __init__(self, in_planes, planes, stride=1, shortcut_from_input=False):
        super().__init__()
        self.shortcut_from_input = shortcut_from_input
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            shortcut = self.shortcut(x if self.shortcut_from_input else out)
        else:
            shortcut = x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(ReverseAttentionMixin, nn.Module):
    """PreAct ResNet; RA (when on) acts on both blocks of ``layer4`` with a grid-shaped mask.

    ``robustbench=True``: RobustBench's layout (plain only, no final ``bn``, shortcut from the
    block input). ``separate_bn`` (RA only): the first RA block gets its own BatchNorm
    (``ra_bn.0``) instead of sharing the final ``bn``, which stays for the end of the network."""

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes=200, reverse_attention=True, image_size=64,
                 separate_bn=False, robustbench=False):
        super().__init__()
        if image_size % 32 != 0:
            raise ValueError(f"PreActResNet needs an input side divisible by 32; got {image_size}")
        if robustbench and reverse_attention:
            raise ValueError("RobustBench's PreActResNet layout is plain only (it has no final BatchNorm for RA)")
        self.reverse_attention = reverse_attention
        self.robustbench = robustbench
        self.pool_grid = image_size // 32  # 4×4 pooling of the (image_size/8)-sided layer4 map
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        if not robustbench:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512 * self.pool_grid ** 2, num_classes)
        self.separate_bn = bool(separate_bn)
        self.ra_bn = separate_norms(512, separate_bn, reverse_attention)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(PreActBlock(self.in_planes, planes, s, shortcut_from_input=self.robustbench))
            self.in_planes = planes
        return nn.Sequential(*layers)

    @property
    def classifier(self):
        return self.linear

    @property
    def ra_blocks(self):
        return list(self.layer4)[-2:]

    def forward_trunk(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        for block in list(self.layer4)[:-2]:
            out = block(out)
        return out

    def block_output(self, h, index=None):
        if self.robustbench:
            return h
        return F.relu(self.ra_norm(index, self.bn)(h))

    def pool(self, z):
        return torch.flatten(F.avg_pool2d(z, 4), 1)

