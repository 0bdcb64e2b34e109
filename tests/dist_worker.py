"""Worker for tests/test_distributed.py, started by torchrun (2 processes) or plainly (1).

``sync OUT``: three TRADES-ANCRA steps under DDP; after each, rank 0 records the largest
difference of parameters and BatchNorm buffers between the ranks (all-gathered).
``parity OUT``: one TRADES-RA step on the same 32 examples, split over the processes, with
BatchNorm frozen in eval mode and a deterministic PGD start; rank 0 saves the updated weights.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from torch import nn

from models import create_model, unwrap
from utils import attacks, data, distributed
from utils.training import ancra
from utils.training.ancra import TrainStep
from utils.training.config import MethodConfig
from utils.training.schedule import Schedule, build_optimizer

BATCH = 32


def build(context, device, method_config):
    """The same seeded RA WRN-16-1 on every rank, wrapped as the training scripts wrap it."""
    torch.manual_seed(0)
    model = create_model("wrn-16-1", 10, reverse_attention=True).to(device)
    if context.enabled:
        def probe():
            logits, aux = model(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), return_aux=True)
            return sum(o.sum() for o in [logits, *aux])

        frozen = distributed.freeze_unused_parameters(model, probe)
        assert frozen and all(name.startswith("sub_block1.") for name in frozen), frozen  # TRADES layout
    model = distributed.wrap(context, model, device)
    optimizer = build_optimizer(model, Schedule(lr=0.1))
    distributed.share_buffers_each_step(context, unwrap(model), optimizer)
    return model, TrainStep(model, optimizer, method_config, num_classes=10)


def flat_parameters(model, buffers=False):
    tensors = list(unwrap(model).parameters()) + (list(unwrap(model).buffers()) if buffers else [])
    return torch.cat([t.detach().float().flatten() for t in tensors])


def check_sync(context, device, out):
    model, step = build(context, device, MethodConfig("trades", anc=True, attack_steps=2))
    pair = data.make_synthetic("train", BATCH * 3, 8, seed=0)
    loader = data.BatchLoader(pair, BATCH // context.world_size, shuffle=True, augment=True, seed=0,
                              rank=context.rank, world_size=context.world_size)
    torch.manual_seed(100 + context.rank)  # different attack noise per rank, as in training
    differences = []
    for x, y in loader:
        step(x, y, epoch=1)
        flat = flat_parameters(model, buffers=True)
        gathered = [torch.empty_like(flat) for _ in range(context.world_size)]
        dist.all_gather(gathered, flat)
        differences.append(max((g - gathered[0]).abs().max().item() for g in gathered))
    if context.is_main:
        torch.save({"differences": differences, "steps": len(differences)}, out)


def freeze_batchnorm(model):
    """BatchNorm stays in eval mode (running statistics) even when the step calls train()."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            module.train = lambda mode=True, m=module: m


def check_parity(context, device, out):
    ancra.random_start = lambda x, eps, init, **kw: attacks.random_start(x, eps, "none")  # PGD from x itself
    model, step = build(context, device, MethodConfig("trades", anc=False, attack_steps=2))
    freeze_batchnorm(model)
    pair = data.make_synthetic("train", BATCH, 8, seed=0)
    x, y = pair.float(), pair.y
    share = BATCH // context.world_size
    rows = slice(context.rank * share, (context.rank + 1) * share)
    metrics = step(x[rows], y[rows], epoch=1)
    if context.is_main:
        torch.save({"parameters": flat_parameters(model), "loss": metrics["loss"]}, out)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    context = distributed.from_env()
    device = distributed.init(context, "cpu") if context.enabled else torch.device("cpu")
    {"sync": check_sync, "parity": check_parity}[mode](context, device, out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
