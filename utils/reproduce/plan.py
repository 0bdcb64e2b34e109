"""One invocation's settings and where everything of a study lives on disk.

OUT/STUDY/runs/<run-name>/ is an ordinary run folder of the training scripts (resumable by hand
with ``--resume``); its evaluation goes to ``eval_reproduce_n<N>_<budget>/`` inside it; the
study's table.md, table.json and state.json sit in OUT/STUDY/, figures in OUT/figures/<tag>/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils import recipe
from utils.reproduce.studies import Study, run_name

ROOT = Path(__file__).resolve().parents[2]
SMOKE_EXAMPLES = 16


@dataclass(frozen=True)
class Plan:
    """What to run: the study, its selected rows, the schedule and evaluation size, the devices."""

    study: Study
    rows: tuple
    out_dir: Path
    dataset: str
    epochs: int
    milestones: tuple
    n_examples: int
    seed: int = 0
    smoke: bool = False
    data_dir: str | None = None
    slots: tuple = (None,)   # CUDA_VISIBLE_DEVICES of each concurrent row ("0", "1,2", ...) or (None,)
    nproc: int = 1           # processes per training run (torchrun when > 1)
    seeds: tuple = ()        # every training seed when there are several (each row then has its seed); else ()

    @property
    def seed_list(self):
        """The training seeds of this invocation (one row per seed and study row)."""
        return tuple(self.seeds) or (self.seed,)

    def seed_of(self, row):
        """The training (and attack) seed of ``row``."""
        return self.seed if row.seed is None else row.seed

    @property
    def budget(self):
        """Attack budget of the evaluation: small for smoke runs, else full."""
        return "small" if self.smoke else "full"

    @property
    def study_dir(self):
        """OUT/STUDY: table.md, table.json, state.json."""
        return self.out_dir / self.study.name

    def runs_dir(self, row):
        """Parent of the row's run folder (its home study's runs/)."""
        return self.out_dir / (row.home or self.study.name) / "runs"

    def run_dir(self, row):
        """The row's training run folder."""
        return self.runs_dir(row) / run_name(row, self.dataset, self.seed_of(row), self.epochs, self.smoke)

    def eval_dir(self, row):
        """The row's evaluation folder inside its run folder (size and budget in the name)."""
        return self.run_dir(row) / f"eval_reproduce_n{self.n_examples}_{self.budget}"

    def bn_file(self, row):
        """The row's BatchNorm check result."""
        return self.eval_dir(row) / "batchnorm.json"

    @property
    def figures_dir(self):
        """OUT/figures/<tag>: the figures of this dataset, seed and schedule."""
        tag = f"{'smoke_' if self.smoke else ''}{self.dataset}_s{self.seed}"
        if self.epochs != recipe.EPOCHS:
            tag += f"_e{self.epochs}"
        return self.out_dir / "figures" / tag

    def features_file(self, row):
        """The row's class-0 feature distances (.npz of feature_distance.py)."""
        return self.figures_dir / "features" / f"{row.name}_class0.npz"

    def schedule_text(self):
        """The training schedule in words."""
        milestones = " ".join(str(m) for m in self.milestones)
        return f"{self.epochs} epochs, lr x0.1 after epochs {milestones}"
