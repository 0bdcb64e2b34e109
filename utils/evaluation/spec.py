"""What one registered attack is (:class:`AttackSpec`): the catalogue builds these, the runner runs
them, and every :class:`~utils.evaluation.results.AttackResult` refers to the spec it measured."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Cascade cost ranks, cheap to expensive.
COST_FINAL_PGD, COST_SURROGATE_PGD, COST_APGD, COST_AUTOATTACK, COST_BLACK_BOX = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack.

    ``sees``: what its gradient (or queries) see — ``final`` logits, the RA ``heads``, ``black-box``
    queries, or a ``transfer`` surrogate. ``standalone``: always run on the full set (the paper
    protocol and the reference reproduction, whose own figures are reported, and attacks outside
    the threat model). ``all_examples``: attack every example, clean-correct or not, to keep the
    paper's last-iterate figure. ``cost``: rank in the cascade. ``reference``: reproduces the
    reference script and never enters the worst case."""

    name: str
    family: str
    presets: tuple
    run: Callable
    params: dict
    sees: str
    eps: float
    with_p: bool = False
    needs_ra: bool = False
    needs_autoattack: bool = False
    all_examples: bool = False
    standalone: bool = False
    cost: int = COST_FINAL_PGD
    reference: bool = False
    package_checks: bool = False
    upper_bound: str | None = None
    notes: tuple = field(default_factory=tuple)

    @property
    def preset(self):
        return self.presets[0]

    @property
    def bf16_ok(self):
        """Our own PGDs may run under bf16 autocast (judged in fp32); the package's attacks never."""
        return not self.needs_autoattack

    def in_threat_model(self, eps):
        """Counts in the worst case at the run's ``eps``."""
        return not self.reference and abs(self.eps - eps) <= 1e-9
