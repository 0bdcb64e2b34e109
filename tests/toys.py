"""Plumbing shared by the tests' toy RA models: ``self.fc`` is the classifier, ``self.blocks``
are the RA blocks, and a block's output goes to RA unchanged. A subclass defines its trunk
(``forward_trunk``) and pooling (``pool``)."""
import torch.nn as nn

from models.reverse_attention import ReverseAttentionMixin


class ToyRA(ReverseAttentionMixin, nn.Module):
    """Base of the toy RA models in the adaptive and evaluation tests."""

    pool_grid = 1

    @property
    def classifier(self):
        return self.fc

    @property
    def ra_blocks(self):
        return list(self.blocks)

    def block_output(self, h):
        return h
