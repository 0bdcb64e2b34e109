"""Pre-activation WideResNet in the TRADES layout (parameter names match TRADES/RobustBench)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .reverse_attention import ReverseAttentionMixin, separate_norms


class BasicBlock(nn.Module):
    """TRADES WRN block; when the width changes the shortcut sees the pre-activated input."""

    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A stage of ``n`` blocks, stored as ``.layer`` like TRADES."""

    def __init__(self, n, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x):
        return self.layer(x)


class WideResNet(ReverseAttentionMixin, nn.Module):
    """WRN-depth-widen; RA (when on) acts on the last two blocks of ``block3``.

    ``separate_bn`` (RA only, off by default): the first RA block gets its own BatchNorm
    (``ra_bn.0``) instead of sharing the final ``bn1``, which stays for the last block (the end
    of the network)."""

    pool_grid = 1
    unused_state_prefixes = ("sub_block1.",)  # may be absent from foreign state dicts

    def __init__(self, depth=34, widen_factor=10, num_classes=10, reverse_attention=True, drop_rate=0.0,
                 separate_bn=False):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 16:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 2 (e.g. 28, 34); got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.reverse_attention = reverse_attention
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.sub_block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)  # unused, as in TRADES
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.separate_bn = bool(separate_bn)
        self.ra_bn = separate_norms(widths[3], separate_bn, reverse_attention)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    @property
    def classifier(self):
        return self.fc

    @property
    def ra_blocks(self):
        return list(self.block3.layer)[-2:]

    def forward_trunk(self, x):
        out = self.block2(self.block1(self.conv1(x)))
        for block in list(self.block3.layer)[:-2]:
            out = block(out)
        return out

    def block_output(self, h, index=None):
        return F.relu(self.ra_norm(index, self.bn1)(h))

    def pool(self, z):
        return torch.flatten(F.adaptive_avg_pool2d(z, 1), 1)
