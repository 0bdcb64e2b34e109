"""What every attack receives besides the model and the batch: its seed, the batch's positions in
the evaluated set (so random starts are fixed per example, whatever batch or cascade stage the
example lands in) and whether it may run under bf16 autocast."""
import contextlib
from dataclasses import dataclass

import torch

NOISE_BLOCK = 16  # examples per seeded noise block


@dataclass
class AttackContext:
    """Seed, positions of the batch's rows in the evaluated set (CPU int64) and precision."""

    seed: int
    index: torch.Tensor
    bf16: bool = False

    def uniform(self, like, draw=0):
        """U[0, 1) noise shaped like ``like``; row r depends only on (seed, draw, index[r])."""
        rows = like.shape[1:]
        out = torch.empty(like.shape, device=like.device, dtype=torch.float32)
        blocks = self.index // NOISE_BLOCK
        for block in torch.unique(blocks).tolist():
            generator = torch.Generator(device=like.device)
            generator.manual_seed((self.seed * 1_000_003 + draw * 7_919 + block * 104_729) % (2 ** 62))
            noise = torch.rand((NOISE_BLOCK, *rows), generator=generator, device=like.device)
            here = (blocks == block).nonzero().flatten()
            out[here.to(like.device)] = noise[(self.index[here] % NOISE_BLOCK).to(like.device)]
        return out

    def precision(self, device):
        """bf16 autocast for the attack's own forward passes when allowed, else nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def full_precision(device):
    """Autocast off: every judgment of an example runs in fp32."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def batch_context(seed, n):
    """A context for one batch holding examples 0..n−1 (direct calls outside the runner)."""
    return AttackContext(seed, torch.arange(n))
