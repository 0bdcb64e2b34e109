"""RobustBench models by name, offline, and RobustBench's model-info JSON for a result
(docs/evaluation.md#robustbench-models). Optional: ``pip install -r requirements-robustbench.txt``.

The architecture comes from RobustBench's own registry (``robustbench.model_zoo.model_dicts``);
the weights from its folder layout ``MODEL_DIR/DATASET/THREAT/NAME.pt``, read with
``torch.load(weights_only=True)`` (no code runs from the file) and never downloaded here.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from models import CheckpointError, read_checkpoint
from utils import data as datasets
from utils.evaluation.catalogue import EvaluationError
from utils.evaluation.report import eps_text

RB_DATASETS = ("cifar10", "cifar100")        # the datasets this project can load
THREAT_MODELS = ("Linf", "L2")
INSTALL = "pip install -r requirements-robustbench.txt"


class RobustBenchError(EvaluationError):
    """A RobustBench model cannot be built or loaded; the message says what to do."""


def _alias_autoattack():
    """robustbench 1.1 imports the module ``autoattack``; its declared dependency pyautoattack
    installs the same code as ``pyautoattack``. Point the first name at the second when only
    pyautoattack is present."""
    if importlib.util.find_spec("autoattack") is not None or importlib.util.find_spec("pyautoattack") is None:
        return
    for name in ("", ".state"):
        sys.modules.setdefault("autoattack" + name, importlib.import_module("pyautoattack" + name))


def zoo(dataset, threat_model):
    """RobustBench's registry ``{name: {"model": builder, "gdrive_id": ...}}`` for one dataset and
    threat model."""
    try:
        _alias_autoattack()
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ImportError as err:
        raise RobustBenchError(f"--robustbench needs the robustbench package ({err}); {INSTALL}") from None
    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]


DEFAULT_MODEL_DIR = "./robustbench_models"  # its own folder (gitignored), not the project's models/ package


def weight_path(model_dir, dataset, threat_model, name):
    """RobustBench's layout: MODEL_DIR/DATASET/THREAT/NAME.pt."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def _strip(state, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def state_dict_candidates(payload):
    """The state dicts RobustBench's loader would try: the file itself or its ``state_dict``,
    with a leading ``module.`` removed, then also a leading ``model.``."""
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        return []
    plain = _strip(state, "module.")
    return [plain, _strip(plain, "model.")]


def load_weights(model, path):
    """Load ``path`` into ``model``: the first candidate whose keys match exactly. The file is read
    by ``models.read_checkpoint`` (``weights_only=True``): a file holding pickled code is refused in
    our own words, never with torch's advice to turn that safety off."""
    try:
        payload = read_checkpoint(path, what="RobustBench weight file")
    except CheckpointError as err:
        raise RobustBenchError(f"cannot read {path} as plain tensors: {err}; it must be RobustBench's weight file "
                               "for this model") from None
    wanted = set(model.state_dict())
    for state in state_dict_candidates(payload):
        if set(state) == wanted:
            model.load_state_dict(state)
            return model
    raise RobustBenchError(f"{path} does not hold the weights of this architecture (keys do not match); it must be "
                           "RobustBench's weight file for this model")


def load_robustbench(name, *, model_dir=DEFAULT_MODEL_DIR, dataset="cifar10", threat_model="Linf", device="cpu",
                     registry=None):
    """``(model, config, saved)`` of RobustBench model ``name`` as :func:`load_checkpoint` returns
    them: the zoo's architecture with the weights from ``weight_path``, in eval mode. ``registry``
    replaces RobustBench's own (tests)."""
    if dataset not in RB_DATASETS:
        raise RobustBenchError(f"--rb-dataset {dataset!r}: this project evaluates {', '.join(RB_DATASETS)}")
    registry = zoo(dataset, threat_model) if registry is None else registry
    if name not in registry:
        known = ", ".join(list(registry)[:5])
        raise RobustBenchError(f"{name!r} is not in RobustBench's {dataset} {threat_model} zoo (e.g. {known}); check "
                               "the name on robustbench.github.io")
    entry = registry[name]
    if isinstance(entry.get("gdrive_id"), list):
        raise RobustBenchError(f"{name} is an ensemble of several weight files, which --robustbench does not load")
    path = weight_path(model_dir, dataset, threat_model, name)
    if not path.is_file():
        raise RobustBenchError(f"no weights for {name} at {path}: download them once with robustbench "
                               f"(robustbench.utils.load_model({name!r}, model_dir={str(model_dir)!r}, "
                               f"dataset={dataset!r}, threat_model={threat_model!r})) or put the file there")
    model = load_weights(entry["model"](), path).to(device).eval()
    config = {"arch": f"robustbench:{name}", "num_classes": datasets.num_classes(dataset), "reverse_attention": False,
              "image_size": None, "weights": f"file {path}", "threat_model": threat_model}
    return model, config, {"dataset": dataset}


# ---------------------------------------------------------------- model-info JSON

def _acc(value):
    return None if value is None else f"{100 * value:.2f}"


EXPORT_KEYS = ("clean_acc", "autoattack_acc", "external", "footnote", "eps")  # what marks a model-info export


def is_model_info(path):
    """Whether ``path`` holds a RobustBench model-info JSON (an earlier --export-robustbench)."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and all(key in info for key in EXPORT_KEYS)


def model_info(report, *, architecture=None):
    """RobustBench's model_info JSON fields for the evaluation ``report`` (a results.json dict):
    clean accuracy, AutoAttack's own figure (when it ran on every example) and our worst case as
    the external evaluation (null, and the footnote says why, when the report has no robust
    figure). Paper fields (link, name, authors, venue, additional_data) are left for the author to fill."""
    meta = report["meta"]
    aa = next((a for a in report["attacks"] if a["name"] == "autoattack"), None)
    n, over = meta.get("n_examples", len(report["labels"])), report["worst_case"]["over"]
    if report["worst_case"].get("accuracy") is None:
        why = report["worst_case"].get("missing") or "no attack of the threat model ran on every example"
        footnote = f"No external robust accuracy: {why} (ANCRA test_white_attack.py, {n} test examples)."
    else:
        footnote = (f"External evaluation: worst case per example over {len(over)} attacks ({', '.join(over)}) "
                    f"on {n} test examples (subset seed {meta.get('subset_seed')}), ANCRA test_white_attack.py.")
    if aa is None or aa["accuracy"] is None:
        footnote += " AutoAttack did not run on every example (use --full-set autoattack)."
    return {"link": "", "name": "", "authors": "", "additional_data": None, "number_forward_passes": 1,
            "dataset": meta.get("dataset"), "venue": "", "architecture": architecture or meta.get("arch"),
            "eps": eps_text(meta["eps"]), "clean_acc": _acc(report["clean"]["accuracy"]), "reported": "",
            "autoattack_acc": _acc(aa["accuracy"]) if aa else None,
            "external": _acc(report["worst_case"]["accuracy"]), "footnote": footnote, "unreliable": False}


def check_export(meta):
    """RobustBench lists L∞ results by threat model; refuse an export of a model loaded for another."""
    if meta.get("threat_model", "Linf") != "Linf":
        raise RobustBenchError("--export-robustbench writes an L∞ evaluation; the model was loaded for "
                               f"{meta['threat_model']}")
