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
from utils.evaluation.results import AttackResult, Evaluation, Outcome

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


SPLIT_COUNT = "batches_split_for_memory"  # in AttackResult.counts: batches rerun as halves after running out of memory


def merge_outcomes(parts):
    """One :class:`Outcome` of the consecutive batches ``parts``: rows concatenated, warnings
    united in order, counts summed."""
    last = None if any(p.last is None for p in parts) else torch.cat([p.last for p in parts])
    warnings, counts = [], {}
    for part in parts:
        warnings += [w for w in part.warnings if w not in warnings]
        for key, value in part.counts.items():
            counts[key] = counts.get(key, 0) + value
    return Outcome(torch.cat([p.correct for p in parts]), last, warnings, counts)


class BatchLimit:
    """The batch size in use: starts at the chosen one and is lowered to the larger half of any
    batch that ran out of CUDA memory, so later batches (and later attacks) do not retry it."""

    def __init__(self, size):
        self.size = max(1, int(size))

    def lower(self, failed):
        self.size = max(1, min(self.size, failed - failed // 2))


def run_batch(model, spec, x, y, idx, seed, device, bf16=False, limit=None):
    """``spec.run`` on the examples ``idx``; a batch that runs out of CUDA memory is rerun as two
    halves (recursively; counted under :data:`SPLIT_COUNT`, and ``limit`` lowered). Per-example
    deterministic attacks give the same result either way; the AutoAttack package's seeded
    starts follow the batch."""
    try:
        return spec.run(model, x[idx].to(device), y[idx].to(device), AttackContext(seed, idx, bf16=bf16))
    except torch.cuda.OutOfMemoryError:
        if len(idx) < 2:
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if limit is not None:
        limit.lower(len(idx))
    half = len(idx) // 2
    parts = [run_batch(model, spec, x, y, part, seed, device, bf16, limit) for part in (idx[:half], idx[half:])]
    merged = merge_outcomes(parts)
    merged.counts[SPLIT_COUNT] = merged.counts.get(SPLIT_COUNT, 0) + 1
    return merged


def run_attack(model, spec, x, y, clean, received, *, batch_size, seed, device, eps, bf16=False, progress=True,
               standalone=True, order=0, limit=None, position=0):
    """Run one attack on the examples in ``received`` (a bool mask over the set), in batches of
    ``limit.size`` (a :class:`BatchLimit`, shared by the attacks of one run; ``batch_size`` without one)."""
    n = len(y)
    attacked = received | (~clean if spec.all_examples else np.zeros(n, bool))
    indices = torch.from_numpy(np.flatnonzero(attacked))
    robust = np.zeros(n, bool)
    paper = np.zeros(n, bool) if spec.all_examples else None
    warnings, counts = [], {}
    this_seed = attack_seed(seed, spec.name)
    limit = limit or BatchLimit(batch_size)
    _sync(device)
    start = time.perf_counter()
    with tqdm(total=len(indices), desc=spec.name, disable=not progress, leave=False, unit="ex",
              position=position) as bar:
        done = 0
        while done < len(indices):
            idx = indices[done:done + limit.size]
            outcome = run_batch(model, spec, x, y, idx, this_seed, device, bf16=bf16 and spec.bf16_ok, limit=limit)
            rows = idx.numpy()
            robust[rows] = outcome.correct.cpu().numpy() & clean[rows]
            if paper is not None and outcome.last is not None:
                paper[rows] = outcome.last.cpu().numpy()
            warnings += [w for w in outcome.warnings if w not in warnings]
            for key, value in outcome.counts.items():
                counts[key] = counts.get(key, 0) + value
            done += len(idx)
            bar.update(len(idx))
    _sync(device)
    if not standalone:
        robust |= clean & ~received  # not attacked here: an earlier attack already broke it
    return AttackResult(spec, seed=this_seed, seconds=time.perf_counter() - start, robust=robust, paper=paper,
                        warnings=warnings, counts=counts, in_worst_case=spec.in_threat_model(eps),
                        standalone=standalone, received=received.copy(), order=order)


class SuiteProgress:
    """The suite's overall bar, above the per-attack bars: attacks done of those left to run (a
    resumed run counts only the unfinished ones), the attack running now, and tqdm's time
    estimate, which weights the attacks by their cost rank (``spec.cost``: AutoAttack and Square
    count more than a PGD), so the estimate does not assume every attack takes as long as the first."""

    def __init__(self, plan, finished=(), enabled=True):
        self.left = [spec for spec, _ in plan if spec.name not in finished]
        self.weights = {spec.name: max(1, spec.cost) for spec in self.left}
        self.count = 0
        self.bar = tqdm(total=sum(self.weights.values()), desc="suite", disable=not enabled or not self.left,
                        position=0, unit="cost", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                        "[{elapsed}<{remaining}]{postfix}")
        self._postfix("")

    def _postfix(self, running):
        text = f"{self.count}/{len(self.left)} attacks done, {len(self.left) - self.count} left"
        self.bar.set_postfix_str(text + (f"; running {running}" if running else ""), refresh=True)

    def start(self, name):
        self.current = name
        self._postfix(name)

    def done(self):
        self.count += 1
        self.bar.update(self.weights[self.current])
        self._postfix("")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
        return False


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
        results, limit = [], BatchLimit(batch_size)
        plan = cascade_plan(specs, cascade, full_set)
        with SuiteProgress(plan, finished, enabled=progress) as suite:
            for order, (spec, standalone) in enumerate(plan):
                if spec.name in finished:
                    results.append(finished[spec.name])
                    continue
                received = clean.copy() if standalone else survivors(clean, results)
                standalone = standalone or np.array_equal(received, clean)  # nothing broken yet: a full-set figure
                suite.start(spec.name)
                results.append(run_attack(model, spec, x, y, clean, received, batch_size=batch_size, seed=seed,
                                          device=device, eps=eps, bf16=attack_dtype == "bf16", progress=progress,
                                          standalone=standalone, order=order, limit=limit, position=1))
                suite.done()
                if on_result is not None:
                    on_result(results[-1])
    finally:
        model.train(was_training)
    return Evaluation(y.cpu().numpy(), clean, agreement, results, list(skipped), clean_seconds, cascade=cascade)


PROBE_SIZES = (8, 32)  # two small probe batches: their peak memories give a per-example cost
MEMORY_FRACTION = 0.6  # of the free memory: room for the attacks' extra copies and the allocator's slack
MAX_AUTO_BATCH = 1 << 16


def batch_from_memory(free_bytes, fixed_bytes, per_example_bytes, fraction=MEMORY_FRACTION, cap=MAX_AUTO_BATCH):
    """Examples per batch that fit in ``fraction`` of ``free_bytes`` at ``fixed_bytes`` plus
    ``per_example_bytes`` each (at least 1, at most ``cap``)."""
    usable = free_bytes * fraction - max(0, fixed_bytes)
    return int(max(1, min(cap, usable // max(1, per_example_bytes))))


def memory_cost(peaks):
    """``(fixed, per example)`` bytes from ``{batch size: peak bytes}`` of two probe batches:
    the slope between them, or the larger batch's peak per example when the slope is not positive."""
    (small, low), (large, high) = sorted(peaks.items())
    per_example = (high - low) / (large - small)
    if per_example <= 0:
        return 0, max(1, high // large)
    return max(0, low - per_example * small), per_example


def attack_step_peak(model, x, device, size):
    """Peak CUDA bytes above the current allocation of one attack step on ``size`` copies of an
    example: a forward with the RA heads and a backward to the input, in fp32 (bf16 needs less)."""
    ra = has_reverse_attention(model)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe = x[:1].to(device).expand(size, *x.shape[1:]).clone().requires_grad_(True)
    with attack_mode(model), full_precision(device):
        out = model(probe, return_aux=True) if ra else model(probe)
        logits = [out[0], *out[1]] if isinstance(out, tuple) else [out]
        torch.autograd.grad(sum(o.float().sum() for o in logits), probe)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del probe, out, logits
    torch.cuda.empty_cache()
    return peak


def auto_batch_size(model, x, device, limit=None, *, peak=None, free_bytes=None):
    """``--batch-size auto``: on CUDA, as many examples as fit in :data:`MEMORY_FRACTION` of the
    free memory at the per-example cost measured by two probe attack steps (``peak(size)`` →
    bytes, :func:`attack_step_peak`); the size does not depend on the number of examples, so a
    cascade stage attacks its whole survivor set in one batch where memory allows. Elsewhere a
    fixed :data:`CPU_BATCH_SIZE` (at most ``limit``). Returns ``(size, how it was chosen)``."""
    if torch.device(device).type != "cuda":
        size = max(1, min(CPU_BATCH_SIZE, limit or CPU_BATCH_SIZE))
        return size, f"auto on CPU: fixed {CPU_BATCH_SIZE} (memory is not the limit there)"
    peak = peak or (lambda size: attack_step_peak(model, x, device, size))
    peak(max(PROBE_SIZES))  # warm-up: lazy initialisation and kernel workspaces are not per-example costs
    peaks = {size: peak(size) for size in PROBE_SIZES}
    fixed, per_example = memory_cost(peaks)
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(torch.device(device))[0]
    size = batch_from_memory(free_bytes, fixed, per_example)
    return size, (f"auto on CUDA: {size} = {MEMORY_FRACTION:g} of {free_bytes / 2 ** 30:.1f} GiB free at "
                  f"{per_example / 2 ** 20:.2f} MiB per example (probe attack steps at {', '.join(map(str, peaks))})")
