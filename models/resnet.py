"""ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), plain or with reverse attention."""
import torch
import torch.nn.functional as F
from torch import nn

from .reverse_attention import ReverseAttentionMixin


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut x)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(ReverseAttentionMixin, nn.Module):
    """ResNet for 32×32 inputs; RA (when on) acts on both blocks of ``layer4``."""

    pool_grid = 1

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes=10, reverse_attention=True):
        super().__init__()
        self.reverse_attention = reverse_attention
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    @property
    def classifier(self):
        return self.fc

    @property
    def ra_blocks(self):
        return list(self.layer4)[-2:]

    def forward_trunk(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        for block in list(self.layer4)[:-2]:
            out = block(out)
        return out

    def block_output(self, h):
        return h

    def pool(self, z):
        return torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)

