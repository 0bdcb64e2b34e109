"""Shared small fixtures: seeded tiny models whose outputs really depend on the input."""
import pytest
import torch
import torch.nn as nn

from models import create_model

# CI machines have 2 cores shared with other jobs; torch's 2 intra-op threads then spin
# against each other (20-50x slowdowns measured), so the suite runs single-threaded.
torch.set_num_threads(1)


def build_model(arch="wrn-16-1", num_classes=10, reverse_attention=True, image_size=None, input_size=16, seed=0):
    """A seeded model in eval mode. BN running stats are the exact average of a few random
    batches and classifier entries have RMS R^(-1/4) (R = classifier inputs), so RA masks
    (rows of Ω) do not shrink the features to nothing and logits vary with the input at the O(1) scale."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes, reverse_attention, image_size)
    with torch.no_grad():
        weight = model.classifier.weight
        weight.mul_(weight.shape[1] ** -0.25 / weight.pow(2).mean().sqrt())
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the warm-up batches
        model.train()
        for _ in range(2):
            model(torch.rand(8, 3, input_size, input_size))
        for bn in norms:
            bn.momentum = 0.1
    return model.eval()


@pytest.fixture
def tiny_model():
    """Factory for small seeded models (default: RA wrn-16-1, 10 classes, for 16×16 inputs)."""
    return build_model
