"""The figures the paper and its official README report, keyed the way our evaluation names
its attacks (``natural``, ``pgd40``, ``fgsm``, ``cw40``, ``autoattack`` and their ``+p`` forms).

All at ε = 8/255, in percent. Sources: paper Table 1 (ResNet-18, CIFAR-10 and CIFAR-100),
paper Table 2 (the ANCRA rows attacked "with p"), paper Table 3 (the TRADES ablation), and the
official README (WideResNet on CIFAR-10, PreActResNet-18 on Tiny-ImageNet).
"""
from dataclasses import dataclass, field

COLUMNS = ("natural", "pgd40", "fgsm", "cw40", "autoattack", "pgd40+p", "fgsm+p", "cw40+p", "autoattack+p")
HEADINGS = {"natural": "Nat", "pgd40": "PGD-40", "fgsm": "FGSM", "cw40": "C&W", "autoattack": "AA",
            "pgd40+p": "PGD-40+p", "fgsm+p": "FGSM+p", "cw40+p": "C&W+p", "autoattack+p": "AA+p"}


@dataclass(frozen=True)
class Reported:
    """One row of reported figures: where they come from, on which dataset, and the numbers."""

    source: str
    dataset: str
    figures: dict = field(default_factory=dict)
    note: str = ""


def _row(source, dataset, names, values, note=""):
    return Reported(source, dataset, dict(zip(names, values)), note)


_T1 = ("natural", "pgd40", "fgsm", "cw40", "autoattack")
_WITH_P = ("pgd40+p", "fgsm+p", "cw40+p")
_T1_SRC = "paper Table 1"
_T12_SRC = "paper Tables 1 and 2"
_TABLE3_NOTE = ("paper Table 3 gives the RA models' PGD/FGSM/C&W attacked with p (they equal Table 2's "
                "\"with p\" figures for TRADES-ANCRA); AA as in Table 1")

REPORTED = {
    # ResNet-18, CIFAR-10
    "cifar10/pgd-at": _row(_T1_SRC, "cifar10", _T1, (80.90, 44.35, 58.41, 46.72, 42.14)),
    "cifar10/trades": _row(_T1_SRC, "cifar10", _T1, (78.92, 48.40, 59.60, 47.59, 45.44)),
    "cifar10/mart": _row(_T1_SRC, "cifar10", _T1, (79.03, 48.90, 60.86, 45.92, 43.88)),
    "cifar10/pgd-at-ancra": _row(_T12_SRC, "cifar10", _T1 + _WITH_P,
                                 (85.10, 89.03, 87.00, 89.23, 59.15, 54.43, 58.23, 66.36)),
    "cifar10/trades-ancra": _row(_T12_SRC, "cifar10", _T1 + _WITH_P,
                                 (81.70, 82.96, 82.74, 83.01, 59.70, 61.68, 61.56, 72.36)),
    "cifar10/mart-ancra": _row(_T12_SRC, "cifar10", _T1 + _WITH_P,
                               (84.88, 88.56, 87.95, 88.77, 59.62, 56.96, 60.43, 71.06)),
    # ResNet-18, CIFAR-10 ablation (paper Table 3)
    "ablation/trades-anc": _row("paper Table 3", "cifar10", _T1, (80.77, 54.18, 63.44, 49.84, 48.51)),
    "ablation/trades-ra": _row("paper Table 3", "cifar10", ("natural",) + _WITH_P + ("autoattack",),
                               (80.46, 61.59, 61.48, 72.15, 61.02), _TABLE3_NOTE),
    # ResNet-18, CIFAR-100
    "cifar100/pgd-at": _row(_T1_SRC, "cifar100", _T1, (56.21, 19.41, 30.00, 41.76, 17.76)),
    "cifar100/trades": _row(_T1_SRC, "cifar100", _T1, (53.46, 25.37, 32.97, 43.59, 21.35)),
    "cifar100/mart": _row(_T1_SRC, "cifar100", _T1, (53.26, 25.06, 33.35, 38.07, 21.04)),
    "cifar100/pgd-at-ancra": _row(_T1_SRC, "cifar100", _T1, (59.73, 58.10, 58.45, 58.58, 34.44)),
    "cifar100/trades-ancra": _row(_T1_SRC, "cifar100", _T1, (53.73, 51.24, 52.17, 52.55, 35.81)),
    "cifar100/mart-ancra": _row(_T1_SRC, "cifar100", _T1, (60.10, 58.40, 58.74, 59.41, 35.05)),
    # WideResNet, CIFAR-10 (official README)
    "wrn/wrn-34-10-trades-ancra": _row("official README", "cifar10", ("natural", "autoattack"), (83.19, 66.28)),
    "wrn/wrn-28-10-trades-ancra": _row("official README", "cifar10", ("natural", "autoattack"), (83.61, 65.87)),
    # PreActResNet-18, Tiny-ImageNet (official README)
    "tiny/pgd-at-ancra": _row("official README", "tiny-imagenet", ("natural", "pgd40"), (43.02, 29.79)),
    "tiny/trades-ancra": _row("official README", "tiny-imagenet", ("natural", "pgd40"), (38.94, 31.24)),
    "tiny/mart-ancra": _row("official README", "tiny-imagenet", ("natural", "pgd40"), (43.83, 31.44)),
}

# The ablation's TRADES-ANCRA row as paper Table 3 prints it (with-p figures for PGD/FGSM/C&W).
REPORTED["ablation/trades-ancra"] = _row("paper Table 3", "cifar10", ("natural",) + _WITH_P + ("autoattack",),
                                         (81.70, 61.68, 61.56, 72.36, 59.70), _TABLE3_NOTE)
REPORTED["ablation/trades"] = _row("paper Table 3", "cifar10", _T1, (78.92, 48.40, 59.60, 47.59, 45.44))


def reported(key):
    """The :class:`Reported` figures under ``key``, or None when the paper gives none."""
    return REPORTED.get(key) if key else None
