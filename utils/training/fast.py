"""The speed options around the training step (docs/training.md, "Speed" and "Compiled step").

:class:`FastStep` runs a :class:`~utils.training.ancra.TrainStep` as a
:class:`~utils.training.config.SpeedConfig` says, without changing what it computes: NHWC
(channels-last) inputs, bf16 autocast around the step's two pure functions (the examples: random
starts from pre-drawn noise, the negative choice, every PGD iteration of both attacks; and the
training loss), the joint 2B attack batch, and with ``compile`` those two functions through
``torch.compile`` (:class:`FastPath`): on CUDA with ``mode="reduce-overhead"`` (CUDA graphs: the
whole attack, input gradients included through ``torch.func.grad``, replays as one graph),
elsewhere in the default mode. The backward of the training loss runs the compiled backward
graph; the optimizer, AWP's weight arithmetic and EMA stay eager.

Shapes are static: the first batch fixes the compiled batch size and a batch of any other size
(the last, partial batch of an epoch) runs the same functions eagerly, so no epoch compiles
again. A graph is compiled once per variant: the epoch a non-random negative rule ends its
warm-up, and the epoch AWP starts, each add one.
"""
import time

import torch
from torch._dynamo.utils import counters as dynamo_counters

from utils.training.config import PLAIN_SPEED


def compile_mode(device):
    """``reduce-overhead`` (CUDA graphs) on CUDA, the default mode elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def graphs_compiled():
    """How many graphs dynamo has compiled in this process (its own statistics counter)."""
    return dynamo_counters["stats"]["unique_graphs"]


class FastPath:
    """Compiles the step's functions on first use and times the calls that compiled something.

    ``backend`` is torch.compile's backend (``inductor``; tests use ``aot_eager``).
    """

    def __init__(self, backend="inductor"):
        self.backend = backend
        self.batch_size = None
        self.functions = {}
        self.pending_seconds = 0.0

    def takes(self, x):
        """Whether batch ``x`` runs compiled: the first batch's size is the compiled one. Starts a
        new CUDA-graph step (the previous step's graph outputs may then be overwritten)."""
        if self.batch_size is None:
            self.batch_size = x.shape[0]
        if x.shape[0] != self.batch_size:
            return False
        mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)  # torch >= 2.1
        if x.device.type == "cuda" and mark is not None:
            mark()
        return True

    def compiled(self, name, fn, device):
        """``torch.compile(fn)`` made once per ``name``."""
        if name not in self.functions:
            self.functions[name] = torch.compile(fn, dynamic=False, backend=self.backend, mode=compile_mode(device))
        return self.functions[name]

    def call(self, name, device, fn, *args, **kwargs):
        """``compiled fn(*args, **kwargs)`` on ``device``; a call that compiled a graph adds its wall
        time (compilation plus that one run, synchronised) to :meth:`take_seconds`."""
        device = torch.device(device)
        function = self.compiled(name, fn, device)
        before, started = graphs_compiled(), time.perf_counter()
        out = function(*args, **kwargs)
        if graphs_compiled() != before:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # once per compiled graph, never in a steady step
            self.pending_seconds += time.perf_counter() - started
        return out

    def take_seconds(self):
        """Compile seconds since the last call (0.0 when nothing compiled)."""
        seconds, self.pending_seconds = self.pending_seconds, 0.0
        return seconds


class FastStep:
    """``step`` as ``speed`` runs it; everything else (``model``, ``optimizer``, ``update``, ...)
    is the step's own. Wrapping replaces the step's :meth:`~utils.training.ancra.TrainStep.examples`
    and :meth:`~utils.training.ancra.TrainStep.loss` by the same functions under autocast (and,
    with ``speed.compile``, compiled) and sets its ``joint_attacks``."""

    def __init__(self, step, speed=PLAIN_SPEED):
        self.step, self.speed = step, speed
        self.path = FastPath(speed.compile_backend) if speed.compile else None
        self.compiled_now = False
        step.joint_attacks = speed.joint_attacks
        step.examples = self._around("examples", step.examples)
        step.loss = self._around("loss", step.loss)

    def __getattr__(self, name):  # only for names FastStep lacks: the step's own
        if name == "step":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.step, name)

    def _around(self, name, function):
        def run(*args):
            device = next(a.device for a in args if torch.is_tensor(a))
            with self.speed.autocast(device):
                if self.compiled_now:
                    return self.path.call(name, device, function, *args)
                return function(*args)
        return run

    def __call__(self, x, y, epoch):
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.compiled_now = self.path is not None and self.path.takes(x)
        return self.step(x, y, epoch)

    def take_compile_seconds(self):
        """Seconds spent in calls that compiled a graph since the last call (None without compile)."""
        return None if self.path is None else self.path.take_seconds()
