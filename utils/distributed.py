"""Several processes under ``torchrun``: process group, DDP wrapping and the few collectives
the trainer needs. A run without torchrun (no ``WORLD_SIZE`` > 1 in the environment) never
touches ``torch.distributed`` and every helper here is then a no-op.
"""
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


class DistributedError(ValueError):
    """A distributed launch that cannot work as asked; the message says what to change."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the world size and its local rank on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


SINGLE = Context()


def from_env():
    """The context torchrun describes in ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (single otherwise)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise DistributedError(f"malformed torchrun environment ({err}); launch with torchrun or plain python") from None
    return Context(rank, world_size, local_rank) if world_size > 1 else SINGLE


def init(context, device_name="auto"):
    """Join the process group (nccl on GPUs, gloo on CPU) and return this rank's device.

    ``device_name`` is the script's ``--device``: ``cpu`` forces gloo, ``cuda`` needs one GPU per
    local rank.
    """
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= context.local_rank:
            raise DistributedError(f"local rank {context.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                                   f"start at most that many processes per node or use --device cpu")
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=context.rank, world_size=context.world_size)
    return device


def shutdown(wait=True):
    """Leave the process group if this process joined one. ``wait``: first meet the other ranks,
    so none tears its connections down while another still uses them (gloo aborts then); pass
    False after an error, when another rank may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(context):
    if context.enabled:
        dist.barrier()


def all_reduce_sum(context, tensor):
    """Sum ``tensor`` over ranks (in place, returned)."""
    if context.enabled:
        dist.all_reduce(tensor)
    return tensor


def average_buffers(context, model):
    """Average floating buffers (BatchNorm running statistics) over ranks in one all-reduce.
    Means average exactly; a variance average leaves out the spread between the shard means."""
    if not context.enabled:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().flatten() for b in buffers])
    dist.all_reduce(flat)
    flat.div_(context.world_size)
    for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
        buffer.copy_(value.view_as(buffer))


def share_buffers_each_step(context, model, optimizer):
    """After every optimizer step, average the BatchNorm running statistics over the ranks, so
    every rank attacks (eval mode) and evaluates the same model as rank 0 checkpoints. Not
    needed with SyncBatchNorm, whose statistics are already global."""
    if context.enabled:
        optimizer.register_step_post_hook(lambda *_: average_buffers(context, model))


def freeze_unused_parameters(model, probe):
    """Set ``requires_grad=False`` on parameters no output depends on (WRN's unused
    ``sub_block1``), so DDP needs no per-step search for them. ``probe()`` runs a forward and
    returns a scalar; returns the frozen names."""
    was_training = model.training
    model.eval()  # running statistics stay untouched
    with torch.enable_grad():
        probe().backward()
    model.train(was_training)
    frozen = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
        p.grad = None
    return frozen


def check_sync_bn(context, device):
    """SyncBatchNorm needs several processes on GPUs; say so before anything is written."""
    if not context.enabled:
        raise DistributedError("--sync-bn needs a multi-process launch (torchrun --nproc_per_node=N ...)")
    if device.type != "cuda":
        raise DistributedError("--sync-bn needs GPUs (SyncBatchNorm does not run on the CPU); drop --sync-bn "
                               "or train with --device cuda")


def wrap(context, model, device, *, sync_bn=False):
    """DistributedDataParallel around ``model`` (SyncBatchNorm first when ``sync_bn``).

    Buffers are not broadcast at every forward (three forwards per step would mean three
    broadcasts); the trainer averages them once per epoch instead.
    """
    if sync_bn:
        check_sync_bn(context, device)
    if not context.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})  # renamed in newer torch
    return ddp(model, device_ids=device_ids, **no_buffer_sync)


def run_on_main(context, fn):
    """``fn()`` on rank 0 only (its result there, None elsewhere); an exception it raises is
    raised on every rank, so no rank is left waiting for the others."""
    if not context.enabled:
        return fn()
    outcome = [None]
    result = None
    if context.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            outcome[0] = err
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise outcome[0]
    return result


def epoch_seed(seed, rank, epoch):
    """The RNG seed of ``rank`` in ``epoch``: distinct attack noise per rank, reproducible on resume."""
    return ((seed * 1_000_003 + rank) * 10_007 + epoch) % (2 ** 63)


class StopPoll:
    """Agree on Ctrl-C / SIGTERM across ranks without stalling the GPU: each batch starts a
    non-blocking all-reduce of this rank's flag on a CPU (gloo) channel and reads the previous
    batch's result, so every rank stops after the same batch, one batch after the request."""

    def __init__(self, context):
        self.context = context
        self.group = None
        self.pending = None
        self.flag = torch.zeros(1)

    def __call__(self, requested):
        """True once some rank has requested a stop (the same answer, at the same batch, on every rank)."""
        if not self.context.enabled:
            return bool(requested)
        if self.group is None:
            self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        stop = False
        if self.pending is not None:
            self.pending.wait()
            stop = self.flag.item() > 0
        self.flag = torch.tensor([float(bool(requested))])
        self.pending = dist.all_reduce(self.flag, group=self.group, async_op=True)
        return stop

    def finish(self):
        """Wait for the last poll (before the process group goes away)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
