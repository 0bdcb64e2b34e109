"""Every folder a documented command writes by default is ignored by git (.gitignore), so runs,
results, figures, evaluations and downloaded weights are never committed by accident. The
folders are read from the commands' own defaults, not typed here."""
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

import draw_hist
import draw_umap
import feature_distance
import reproduce
from train import DEFAULTS
from utils.evaluation import robustbench
from utils.evaluation.command import _default_out_dir, parse_args
from utils.training.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def default_output_folders():
    folders = {
        "training runs": build_parser(DEFAULTS).get_default("out_dir"),
        "reproduce.py": reproduce.parse_args(["table1"]).out_dir,
        "feature_distance.py": feature_distance.parse_args(["--ckpt", "x.pt"]).out_dir,
        "draw_hist.py": draw_hist.parse_args(["a.npz"]).out_dir,
        "draw_umap.py": draw_umap.parse_args(["--ckpt", "x.pt"]).out_dir,
        "robustbench weights": robustbench.DEFAULT_MODEL_DIR,
        "evaluation of a factory model": str(_default_out_dir(parse_args(["--model-factory", "m.py:build"]),
                                                              datetime(2026, 1, 2, 3, 4, 5))),
    }
    return {name: Path(folder) for name, folder in folders.items()}


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_default_output_folder_is_ignored_by_git():
    folders = default_output_folders()
    assert len(folders) == 7
    probes = [str(folder / "probe.txt") for folder in folders.values()]
    done = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=ROOT, capture_output=True, text=True)
    ignored = set(done.stdout.split())
    assert [name for name, probe in zip(folders, probes) if probe not in ignored] == []
