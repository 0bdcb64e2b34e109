"""The attack catalogue (docs/protocol.md §2, §8): every attack registered with what it is — its
family, presets, whether it needs RA heads, what it sees, its ε, its cost rank in the cascade —
so that the runner, the sanity checks and the report select attacks by these attributes.

Every attack runs as ``spec.run(model, x, y, ctx) -> Outcome`` on one batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from utils import recipe
from utils.attacks import attack_mode
from utils.evaluation import adaptive
from utils.evaluation.adaptive import EnsembleView, pgd_judged_on_model, still_correct
from utils.evaluation.autoattack_adapter import run_autoattack
from utils.evaluation.errors import REFERENCE_LABEL, EvaluationError
from utils.evaluation.results import Outcome
from utils.evaluation.spec import (
    COST_APGD,
    COST_AUTOATTACK,
    COST_BLACK_BOX,
    COST_FINAL_PGD,  # noqa: F401  (re-exported for the factories of register_attacks)
    COST_SURROGATE_PGD,
    AttackSpec,
)

PRESETS = ("paper", "adaptive", "sanity", "reference", "all")  # "all" = every preset but "reference"
SEES = ("final", "heads", "black-box", "transfer")
AA_PLUS_P_BOUND = ("upper bound: AutoAttack only attacks the points the logit ensemble classifies correctly; "
                   "the others are judged at their clean input")


@dataclass(frozen=True)
class Budget:
    """Strength of the attacks. ``full`` and ``small`` set the adaptive and sanity attacks only (the
    paper's attacks and AutoAttack are fixed); ``smoke`` also caps every PGD/C&W at ``max_steps``
    and lowers AutoAttack through the package's own attributes (``autoattack``): a CPU check that
    every attack family runs, never a robustness figure (``evaluation`` False)."""

    name: str
    steps: int           # PGD steps of every adaptive PGD
    apgd_iters: int      # APGD iterations
    square_queries: int  # Square queries (AutoAttack standard uses 5000)
    restarts: int        # restarts of the sanity PGD-40
    top_k: int           # candidate classes tried by mask enumeration
    max_steps: int | None = None  # cap on the steps of the paper and sanity PGD/C&W (None: their own)
    autoattack: tuple = ()  # (attribute of the package's AutoAttack object, value) set after it is built
    evaluation: bool = True  # False: the report and results.json say it is not a robustness evaluation

    def pgd_steps(self, steps):
        """``steps`` of a paper or sanity PGD under this budget."""
        return steps if self.max_steps is None else min(steps, self.max_steps)


BUDGETS = {
    "full": Budget("full", steps=100, apgd_iters=100, square_queries=10000, restarts=5, top_k=3),
    "small": Budget("small", steps=10, apgd_iters=20, square_queries=500, restarts=2, top_k=2),
    # every PGD/C&W at most 5 steps; the AutoAttack package's own knobs lowered: 5 APGD/FAB iterations,
    # 1 target class, 20 Square queries (measured in docs/evaluation.md#the-smoke-budget)
    "smoke": Budget("smoke", steps=3, apgd_iters=3, square_queries=20, restarts=2, top_k=2, max_steps=5,
                    autoattack=(("apgd.n_iter", 5), ("apgd_targeted.n_iter", 5), ("apgd_targeted.n_target_classes", 1),
                                ("fab.n_iter", 5), ("fab.n_target_classes", 1), ("square.n_queries", 20)),
                    evaluation=False),
}


@dataclass(frozen=True)
class Settings:
    """Threat model and attack parameters shared by the whole catalogue."""

    eps: float = recipe.EPS
    aux_weight: float = recipe.AUX_WEIGHT
    budget: Budget = BUDGETS["full"]
    joint_weights: tuple = recipe.JOINT_AUX_WEIGHTS
    taus: tuple = recipe.ST_TAUS


# ---------------------------------------------------------------- the attacks' batch functions

def paper_pgd(model, x, y, ctx, **params):
    """PGD judged on the model at every iterate, keeping the last iterate for the paper's figure."""
    correct, last = pgd_judged_on_model(model, model, x, y, ctx, **params)
    return Outcome(correct, last)


def autoattack(model, x, y, ctx, *, eps, aux_weight, num_classes, reduced=()):
    """AutoAttack standard on the final logits, or with p on the logit ensemble judged on the model
    (AutoAttack then skips examples the ensemble misclassifies: an upper bound for those)."""
    target = EnsembleView(model, aux_weight) if aux_weight else model
    with attack_mode(model):
        x_adv, y_adv, info = run_autoattack(target, x, y, eps, num_classes=num_classes, seed=ctx.seed,
                                              reduced=reduced)
    correct = (y_adv == y) if not aux_weight else still_correct(model, x_adv, y)
    counts = {k: round(v * x.shape[0]) for k, v in info["accuracies"].items()}
    if "clean" in counts:
        counts["skipped"] = x.shape[0] - counts["clean"]
    return Outcome(correct, warnings=info["warnings"], counts=counts)


# ---------------------------------------------------------------- registering

def _paper_specs(settings, num_classes):
    eps, lam, b = settings.eps, settings.aux_weight, settings.budget
    step = recipe.STEP_SIZE
    specs = []
    for name, kw in (("fgsm", {"steps": 1, "step_size": eps, "loss": "ce", "init": "none"}),
                     ("pgd40", {"steps": b.pgd_steps(40), "step_size": step, "loss": "ce", "init": "uniform"}),
                     ("cw40", {"steps": b.pgd_steps(40), "step_size": step, "loss": "cw", "init": "uniform"})):
        for with_p in (False, True):
            params = dict(kw, eps=eps, aux_weight=lam if with_p else 0.0)
            specs.append(AttackSpec(name + ("+p" if with_p else ""), "paper", ("paper",), partial(paper_pgd, **params),
                                    params, "heads" if with_p else "final", eps, with_p=with_p, needs_ra=with_p,
                                    all_examples=True, standalone=True))
    for with_p in (False, True):
        weight = lam if with_p else 0.0
        params = {"eps": eps, "version": "standard", "aux_weight": weight}
        if b.autoattack:
            params["reduced"] = dict(b.autoattack)
        specs.append(AttackSpec("autoattack+p" if with_p else "autoattack", "paper", ("paper",),
                                partial(autoattack, eps=eps, aux_weight=weight, num_classes=num_classes,
                                        reduced=b.autoattack), params,
                                "heads" if with_p else "final", eps, with_p=with_p, needs_ra=with_p,
                                needs_autoattack=True, cost=COST_AUTOATTACK, package_checks=True,
                                upper_bound=AA_PLUS_P_BOUND if with_p else None))
    return specs


def _adaptive(name, family, fn, sees, eps, cost, *, with_p=False, needs_ra=True, needs_autoattack=False, **kw):
    params = dict(kw, eps=eps)
    return AttackSpec(name, family, ("adaptive",), partial(fn, **params), params, sees, eps, with_p=with_p,
                      needs_ra=needs_ra, needs_autoattack=needs_autoattack, cost=cost)


def _adaptive_specs(settings, num_heads):
    eps, lam, b = settings.eps, settings.aux_weight, settings.budget
    pgd_kw = {"steps": b.steps, "step_size": eps / 4}
    apgd = partial(_adaptive, needs_autoattack=True, n_iter=b.apgd_iters)
    specs = []
    for k in range(num_heads):
        specs.append(_adaptive(f"aux{k + 1}-pgd-ce", "aux-head", adaptive.head_pgd, "heads", eps, COST_SURROGATE_PGD,
                               head=k, **pgd_kw))
        specs += [apgd(f"aux{k + 1}-apgd-{loss}", "aux-head", adaptive.head_apgd, "heads", eps, COST_APGD, head=k,
                       loss=loss) for loss in ("ce", "dlr")]
    for w in settings.joint_weights:
        specs += [_adaptive(f"joint-pgd-{loss}-w{w:g}", "joint", adaptive.joint_pgd, "heads", eps, COST_SURROGATE_PGD,
                            with_p=True, weight=w, loss=loss, **pgd_kw) for loss in ("ce", "margin")]
        specs.append(apgd(f"joint-apgd-dlr-w{w:g}", "joint", adaptive.ensemble_apgd, "heads", eps, COST_APGD,
                          with_p=True, weight=w, loss="dlr"))
    for tau in settings.taus:
        specs.append(_adaptive(f"st-pgd-ce-t{tau:g}", "straight-through", adaptive.straight_through_pgd, "heads", eps,
                               COST_SURROGATE_PGD, tau=tau, **pgd_kw))
        specs.append(apgd(f"st-apgd-dlr-t{tau:g}", "straight-through", adaptive.straight_through_apgd, "heads", eps,
                          COST_APGD, tau=tau, loss="dlr"))
    specs.append(_adaptive(f"enum-top{b.top_k}", "enumeration", adaptive.mask_enumeration, "heads", eps,
                           COST_SURROGATE_PGD, with_p=True, top_k=b.top_k, aux_weight=lam, **pgd_kw))
    specs.append(_adaptive("transfer-labelmask", "transfer", adaptive.transfer_label_mask, "transfer", eps,
                           COST_SURROGATE_PGD, **pgd_kw))
    specs.append(_adaptive("transfer-nora", "transfer", adaptive.transfer_without_ra, "transfer", eps,
                           COST_SURROGATE_PGD, **pgd_kw))
    specs.append(_adaptive("square", "black-box", adaptive.square, "black-box", eps, COST_BLACK_BOX, needs_ra=False,
                           needs_autoattack=True, n_queries=b.square_queries))
    return specs


def _sanity_specs(settings):
    step, b = recipe.STEP_SIZE, settings.budget
    specs = []
    for name, kw in (("pgd10", {"steps": b.pgd_steps(10), "step_size": step}),
                     ("pgd100", {"steps": b.pgd_steps(100), "step_size": step}),
                     ("pgd40-restarts", {"steps": b.pgd_steps(40), "step_size": step, "restarts": b.restarts}),
                     # ε = 1 must be reachable: fewer steps (smoke) take proportionally larger ones (40 × 0.05 = 2)
                     ("pgd40-eps1", {"steps": b.pgd_steps(40), "step_size": 0.05 * 40 / b.pgd_steps(40), "eps": 1.0})):
        params = dict(kw, eps=kw.get("eps", settings.eps), aux_weight=0.0, loss="ce", init="uniform")
        off_threat = params["eps"] != settings.eps
        specs.append(AttackSpec(name, "sanity", ("sanity",), partial(paper_pgd, **params), params, "final",
                                params["eps"], standalone=off_threat))
    return specs


def _reference_specs(settings):
    """The reference evaluation script's FGSM (uniform start, one step of ε) and C&W-20 (margin
    summed over the batch before the ReLU): reproduction only, never in the worst case."""
    eps = settings.eps
    specs = []
    for name, kw in (("ref-fgsm", {"steps": 1, "step_size": eps, "loss": "ce", "init": "uniform"}),
                     ("ref-cw20", {"steps": 20, "step_size": recipe.STEP_SIZE, "loss": "cw-batchsum", "init": "uniform"})):
        params = dict(kw, eps=eps, aux_weight=0.0)
        specs.append(AttackSpec(name, "reference", ("reference",), partial(paper_pgd, **params), params, "final", eps,
                                all_examples=True, standalone=True, reference=True, notes=(REFERENCE_LABEL,)))
    return specs


_REGISTERED = []


def register_attacks(factory):
    """Add attacks without editing this file: ``factory(settings, num_classes, num_heads)`` returns
    a list of :class:`AttackSpec` (usable as a decorator). Their ``presets``, ``sees`` and ``cost``
    place them in ``--attacks`` presets, the sanity checks and the cascade like the built-in ones."""
    _REGISTERED.append(factory)
    return factory


def unregister_attacks(factory):
    """Remove a factory added by :func:`register_attacks` (tests, plug-ins)."""
    _REGISTERED.remove(factory)


def attack_catalogue(settings, num_classes, num_heads=0):
    """Every attack this evaluation knows, in report order; ``num_heads`` comes from the model
    (:func:`head_count`)."""
    registered = [spec for factory in _REGISTERED for spec in factory(settings, num_classes, num_heads)]
    return (_paper_specs(settings, num_classes) + _adaptive_specs(settings, num_heads) + _sanity_specs(settings)
            + _reference_specs(settings) + registered)


def attack_names(catalogue):
    return ["natural"] + [spec.name for spec in catalogue]


def select_attacks(request, catalogue, reverse_attention):
    """Attacks named in ``request`` (comma-separated names and presets) that apply to the model.

    Returns ``(specs, skipped)``; ``skipped`` lists attacks that need reverse attention when the
    model is plain. Unknown names raise :class:`EvaluationError` listing the valid ones.
    """
    by_name = {spec.name: spec for spec in catalogue}
    wanted = set()
    for token in (t.strip() for t in request.split(",")):
        if not token or token == "natural":
            continue
        if token in PRESETS:
            wanted |= {s.name for s in catalogue
                       if token in s.presets or (token == "all" and "reference" not in s.presets)}
        elif token in by_name:
            wanted.add(token)
        else:
            raise EvaluationError(
                f"unknown attack {token!r}; use presets {', '.join(PRESETS)} or names: "
                f"{', '.join(attack_names(catalogue))}"
            )
    chosen = [s for s in catalogue if s.name in wanted]
    skipped = [s.name for s in chosen if s.needs_ra and not reverse_attention]
    return [s for s in chosen if s.name not in skipped], skipped
