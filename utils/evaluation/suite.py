"""Robust-accuracy evaluation (SPEC §2, §8): the attack catalogue and presets, running attacks
over a dataset, per-example bookkeeping, the worst case, and the markdown / JSON reports.

An example counts as robust under an attack only if it is classified correctly clean *and*
the real model is correct at every point the attack queried. For the paper's attacks the
paper's own figure is kept too: accuracy on the last iterate over all examples, whatever the
clean prediction.
"""
import inspect
import math
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from models import has_reverse_attention
from utils.evaluation import adaptive
from utils.evaluation.adaptive import EnsembleView, pgd_judged_on_model, still_correct
from utils.attacks import attack_mode
from utils.evaluation.autoattack_adapter import import_autoattack, run_autoattack

PAPER_STEP = 0.007
PRESETS = ("paper", "adaptive", "sanity", "all")


class EvaluationError(ValueError):
    """Evaluation asked for something impossible (unknown attack, missing dataset name, ...)."""


@dataclass(frozen=True)
class Budget:
    """Strength of the adaptive and sanity attacks (the paper's attacks and AutoAttack are fixed)."""

    name: str
    steps: int           # PGD steps of every adaptive PGD
    apgd_iters: int      # APGD iterations
    square_queries: int  # Square queries (AutoAttack standard uses 5000)
    restarts: int        # restarts of the sanity PGD-40
    top_k: int           # candidate classes tried by mask enumeration


BUDGETS = {
    "full": Budget("full", steps=100, apgd_iters=100, square_queries=10000, restarts=5, top_k=3),
    "small": Budget("small", steps=10, apgd_iters=20, square_queries=500, restarts=2, top_k=2),
}


@dataclass(frozen=True)
class Settings:
    """Threat model and attack parameters shared by the whole catalogue."""

    eps: float = 8 / 255
    aux_weight: float = 2.0
    budget: Budget = BUDGETS["full"]
    joint_weights: tuple = (0.5, 2.0, 8.0)
    taus: tuple = (0.1, 1.0, 10.0)


@dataclass
class Outcome:
    """One batch's result: still correct at every query, at the last iterate (paper attacks),
    the AutoAttack package's warnings and counts it logged."""

    correct: torch.Tensor
    last: Optional[torch.Tensor] = None
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttackSpec:
    """A named attack: ``run(model, x, y, generator, seed) -> Outcome`` on one batch."""

    name: str
    family: str
    preset: str
    run: Callable
    params: dict
    with_p: bool = False
    needs_ra: bool = False
    all_examples: bool = False  # paper attacks: run on every example to keep the paper's figure
    needs_autoattack: bool = False


@dataclass
class AttackResult:
    """Per-example outcome of one attack over the evaluation set."""

    name: str
    family: str
    with_p: bool
    params: dict
    seed: int
    seconds: float
    robust: np.ndarray
    paper: Optional[np.ndarray] = None
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def accuracy(self):
        return float(self.robust.mean()) if self.robust.size else 0.0

    @property
    def paper_accuracy(self):
        return None if self.paper is None else float(self.paper.mean())


@dataclass
class Evaluation:
    """Everything one run measured, per example."""

    labels: np.ndarray
    clean: np.ndarray
    agreement: dict            # head index → fraction of examples where argmax aux_k = final prediction
    results: list
    skipped: list = field(default_factory=list)
    clean_seconds: float = 0.0

    @property
    def n(self):
        return int(self.labels.size)

    @property
    def clean_accuracy(self):
        return float(self.clean.mean()) if self.n else 0.0

    def result(self, name):
        return next((r for r in self.results if r.name == name), None)

    def worst_case(self):
        """Per example: correct clean and under every attack run."""
        worst = self.clean.copy()
        for result in self.results:
            worst &= result.robust
        return worst


# ---------------------------------------------------------------- the catalogue

def _wrap(fn, **bound):
    """Adapt an attack ``fn(model, x, y, ..., generator|seed)`` returning ``(correct, warnings)``."""
    takes = inspect.signature(fn).parameters

    def run(model, x, y, generator, seed):
        kwargs = dict(bound)
        if "generator" in takes:
            kwargs["generator"] = generator
        if "seed" in takes:
            kwargs["seed"] = seed
        correct, warnings = fn(model, x, y, **kwargs)
        return Outcome(correct, warnings=list(warnings))
    return run


def _paper_pgd(model, x, y, generator, seed, **kwargs):
    correct, last = pgd_judged_on_model(model, model, x, y, generator=generator, **kwargs)
    return Outcome(correct, last)


def _autoattack(model, x, y, generator, seed, *, eps, aux_weight, num_classes):
    """AutoAttack standard on the final logits, or with p on the logit ensemble judged on the model
    (AutoAttack then skips examples the ensemble misclassifies: an upper bound for those)."""
    target = EnsembleView(model, aux_weight) if aux_weight else model
    with attack_mode(model):
        x_adv, y_adv, info = run_autoattack(target, x, y, eps, num_classes=num_classes, seed=seed)
    correct = (y_adv == y) if not aux_weight else still_correct(model, x_adv, y)
    counts = {k: round(v * x.shape[0]) for k, v in info["accuracies"].items()}
    return Outcome(correct, warnings=info["warnings"], counts=counts)


def attack_catalogue(settings, num_classes, num_heads=2):
    """Every attack this evaluation knows, in report order."""
    eps, lam, b = settings.eps, settings.aux_weight, settings.budget
    step = eps / 4
    specs = []

    def paper(name, with_p, **kw):
        params = dict(kw, eps=eps, aux_weight=lam if with_p else 0.0)
        specs.append(AttackSpec(name, "paper", "paper", partial(_paper_pgd, **params), params, with_p=with_p,
                                needs_ra=with_p, all_examples=True))

    paper_attacks = (("fgsm", dict(steps=1, step_size=eps, loss="ce", init="none")),
                     ("pgd40", dict(steps=40, step_size=PAPER_STEP, loss="ce", init="uniform")),
                     ("cw40", dict(steps=40, step_size=PAPER_STEP, loss="cw", init="uniform")))
    for name, kw in paper_attacks:
        paper(name, False, **kw)
        paper(f"{name}+p", True, **kw)
    for with_p in (False, True):
        tag = "+p" if with_p else ""
        params = {"eps": eps, "version": "standard", "aux_weight": lam if with_p else 0.0}
        specs.append(AttackSpec(f"autoattack{tag}", "paper", "paper",
                                partial(_autoattack, eps=eps, aux_weight=params["aux_weight"], num_classes=num_classes),
                                params, with_p=with_p, needs_ra=with_p, needs_autoattack=True))

    def adaptive_spec(name, family, fn, with_p=False, needs_ra=True, needs_autoattack=False, **kw):
        params = dict(kw, eps=eps)
        specs.append(AttackSpec(name, family, "adaptive", _wrap(fn, eps=eps, **kw), params, with_p=with_p,
                                needs_ra=needs_ra, needs_autoattack=needs_autoattack))

    pgd_kw = {"steps": b.steps, "step_size": step}
    for k in range(num_heads):
        adaptive_spec(f"aux{k + 1}-pgd-ce", "aux-head", adaptive.head_pgd, head=k, **pgd_kw)
        for loss in ("ce", "dlr"):
            adaptive_spec(f"aux{k + 1}-apgd-{loss}", "aux-head", adaptive.head_apgd, needs_autoattack=True, head=k,
                          loss=loss, n_iter=b.apgd_iters)
    for w in settings.joint_weights:
        for loss in ("ce", "margin"):
            adaptive_spec(f"joint-pgd-{loss}-w{w:g}", "joint", adaptive.joint_pgd, with_p=True, weight=w, loss=loss,
                          **pgd_kw)
        adaptive_spec(f"joint-apgd-dlr-w{w:g}", "joint", adaptive.ensemble_apgd, with_p=True, needs_autoattack=True,
                      weight=w, loss="dlr", n_iter=b.apgd_iters)
    for tau in settings.taus:
        adaptive_spec(f"st-pgd-ce-t{tau:g}", "straight-through", adaptive.straight_through_pgd, tau=tau, **pgd_kw)
        adaptive_spec(f"st-apgd-dlr-t{tau:g}", "straight-through", adaptive.straight_through_apgd,
                      needs_autoattack=True, tau=tau, loss="dlr", n_iter=b.apgd_iters)
    adaptive_spec(f"enum-top{b.top_k}", "enumeration", adaptive.mask_enumeration, with_p=True, top_k=b.top_k,
                  aux_weight=lam, **pgd_kw)
    adaptive_spec("transfer-labelmask", "transfer", adaptive.transfer_label_mask, **pgd_kw)
    adaptive_spec("transfer-nora", "transfer", adaptive.transfer_without_ra, **pgd_kw)
    adaptive_spec("square", "black-box", adaptive.square, needs_ra=False, needs_autoattack=True,
                  n_queries=b.square_queries)

    def sanity(name, **kw):
        params = dict(kw, eps=kw.get("eps", eps), aux_weight=0.0, loss="ce", init="uniform")
        specs.append(AttackSpec(name, "sanity", "sanity", partial(_paper_pgd, **params), params))

    sanity("pgd10", steps=10, step_size=PAPER_STEP)
    sanity("pgd100", steps=100, step_size=PAPER_STEP)
    sanity("pgd40-restarts", steps=40, step_size=PAPER_STEP, restarts=b.restarts)
    sanity("pgd40-eps1", steps=40, step_size=0.05, eps=1.0)
    return specs


def attack_names(catalogue):
    return ["natural"] + [spec.name for spec in catalogue]


def select_attacks(request, catalogue, reverse_attention):
    """Attacks named in ``request`` (comma-separated names and presets) that apply to the model.

    Returns ``(specs, skipped)``; ``skipped`` lists attacks that need reverse attention when the
    model is plain. Unknown names raise :class:`EvaluationError` listing the valid ones.
    """
    by_name = {spec.name: spec for spec in catalogue}
    wanted = []
    for token in (t.strip() for t in request.split(",")):
        if not token or token == "natural":
            continue
        if token in PRESETS:
            wanted += [s.name for s in catalogue if token == "all" or s.preset == token]
        elif token in by_name:
            wanted.append(token)
        else:
            raise EvaluationError(
                f"unknown attack {token!r}; use presets {', '.join(PRESETS)} or names: "
                f"{', '.join(attack_names(catalogue))}"
            )
    chosen = [s for s in catalogue if s.name in set(wanted)]
    skipped = [s.name for s in chosen if s.needs_ra and not reverse_attention]
    return [s for s in chosen if s.name not in skipped], skipped


# ---------------------------------------------------------------- running

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
    """Clean correctness and, for RA models, the argmax agreement of each head with the final logits."""
    correct, agree = [], []
    ra = has_reverse_attention(model)
    with attack_mode(model):
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


def run_attack(model, spec, x, y, clean, *, batch_size, seed, device, progress=True):
    """Run one attack over the set (clean-correct examples only, unless the paper's figure is kept)."""
    n = len(y)
    indices = torch.arange(n) if spec.all_examples else torch.from_numpy(np.flatnonzero(clean))
    robust = np.zeros(n, bool)
    paper = np.zeros(n, bool) if spec.all_examples else None
    warnings, counts = [], {}
    this_seed = attack_seed(seed, spec.name)
    generator = torch.Generator(device=device).manual_seed(this_seed)
    _sync(device)
    start = time.perf_counter()
    for idx in tqdm(_batches(indices, batch_size), desc=spec.name, disable=not progress, leave=False):
        outcome = spec.run(model, x[idx].to(device), y[idx].to(device), generator, this_seed)
        robust[idx.numpy()] = outcome.correct.cpu().numpy() & clean[idx.numpy()]
        if paper is not None and outcome.last is not None:
            paper[idx.numpy()] = outcome.last.cpu().numpy()
        warnings += [w for w in outcome.warnings if w not in warnings]
        for key, value in outcome.counts.items():
            counts[key] = counts.get(key, 0) + value
    _sync(device)
    return AttackResult(spec.name, spec.family, spec.with_p, dict(spec.params), this_seed,
                        time.perf_counter() - start, robust, paper, warnings, counts)


def evaluate(model, x, y, specs, *, batch_size=200, seed=0, device="cpu", progress=True, skipped=(), on_result=None):
    """Clean pass, then every attack in ``specs``; returns an :class:`Evaluation`.

    ``x`` (N×C×H×W floats in [0, 1]) and ``y`` stay where they are; batches move to ``device``.
    ``on_result(result)`` is called after each attack (e.g. to log progress without a terminal).
    """
    if any(spec.needs_autoattack for spec in specs):
        import_autoattack()
    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        clean, agreement = clean_pass(model, x, y, batch_size, device)
        clean_seconds = time.perf_counter() - start
        results = []
        for spec in specs:
            results.append(run_attack(model, spec, x, y, clean, batch_size=batch_size, seed=seed, device=device,
                                      progress=progress))
            if on_result is not None:
                on_result(results[-1])
    finally:
        model.train(was_training)
    return Evaluation(y.cpu().numpy(), clean, agreement, results, list(skipped), clean_seconds)


# ---------------------------------------------------------------- reports

def _pct(value):
    return "—" if value is None else f"{100 * value:.2f} %"


def markdown_report(evaluation, checks, meta):
    """The run as markdown: headline, attack table, sanity checks, AutoAttack's warnings."""
    n = evaluation.n
    worst = evaluation.worst_case()
    lines = [f"# Robustness evaluation: {meta.get('checkpoint', '')}", ""]
    lines.append(
        f"model {meta.get('arch')} ({'RA' if meta.get('reverse_attention') else 'plain'}), dataset "
        f"{meta.get('dataset')} test, n = {n} (subset seed {meta.get('subset_seed')}), ε = {meta.get('eps_text')}, "
        f"λ = {meta.get('aux_weight')}, budget {meta.get('budget')}, seed {meta.get('seed')}, "
        f"device {meta.get('device')}"
    )
    lines += ["", f"**Headline: worst-case robust accuracy {_pct(worst.mean() if n else 0.0)} "
              f"({int(worst.sum())}/{n}) over {len(evaluation.results)} attacks.** "
              f"Clean accuracy {_pct(evaluation.clean_accuracy)}.", ""]
    lines += ["| attack | family | with p | accuracy | robust count | paper (last iterate) | seconds |",
              "|---|---|---|---|---|---|---|"]
    lines.append(f"| natural | paper | no | {_pct(evaluation.clean_accuracy)} | {int(evaluation.clean.sum())}/{n} | "
                 f"{_pct(evaluation.clean_accuracy)} | {evaluation.clean_seconds:.1f} |")
    for r in evaluation.results:
        lines.append(f"| {r.name} | {r.family} | {'yes' if r.with_p else 'no'} | {_pct(r.accuracy)} | "
                     f"{int(r.robust.sum())}/{n} | {_pct(r.paper_accuracy)} | {r.seconds:.1f} |")
    total = evaluation.clean_seconds + sum(r.seconds for r in evaluation.results)
    lines.append(f"| **worst case (all attacks)** | — | — | **{_pct(worst.mean() if n else 0.0)}** | "
                 f"{int(worst.sum())}/{n} | — | {total:.1f} |")
    if evaluation.skipped:
        lines += ["", f"Not applicable to a plain model (skipped): {', '.join(evaluation.skipped)}."]
    lines += ["", "## Sanity checks", ""]
    for check in checks:
        lines.append(f"- **{check['status']}** {check['name']}: {check['message']}")
    aa = [(r.name, w) for r in evaluation.results for w in r.warnings]
    if aa:
        lines += ["", "## Warnings from the AutoAttack package", ""]
        lines += [f"- {name}: {w}" for name, w in aa]
    return "\n".join(lines) + "\n"


def json_report(evaluation, checks, meta):
    """Every number of the run, with per-example 0/1 arrays so runs can be merged."""
    def ints(array):
        return [int(v) for v in array]

    worst = evaluation.worst_case()
    return {
        "meta": meta,
        "labels": ints(evaluation.labels),
        "clean": {"accuracy": evaluation.clean_accuracy, "robust_count": int(evaluation.clean.sum()),
                  "seconds": evaluation.clean_seconds, "correct": ints(evaluation.clean)},
        "aux_agreement": {str(k): v for k, v in evaluation.agreement.items()},
        "attacks": [
            {"name": r.name, "family": r.family, "with_p": r.with_p, "accuracy": r.accuracy,
             "robust_count": int(r.robust.sum()), "paper_last_iterate": r.paper_accuracy, "params": r.params,
             "seed": r.seed, "seconds": r.seconds, "correct": ints(r.robust),
             "paper_correct": None if r.paper is None else ints(r.paper), "autoattack_warnings": r.warnings,
             "autoattack_counts": r.counts}
            for r in evaluation.results
        ],
        "skipped": evaluation.skipped,
        "worst_case": {"accuracy": float(worst.mean()) if evaluation.n else 0.0, "robust_count": int(worst.sum()),
                       "correct": ints(worst), "over": [r.name for r in evaluation.results]},
        "sanity": checks,
    }


def merge_runs(runs):
    """Per-example worst case over several ``results.json`` dicts of the same examples."""
    if not runs:
        raise EvaluationError("no runs to merge")
    indices = runs[0]["meta"].get("indices")
    if any(run["meta"].get("indices") != indices for run in runs):
        raise EvaluationError("runs evaluated different examples; merge only runs with the same subset and seed")
    worst = np.array(runs[0]["clean"]["correct"], bool)
    for run in runs:
        worst &= np.array(run["clean"]["correct"], bool)
        for attack in run["attacks"]:
            worst &= np.array(attack["correct"], bool)
    return {"accuracy": float(worst.mean()) if worst.size else 0.0, "robust_count": int(worst.sum()),
            "correct": [int(v) for v in worst]}


def eps_text(eps):
    """ε as ``k/255`` when it is one."""
    k = eps * 255
    return f"{round(k)}/255" if math.isclose(k, round(k), abs_tol=1e-6) else f"{eps:g}"
