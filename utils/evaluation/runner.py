"""Running the catalogue over a dataset: one shared clean pass, then every attack, either each on
every clean-correct example or as a cascade (each attack only on the examples every earlier
attack failed to break, as AutoAttack runs its own four); and the batch size that fits.

An example counts as robust under an attack only if it is classified correctly clean *and* the
real model is correct at every point the attack queried.
"""
import time
import zlib

import numpy as np
import torch
from tqdm import tqdm

from models import has_reverse_attention, unwrap
from utils.attacks import attack_mode
from utils.evaluation.autoattack_adapter import import_autoattack
from utils.evaluation.context import AttackContext, full_precision
from utils.evaluation.results import AttackResult, Evaluation

CPU_BATCH_SIZE = 128  # --batch-size auto on a CPU: memory is rarely the limit there
ATTACK_DTYPES = ("bf16", "fp32")


def head_count(model):
    """Number of RA heads of ``model`` (0 for a plain or foreign model)."""
    return len(unwrap(model).ra_blocks) if has_reverse_attention(model) else 0


def attack_seed(seed, name):
    """Seed of one attack: fixed by the run's seed and the attack's name, not by attack order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def _batches(indices, batch_size):
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def clean_pass(model, x, y, batch_size, device):
    """Clean correctness (fp32) and, for RA models, the argmax agreement of each head with the final logits."""
    correct, agree = [], []
    ra = has_reverse_attention(model)
    with attack_mode(model), full_precision(device):
        for idx in _batches(torch.arange(len(y)), batch_size):
            xb, yb = x[idx].to(device), y[idx].to(device)
            logits, aux = model(xb, return_aux=True) if ra else (model(xb), [])
            pred = logits.argmax(1)
            correct.append((pred == yb).cpu())
            agree.append(torch.stack([p.argmax(1) == pred for p in aux], 1).cpu() if aux else None)
    correct = torch.cat(correct).numpy() if correct else np.zeros(0, bool)
    agreement = {}
    if ra and agree:
        table = torch.cat(agree).float().mean(0)
        agreement = {k + 1: float(v) for k, v in enumerate(table)}
    return correct, agreement


def run_attack(model, spec, x, y, clean, received, *, batch_size, seed, device, eps, bf16=False, progress=True,
               standalone=True, order=0):
    """Run one attack on the examples in ``received`` (a bool mask over the set)."""
    n = len(y)
    attacked = received | (~clean if spec.all_examples else np.zeros(n, bool))
    indices = torch.from_numpy(np.flatnonzero(attacked))
    robust = np.zeros(n, bool)
    paper = np.zeros(n, bool) if spec.all_examples else None
    warnings, counts = [], {}
    this_seed = attack_seed(seed, spec.name)
    _sync(device)
    start = time.perf_counter()
    for idx in tqdm(_batches(indices, batch_size), desc=spec.name, disable=not progress, leave=False):
        ctx = AttackContext(this_seed, idx, bf16=bf16 and spec.bf16_ok)
        outcome = spec.run(model, x[idx].to(device), y[idx].to(device), ctx)
        rows = idx.numpy()
        robust[rows] = outcome.correct.cpu().numpy() & clean[rows]
        if paper is not None and outcome.last is not None:
            paper[rows] = outcome.last.cpu().numpy()
        warnings += [w for w in outcome.warnings if w not in warnings]
        for key, value in outcome.counts.items():
            counts[key] = counts.get(key, 0) + value
    _sync(device)
    if not standalone:
        robust |= clean & ~received  # not attacked here: an earlier attack already broke it
    return AttackResult(spec.name, spec.family, spec.with_p, dict(spec.params), this_seed,
                        time.perf_counter() - start, robust, paper, warnings, counts, spec.sees, spec.eps,
                        spec.in_threat_model(eps), standalone, received.copy(), order, list(spec.notes),
                        spec.upper_bound, spec.reference, spec.package_checks)


def cascade_plan(specs, cascade, full_set=()):
    """``[(spec, standalone)]`` in run order: without the cascade, every attack standalone in
    catalogue order; with it, the standalone attacks (and those named in ``full_set``) first, then
    the rest from cheap to expensive, AutoAttack and Square last."""
    if not cascade:
        return [(spec, True) for spec in specs]
    alone = [spec.standalone or spec.name in full_set for spec in specs]
    first = [(spec, True) for spec, single in zip(specs, alone) if single]
    rest = sorted((spec for spec, single in zip(specs, alone) if not single), key=lambda s: s.cost)
    return first + [(spec, False) for spec in rest]


def survivors(clean, results):
    """Clean-correct examples that no attack of the threat model run so far has broken."""
    alive = clean.copy()
    for result in results:
        if result.in_worst_case:
            alive &= result.robust
    return alive


def run_attacks(model, x, y, specs, *, eps, batch_size=200, seed=0, device="cpu", cascade=True, attack_dtype="fp32",
                progress=True, skipped=(), on_result=None, finished=None, full_set=()):
    """Clean pass, then every attack in ``specs`` (as a cascade unless ``cascade`` is False; the
    attacks named in ``full_set`` then still run on every example, so their own figure is
    reported); returns an :class:`Evaluation`. ``eps`` is the threat model's radius.

    ``x`` (N×C×H×W floats in [0, 1]) and ``y`` stay where they are; batches move to ``device``.
    ``on_result(result)`` is called after each attack (to save progress); ``finished`` maps names
    to results of an earlier run with the same settings, which are reused instead of rerun.
    """
    if attack_dtype not in ATTACK_DTYPES:
        raise ValueError(f"attack_dtype must be one of {', '.join(ATTACK_DTYPES)}, got {attack_dtype!r}")
    if any(spec.needs_autoattack for spec in specs):
        import_autoattack()
    finished = finished or {}
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        clean, agreement = clean_pass(model, x, y, batch_size, device)
        clean_seconds = time.perf_counter() - start
        results = []
        for order, (spec, standalone) in enumerate(cascade_plan(specs, cascade, full_set)):
            if spec.name in finished:
                results.append(finished[spec.name])
                continue
            received = clean.copy() if standalone else survivors(clean, results)
            standalone = standalone or np.array_equal(received, clean)  # nothing broken yet: a full-set figure
            results.append(run_attack(model, spec, x, y, clean, received, batch_size=batch_size, seed=seed,
                                      device=device, eps=eps, bf16=attack_dtype == "bf16", progress=progress,
                                      standalone=standalone, order=order))
            if on_result is not None:
                on_result(results[-1])
    finally:
        model.train(was_training)
    return Evaluation(y.cpu().numpy(), clean, agreement, results, list(skipped), clean_seconds, cascade=cascade)


def auto_batch_size(model, x, device, limit):
    """The largest batch (≤ ``limit``) for which an attack step — a forward with the RA heads and
    a backward to the input — fits on a CUDA device, found by halving on out-of-memory; a fixed
    :data:`CPU_BATCH_SIZE` elsewhere. Returns ``(size, how it was chosen)``."""
    if torch.device(device).type != "cuda":
        size = max(1, min(CPU_BATCH_SIZE, limit))
        return size, f"auto on CPU: fixed {CPU_BATCH_SIZE} (memory is not the limit there)"
    size = max(1, limit)
    ra = has_reverse_attention(model)
    while size >= 1:
        try:
            probe = x[:1].to(device).expand(size, *x.shape[1:]).clone().requires_grad_(True)
            with attack_mode(model):
                out = model(probe, return_aux=True) if ra else model(probe)
                logits = out[0] if isinstance(out, tuple) else out
                torch.autograd.grad(logits.float().sum(), probe)
            del probe, out, logits
            torch.cuda.empty_cache()
            if size == limit:
                return size, f"auto on CUDA: {size} (the whole set fits)"
            size = max(1, size // 2)  # the probe only just fits: leave room for the attacks' extra passes
            return size, f"auto on CUDA: {size} (half the largest probe batch that fit)"
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            size //= 2
    raise RuntimeError("not even one example fits on the device")
