"""Per-example records of an evaluation: one attack's outcome on a batch, one attack over the set,
and the whole run with its worst case over the attacks of the threat model."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from utils.evaluation.report import json_report, markdown_report
from utils.evaluation.spec import AttackSpec


@dataclass
class Outcome:
    """One batch's result: still correct at every query, at the last iterate (paper attacks),
    the AutoAttack package's warnings and counts it logged."""

    correct: torch.Tensor
    last: torch.Tensor | None = None
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def _from_spec(name):
    """A read-only attribute of :class:`AttackResult` that is its spec's ``name``."""
    return property(lambda self: getattr(self.spec, name), doc=f"The attack's ``{name}`` (from its spec).")


@dataclass
class AttackResult:
    """Per-example outcome of one attack (``spec``) over the evaluation set.

    ``robust[i]``: example i is clean-correct and the attack did not break it. A cascade row
    (``standalone`` False) attacked only the examples in ``received``; it is True elsewhere, so
    the per-example AND over rows is the worst case, but its mean is not a standalone figure.
    ``in_worst_case``: the spec is in the threat model of this run's ε. What the attack is
    (name, family, params, ε, ...) is read from ``spec``; a result loaded from results.json
    refers to the spec its record describes (:func:`recorded_spec`)."""

    spec: AttackSpec
    seed: int
    seconds: float
    robust: np.ndarray
    paper: np.ndarray | None = None
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    in_worst_case: bool = True
    standalone: bool = True
    received: np.ndarray | None = None
    order: int = 0

    name = _from_spec("name")
    family = _from_spec("family")
    with_p = _from_spec("with_p")
    params = _from_spec("params")
    sees = _from_spec("sees")
    eps = _from_spec("eps")
    notes = _from_spec("notes")
    upper_bound = _from_spec("upper_bound")
    reference = _from_spec("reference")
    package_checks = _from_spec("package_checks")

    def __post_init__(self):
        if self.received is None:
            self.received = np.ones_like(self.robust, dtype=bool)

    @property
    def accuracy(self):
        """Standalone robust accuracy; None for a cascade row (it saw survivors only)."""
        if not self.standalone:
            return None
        return float(self.robust.mean()) if self.robust.size else 0.0

    @property
    def paper_accuracy(self):
        """The paper's count: last-iterate accuracy over all examples (paper attacks only)."""
        return None if self.paper is None else float(self.paper.mean())

    @property
    def n_received(self):
        """Clean-correct examples this attack attacked."""
        return int(self.received.sum())

    @property
    def n_broken(self):
        """Examples it received and broke."""
        return int((self.received & ~self.robust).sum())

    def to_json(self):
        """JSON-ready record; :meth:`from_json` restores it (``--resume``)."""
        def ints(array):
            return None if array is None else [int(v) for v in array]
        return {
            "name": self.name, "family": self.family, "with_p": self.with_p, "accuracy": self.accuracy,
            "robust_count": int(self.robust.sum()), "paper_last_iterate": self.paper_accuracy,
            "params": dict(self.params), "seed": self.seed, "seconds": self.seconds, "correct": ints(self.robust),
            "paper_correct": ints(self.paper), "autoattack_warnings": self.warnings, "autoattack_counts": self.counts,
            "sees": self.sees, "eps": self.eps, "in_worst_case": self.in_worst_case, "standalone": self.standalone,
            "received": ints(self.received), "received_count": self.n_received, "broken_count": self.n_broken,
            "order": self.order, "notes": list(self.notes), "upper_bound": self.upper_bound,
            "reference": self.reference, "package_checks": self.package_checks,
        }

    @classmethod
    def from_json(cls, record):
        """The result stored by :meth:`to_json` (older files lack the newer keys: defaults)."""
        def bools(values):
            return None if values is None else np.array(values, bool)
        return cls(spec=recorded_spec(record), seed=record["seed"], seconds=record["seconds"],
                   robust=bools(record["correct"]), paper=bools(record.get("paper_correct")),
                   warnings=list(record.get("autoattack_warnings", [])),
                   counts=dict(record.get("autoattack_counts", {})),
                   in_worst_case=record.get("in_worst_case", True), standalone=record.get("standalone", True),
                   received=bools(record.get("received")), order=record.get("order", 0))


def recorded_spec(record):
    """The :class:`AttackSpec` a results.json attack record describes: everything the report, the
    checks and ``--resume`` read. It cannot run again (no ``run``, no presets); the catalogue's
    own spec of that name does."""
    return AttackSpec(name=record["name"], family=record["family"], presets=(), run=None,
                      params=dict(record["params"]), sees=record.get("sees", "final"), eps=record.get("eps"),
                      with_p=record["with_p"], notes=tuple(record.get("notes", [])),
                      upper_bound=record.get("upper_bound"), reference=record.get("reference", False),
                      package_checks=record.get("package_checks", False))


@dataclass
class Evaluation:
    """Everything one run measured, per example; ``checks`` and ``meta`` are filled by the caller."""

    labels: np.ndarray
    clean: np.ndarray
    agreement: dict            # head index → fraction of examples where argmax aux_k = final prediction
    results: list
    skipped: list = field(default_factory=list)
    clean_seconds: float = 0.0
    cascade: bool = False
    checks: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    indicators: list = field(default_factory=list)  # indicators of attack failure (utils/evaluation/indicators.py)

    @property
    def n(self):
        return int(self.labels.size)

    @property
    def clean_accuracy(self):
        return float(self.clean.mean()) if self.n else 0.0

    def result(self, name):
        return next((r for r in self.results if r.name == name), None)

    def worst_case_results(self):
        """The attacks of the threat model: same ε as the run, not a reproduction of reference code."""
        return [r for r in self.results if r.in_worst_case]

    def missing_robust_figure(self):
        """Why this run has no robust figure (a phrase), or None: a worst case is a robust accuracy
        only when at least one attack of the threat model attacked every clean-correct example it
        counts (with the cascade, the later attacks see the survivors of that one)."""
        covered = self.worst_case_results()
        if not covered:
            return "no attack of the threat model ran (only reference reproductions or attacks at another ε)"
        if not any(bool(np.all(r.received[self.clean])) for r in covered):
            return "no attack of the threat model ran on every clean-correct example"
        return None

    def robust_accuracy(self):
        """The worst-case robust accuracy, or None when there is no robust figure."""
        if self.missing_robust_figure():
            return None
        return float(self.worst_case().mean()) if self.n else 0.0

    def worst_case(self):
        """Per example: correct clean and under every attack of the threat model."""
        worst = self.clean.copy()
        for result in self.worst_case_results():
            worst &= result.robust
        return worst

    def markdown(self):
        """The markdown report (``report.md``)."""
        return markdown_report(self, self.checks, self.meta)

    def to_json(self):
        """The JSON report (``results.json``)."""
        return json_report(self, self.checks, self.meta)
