"""Time the real training step (utils.training.ancra.TrainStep) on synthetic data and compare it with
the bare model passes it has to do.

For every (arch, method, batch size) it prints a table row, and with ``--json`` one JSON object:
``images_per_s``, ``step_ms``, ``model_pass_ms`` (only the forward/backward passes the step
needs, timed in the same run), ``overhead`` = step / model passes, the counted GFLOP of one step,
achieved TFLOP/s and its fraction of a measured bf16 matmul peak. ``--epoch-estimate`` adds the
predicted CIFAR epoch (50,000 training images plus PGD-20 on 1,000 test images).

    python benchmarks/train_step.py --arch resnet18 --method trades-ancra --batch-size 32
    python benchmarks/train_step.py --device cuda --batch-size 128 --method trades-ancra pgd-at --epoch-estimate
"""
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from models import create_model
from utils import data
from utils.attacks import attack_mode
from utils.cli import OneLineArgumentParser, add_device_argument, resolve_device
from utils.training.ancra import TrainStep, method_names, parse_method_name
from utils.training.cli import SPEED_OPTIONS, add_options
from utils.training.config import TrainConfig
from utils.training.errors import ConfigError
from utils.training.fast import FastStep
from utils.training.monitor import monitor_accuracy
from utils.training.schedule import build_optimizer

CIFAR_TRAIN, EVAL_IMAGES = 50_000, 1_000


def parse_method(name):
    """``trades-ancra`` → (``trades``, anc, ra); plain names are the vanilla baselines."""
    try:
        return parse_method_name(name)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


class FlopCount(TorchDispatchMode):
    """Counts matmul/convolution FLOPs (forward and backward) with torch's own formulas.
    (torch's FlopCounterMode also tracks modules, which breaks ``autograd.grad`` on inputs.)"""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def device_name(device):
    """GPU name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Mean seconds of ``fn()`` over ``repeats`` calls, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def model_passes(step, x, y):
    """The step's forward/backward passes alone: the attack passes (eval mode, input gradient
    only) in the batch sizes the step uses, then the training forwards and one backward."""
    cfg, speed, model = step.config, step.speed, step.attack_model
    batch = x.shape[0]
    aux = cfg.ra and cfg.aux_weight > 0
    attacked = step.method.attacked
    sizes = ([2 * batch] if step.joins() else [batch] * (attacked + step.attacks_negatives))
    if speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with speed.autocast(x.device):
        with attack_mode(model):
            if step.attack_loss == "kl" and attacked:
                with torch.no_grad():
                    model(x, return_aux=True) if aux else model(x)
            for size in sizes:
                x_att = torch.cat([x, x])[:size].detach().requires_grad_(True)
                for _ in range(cfg.attack_steps):
                    with torch.enable_grad():
                        out = model(x_att, return_aux=True) if aux else model(x_att)
                        logits = [out[0], *out[1]] if aux else [out]
                        grad, = torch.autograd.grad(sum(o.float().sum() for o in logits), x_att)
        step.model.train()
        forwards = attacked + (step.method.uses_natural or cfg.anc) + cfg.anc
        total = 0.0
        for _ in range(forwards):
            out = step.model(x, y, return_aux=True) if cfg.ra else step.model(x)
            logits = [out[0], *out[1]] if cfg.ra else [out]
            total = total + sum(o.float().logsumexp(1).mean() for o in logits)
    step.optimizer.zero_grad(set_to_none=True)
    total.backward()
    return grad


def matmul_peak_tflops(device, dtype=torch.bfloat16):
    """Measured dense matmul throughput (TFLOP/s) in ``dtype``: the yardstick for the step."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    repeats = 20 if device.type == "cuda" else 3
    seconds = timed(lambda: torch.mm(a, b), device, repeats)
    return 2 * n ** 3 / seconds / 1e12


def default_image_size(arch):
    """The side of the images ``arch`` is trained on here: 64 (Tiny-ImageNet) for PreActResNets, else 32."""
    return 64 if arch.startswith("preact") else 32


def build_step(arch, method, batch, device, speed, attack_steps, num_classes, image_size=None):
    """A TrainStep exactly as the training scripts build it, and one synthetic batch; ``speed`` is
    a :class:`TrainConfig` holding the speed options for ``device``."""
    method, anc, ra = parse_method(method)
    image_size = image_size or default_image_size(arch)
    config = dataclasses.replace(speed, method=method, anc=anc, ra=ra, attack_steps=attack_steps, weight_decay=2e-4)
    model = create_model(arch, num_classes, ra, image_size).to(device).to(memory_format=config.memory_format())
    optimizer = build_optimizer(model, config)
    step = FastStep(TrainStep(model, optimizer, config, num_classes))
    pair = data.make_synthetic("train", batch, image_size, seed=0)
    loader = data.BatchLoader(pair, batch, shuffle=True, augment=True, device=device)
    x, y = next(iter(loader))
    return step, x, y


def epoch_estimate(step, images_per_s, device, image_size):
    """Seconds of a CIFAR epoch: 50,000 training images at the measured rate plus the
    per-epoch PGD-20 evaluation of 1,000 fixed test images, timed."""
    pair = data.make_synthetic("test", EVAL_IMAGES, image_size, seed=0)
    loader = data.BatchLoader(pair, 256, shuffle=False, augment=False, device=device)
    eval_s = timed(lambda: monitor_accuracy(step.attack_model, loader, step.config), device, 1)
    return CIFAR_TRAIN / images_per_s + eval_s, eval_s


def progress(text, started=None):
    """One progress line on stderr (the table and the JSON rows stay alone on stdout)."""
    elapsed = f" [{time.perf_counter() - started:.0f} s]" if started is not None else ""
    print(f"[train_step] {text}{elapsed}", file=sys.stderr, flush=True)


def measure(args, arch, method, batch, device, speed, peak, label="", started=None):
    """One configuration's figures as a dict; ``label`` (e.g. ``config 1/2``) prefixes its progress lines."""
    torch.manual_seed(0)
    image_size = args.image_size or default_image_size(arch)
    name = f"{label} {arch} {method} batch {batch}".strip()
    step, x, y = build_step(arch, method, batch, device, speed, args.attack_steps, args.num_classes, image_size)
    for i in range(args.warmup):
        progress(f"{name}: warm-up step {i + 1}/{args.warmup}", started)
        step(x, y, 1)
        model_passes(step, x, y)
    # interleaved, median of each: load changes on a shared machine hit both alike
    rounds = []
    for i in range(args.steps):
        rounds.append((timed(lambda: step(x, y, 1), device, 1), timed(lambda: model_passes(step, x, y), device, 1)))
        left = statistics.mean(sum(r) for r in rounds) * (args.steps - i - 1)
        progress(f"{name}: timed round {i + 1}/{args.steps}, step {1e3 * rounds[-1][0]:.0f} ms, about {left:.0f} s "
                 "left in this configuration", started)
    step_s = statistics.median(r[0] for r in rounds)
    pass_s = statistics.median(r[1] for r in rounds)
    counted = step if not speed.compile else build_step(arch, method, batch, device, dataclasses.replace(
        speed, compile=False), args.attack_steps, args.num_classes, image_size)[0]
    progress(f"{name}: counting FLOPs (one more step)", started)
    with FlopCount() as counter:
        counted(x, y, 1)
    flops = counter.flops
    tflops = flops / step_s / 1e12
    row = {"arch": arch, "method": method, "batch_size": batch, "device": str(device),
           "device_name": device_name(device),
           "dtype": "bf16" if speed.amp else "fp32", "channels_last": speed.channels_last,
           "joint_attacks": speed.joint_attacks, "compile": speed.compile, "attack_steps": args.attack_steps,
           "images_per_s": round(batch / step_s, 2), "step_ms": round(1e3 * step_s, 2),
           "model_pass_ms": round(1e3 * pass_s, 2), "overhead": round(step_s / pass_s, 3),
           "gflop_per_step": round(flops / 1e9, 1), "tflops": round(tflops, 3),
           "bf16_peak_tflops": round(peak, 2), "peak_source": args.peak_source, "peak_fraction": round(tflops / peak, 3),
           "image_size": image_size,
           "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.epoch_estimate:
        progress(f"{name}: timing PGD-20 on {EVAL_IMAGES} images for the epoch estimate", started)
        epoch_s, eval_s = epoch_estimate(step, batch / step_s, device, image_size)
        row.update(cifar_epoch_s=round(epoch_s, 1), eval_1000_s=round(eval_s, 2))
    return row


COLUMNS = [("arch", "{}"), ("method", "{}"), ("batch_size", "{}"), ("dtype", "{}"), ("images_per_s", "{:.1f}"),
           ("step_ms", "{:.1f}"), ("model_pass_ms", "{:.1f}"), ("overhead", "{:.3f}"), ("tflops", "{:.3f}"),
           ("peak_fraction", "{:.3f}")]


def print_table(rows):
    keys = COLUMNS + ([("cifar_epoch_s", "{:.1f}")] if rows and "cifar_epoch_s" in rows[0] else [])
    cells = [[k for k, _ in keys]] + [[fmt.format(r[k]) for k, fmt in keys] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    for i, row in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def build_parser():
    parser = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet18"], help="resnet18, wrn-34-10, preact-resnet18, ...")
    parser.add_argument("--method", nargs="+", default=["trades-ancra"],
                        help=f"{' / '.join(method_names())}, with -anc, -ra or -ancra")
    parser.add_argument("--batch-size", nargs="+", type=int, default=[32])
    add_device_argument(parser)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed rounds (one step, one model-pass replay) per configuration; medians are reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of each training attack")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the synthetic images (default: 64 for preact-*, else 32; small for CPU smoke runs)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 peak for peak_fraction, e.g. 989 (H100/H200 dense bf16); default: a measured bf16 matmul")
    add_options(parser, SPEED_OPTIONS)  # the training command's own speed options
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--epoch-estimate", action="store_true",
                        help="also time PGD-20 on 1,000 images and predict a CIFAR epoch")
    parser.add_argument("--json", action="store_true", help="print one JSON object per configuration, no table")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for method in args.method:
        parse_method(method)
    try:
        device = resolve_device(args.device)
    except ValueError as err:  # a device that is not here: one line, exit code 2, before any work
        parser.error(str(err))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    speed = TrainConfig(amp=args.amp, channels_last=args.channels_last, joint_attacks=args.joint_attacks,
                        compile=args.compile).on(device)
    args.peak_source = "nominal (--peak-tflops)" if args.peak_tflops else "measured bf16 matmul"
    started = time.perf_counter()
    if not args.peak_tflops:
        progress(f"measuring the bf16 matmul peak of {device}", started)
    peak = args.peak_tflops or matmul_peak_tflops(device)
    rows = []
    configs = [(arch, method, batch) for arch in args.arch for method in args.method for batch in args.batch_size]
    for number, (arch, method, batch) in enumerate(configs, 1):
        row = measure(args, arch, method, batch, device, speed, peak, f"config {number}/{len(configs)}", started)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"# {rows[0]['device_name']} | torch {torch.__version__} | {speed.describe_speed()} | "
              f"{args.attack_steps}-step attacks | bf16 peak {peak:.2f} TFLOP/s ({args.peak_source}) | "
              f"{torch.get_num_threads()} threads | {os.cpu_count()} cores")
        print_table(rows)


if __name__ == "__main__":
    main()
