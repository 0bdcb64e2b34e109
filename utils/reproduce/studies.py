"""The paper's tables and figures as declarative studies: each a list of rows (which training
script, which options, which reported figures) plus, for ``figures``, the plots to draw.

A row may live in another study's run folder (``home``): the ablation's TRADES and
TRADES-ANCRA and the figures' four models are the runs of ``table1``, trained once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from utils import recipe

SCRIPTS = {"resnet": "train_CIFAR10_ResNet.py", "wideresnet": "train_CIFAR10_WideResNet.py",
           "tiny": "train_Tiny_ImageNet_PreActResNet.py", "baselines": "train_baselines.py"}


@dataclass(frozen=True)
class Row:
    """One trained model of a study."""

    name: str                   # row id, unique in the study (``--only``)
    label: str                  # as the paper names it
    kind: str                   # training script kind (a key of SCRIPTS)
    options: tuple              # training options that make this row
    arch: str                   # architecture name (run folder names, BatchNorm check)
    method: str                 # method name as the training scripts spell it (run folder names)
    reverse_attention: bool
    paper: str | None = None  # key into paper.REPORTED
    home: str | None = None   # study whose run folder holds the run (None: this study)
    seed: int | None = None   # with several --seeds: this row's training seed (None: the invocation's one seed)
    base: str | None = None   # with several --seeds: the study row this is one seed of

    @property
    def method_row(self):
        """The study row's name, the same for every seed of it."""
        return self.base or self.name

    @property
    def seed_label(self):
        """The paper's name, with the seed when the row is one of several seeds."""
        return self.label if self.seed is None else f"{self.label} (seed {self.seed})"

    @property
    def script(self):
        """The training script that trains this row."""
        return SCRIPTS[self.kind]

    @property
    def shares_final_bn(self):
        """RA WideResNets and PreActResNets use one final BatchNorm for both RA blocks and the end."""
        return self.reverse_attention and (self.arch.startswith("wrn-") or self.arch == "preact-resnet18")


@dataclass(frozen=True)
class Figure:
    """A plot of the ``figures`` study: histograms over several rows' features, or one row's UMAP."""

    name: str
    kind: str      # "hist" or "umap"
    rows: tuple


@dataclass(frozen=True)
class Study:
    """A paper table (rows evaluated) or the figures (rows only trained, then plotted)."""

    name: str
    title: str
    dataset: str
    rows: tuple
    evaluate: bool = True
    figures: tuple = ()
    default_epochs: int | None = None   # None: the paper's 120 (milestones scaled otherwise)
    rows_per_device: int = 1            # rows run at once on one device unless --rows-per-gpu says otherwise
    verdict: bool = False               # the table adds the verdict (utils/reproduce/verdict.py)

    def row(self, name):
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)


def _baseline(method, label, paper_prefix, home=None):
    return Row(method, label, "baselines", ("--method", method, "--arch", "resnet18"), "resnet18", method, False,
               f"{paper_prefix}/{method}", home)


def _ancra(method, label, paper_prefix, home=None, extra=(), name=None):
    name = name or f"{method}-ancra"
    return Row(name, label, "resnet", ("--method", method) + tuple(extra), "resnet18", name,
               "--no-ra" not in extra, f"{paper_prefix}/{name}", home)


def _resnet_six(prefix, home=None):
    return (_baseline("pgd-at", "PGD-AT", prefix, home), _baseline("trades", "TRADES", prefix, home),
            _baseline("mart", "MART", prefix, home), _ancra("pgd-at", "PGD-AT-ANCRA", prefix, home),
            _ancra("trades", "TRADES-ANCRA", prefix, home), _ancra("mart", "MART-ANCRA", prefix, home))


def _wrn(depth, widen):
    name = f"wrn-{depth}-{widen}-trades-ancra"
    return Row(name, f"WRN-{depth}-{widen} TRADES-ANCRA", "wideresnet",
               ("--method", "trades", "--depth", str(depth), "--widen", str(widen)), f"wrn-{depth}-{widen}",
               "trades-ancra", True, f"wrn/{name}")


def _separate_bn(row):
    """The ablation of ``row`` with one BatchNorm per RA block (not in the paper: no reported figures)."""
    return replace(row, name=f"{row.name}-sepbn", label=f"{row.label} (separate RA BatchNorms)",
                   options=row.options + ("--separate-bn",), method=f"{row.method}_sepbn", paper=None)


def _tiny(method, label):
    return Row(f"{method}-ancra", label, "tiny", ("--method", method), "preact-resnet18", f"{method}-ancra", True,
               f"tiny/{method}-ancra")


_TABLE1 = _resnet_six("cifar10")
VERDICT_ROWS = ("pgd-at", "trades", "trades-ancra")
VERDICT_EPOCHS = 15
_T1 = {row.name: row for row in _TABLE1}


def _shared(name, paper=None):
    """Table 1's row ``name``, trained once in table1's run folder."""
    return replace(_T1[name], home="table1", paper=paper or _T1[name].paper)



STUDIES = {study.name: study for study in (
    Study("table1", "ResNet-18 on CIFAR-10 (paper Table 1, Table 2 for \"with p\")", "cifar10", _TABLE1),
    Study("ablation", "TRADES ablation, ResNet-18 on CIFAR-10 (paper Table 3)", "cifar10", (
        _shared("trades", "ablation/trades"),
        _ancra("trades", "TRADES-ANC", "ablation", extra=("--no-ra",), name="trades-anc"),
        _ancra("trades", "TRADES-RA", "ablation", extra=("--no-anc",), name="trades-ra"),
        _shared("trades-ancra", "ablation/trades-ancra"))),
    Study("cifar100", "ResNet-18 on CIFAR-100 (paper Table 1)", "cifar100", _resnet_six("cifar100")),
    Study("wrn", "WideResNet TRADES-ANCRA on CIFAR-10 (official README; -sepbn: our BatchNorm ablation)", "cifar10",
          (_wrn(34, 10), _wrn(28, 10), _separate_bn(_wrn(34, 10)))),
    Study("tiny-imagenet", "PreActResNet-18 on Tiny-ImageNet (official README)", "tiny-imagenet", (
        _tiny("pgd-at", "PGD-AT-ANCRA"), _tiny("trades", "TRADES-ANCRA"), _tiny("mart", "MART-ANCRA"))),
    Study("figures", "Feature figures from the table1 models (paper Fig. 1, Fig. 3, UMAP)", "cifar10",
          tuple(_shared(name) for name in ("pgd-at", "trades", "mart", "trades-ancra")), evaluate=False,
          figures=(Figure("fig1", "hist", ("pgd-at", "trades", "mart")),
                   Figure("fig3", "hist", ("pgd-at", "trades", "mart", "trades-ancra")),
                   Figure("umap_trades-ancra", "umap", ("trades-ancra",)))),
    Study("verdict", ("Does TRADES-ANCRA stay above TRADES once the evaluation sees through RA's gate? ResNet-18, "
                      "CIFAR-10, shortened schedule, whole suite"), "cifar10",
          tuple(_T1[name] for name in VERDICT_ROWS), default_epochs=VERDICT_EPOCHS,
          rows_per_device=len(VERDICT_ROWS), verdict=True),
)}


def scale_milestones(epochs, base=recipe.MILESTONES, base_epochs=recipe.EPOCHS):
    """The recipe's lr milestones scaled to ``epochs`` (75/90/100 of 120), rounded half up, then made
    strictly increasing and at least 1 (a milestone at or past ``epochs`` leaves the lr unchanged)."""
    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    scaled = []
    for milestone in base:
        value = max(1, math.floor(epochs * milestone / base_epochs + 0.5))
        if scaled and value <= scaled[-1]:
            value = scaled[-1] + 1
        scaled.append(value)
    return tuple(scaled)


def run_name(row, dataset, seed, epochs, smoke=False):
    """The run folder name: the training scripts' default ``<dataset>_<arch>_<method>_s<seed>``, with
    ``_e<N>`` for a schedule other than the paper's and a ``smoke_`` prefix for smoke runs."""
    name = f"{dataset}_{row.arch}_{row.method}_s{seed}"
    if epochs != recipe.EPOCHS:
        name += f"_e{epochs}"
    return ("smoke_" if smoke else "") + name


def select_rows(study, only):
    """The rows named in ``only`` (comma-separated, in study order), or all; unknown names raise ValueError."""
    if not only:
        return study.rows
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in {r.name for r in study.rows}]
    if unknown:
        raise ValueError(f"study {study.name} has no row {', '.join(unknown)}; its rows are "
                         f"{', '.join(r.name for r in study.rows)}")
    return tuple(r for r in study.rows if r.name in wanted)


def seeded_rows(rows, seeds):
    """The rows once per training seed: unchanged for one seed (today's names and run folders), else
    ``NAME-sSEED`` rows, seed by seed (all rows of the first seed, then the next), so the rows of
    one seed run side by side before the next seed's."""
    if len(seeds) == 1:
        return tuple(rows)
    return tuple(replace(row, name=f"{row.name}-s{seed}", seed=seed, base=row.name) for seed in seeds for row in rows)


def parse_seeds(text):
    """``"0,1,2"`` → ``(0, 1, 2)``; empty, negative, repeated or non-integer seeds raise ValueError."""
    try:
        seeds = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ValueError(f"--seeds takes integers separated by commas (e.g. 0,1,2), got {text!r}") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds takes distinct seeds of 0 or more, got {text!r}")
    return seeds


def describe_studies():
    """The text ``--list`` prints: every study and its rows with their training commands."""
    lines = []
    for study in STUDIES.values():
        lines.append(f"{study.name}: {study.title} [dataset {study.dataset}]")
        for row in study.rows:
            where = f"  (run of {row.home})" if row.home else ""
            lines.append(f"  {row.name:<24} {row.label:<26} python {row.script} {' '.join(row.options)}{where}")
        for figure in study.figures:
            lines.append(f"  figure {figure.name}: {figure.kind} of {', '.join(figure.rows)}")
    return "\n".join(lines)
