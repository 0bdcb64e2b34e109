"""Robust-accuracy evaluation (docs/protocol.md §2, §8) of any model: :func:`evaluate_model`.

The pieces live beside this module — ``catalogue`` (the registered attacks and presets),
``runner`` (clean pass, cascade, batch size), ``results`` (per-example records), ``report``
(markdown / JSON) and ``sanity`` (masking checks); their public names are re-exported here.
"""
import torch

from models import has_reverse_attention
from utils import recipe
from utils.evaluation.autoattack_adapter import import_autoattack
from utils.evaluation.catalogue import (
    BUDGETS,
    PRESETS,
    REFERENCE_LABEL,
    AttackSpec,
    Budget,
    EvaluationError,
    Settings,
    attack_catalogue,
    attack_names,
    select_attacks,
)
from utils.evaluation.report import eps_text, json_report, markdown_report, merge_runs
from utils.evaluation.results import AttackResult, Evaluation, Outcome
from utils.evaluation.runner import (
    ATTACK_DTYPES,
    attack_seed,
    auto_batch_size,
    cascade_plan,
    clean_pass,
    head_count,
    run_attack,
    run_attacks,
)
from utils.evaluation.sanity import run_checks

__all__ = [
    "ATTACK_DTYPES",
    "BUDGETS",
    "PRESETS",
    "REFERENCE_LABEL",
    "AttackResult",
    "AttackSpec",
    "Budget",
    "Evaluation",
    "EvaluationError",
    "Outcome",
    "Settings",
    "attack_catalogue",
    "attack_names",
    "attack_seed",
    "auto_batch_size",
    "cascade_plan",
    "clean_pass",
    "count_classes",
    "default_attack_dtype",
    "eps_text",
    "evaluate_model",
    "head_count",
    "json_report",
    "markdown_report",
    "merge_runs",
    "model_device",
    "run_attack",
    "run_attacks",
    "run_checks",
    "select_attacks",
]


def model_device(model):
    """Device of the model's first parameter or buffer (CPU for a parameter-free module)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def default_attack_dtype(device):
    """bf16 autocast for our own attacks on CUDA, fp32 elsewhere."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


@torch.no_grad()
def count_classes(model, x, device):
    """Class count from one forward pass; a model that cannot take these images (built for another
    input size, say) is refused in one sentence instead of a traceback from inside its layers."""
    was_training = model.training
    model.eval()
    try:
        out = model(x[:1].to(device))
    except (RuntimeError, ValueError) as err:
        shape = "×".join(map(str, x.shape[1:]))
        raise EvaluationError(f"the model cannot classify this dataset's {shape} (C×H×W) images ("
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}); "
                              "build it for that input size or pass the --dataset it was made for") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise EvaluationError(f"the model returns {getattr(out, 'shape', type(out).__name__)}, not N×classes logits")
    return int(out.shape[1])


def choose_attacks(model, x, attacks, settings, device, full_set=()):
    """``(specs, skipped)`` for ``attacks`` on this model: its class count from one forward pass,
    its number of RA heads, RA-only attacks skipped when it has none; refuses an empty choice and
    a ``full_set`` name the catalogue does not know."""
    catalogue = attack_catalogue(settings, count_classes(model, x, device), head_count(model))
    unknown = [name for name in full_set if name not in {spec.name for spec in catalogue}]
    if unknown:
        raise EvaluationError(f"--full-set names unknown attack {unknown[0]!r}; use attack names such as autoattack")
    specs, skipped = select_attacks(attacks, catalogue, has_reverse_attention(model))
    if not specs:
        raise EvaluationError(f"no attack selected by {attacks!r}; name attacks or a preset ({', '.join(PRESETS)})")
    return specs, skipped


def evaluate_model(model, x, y, attacks="all", eps=recipe.EPS, *, aux_weight=recipe.AUX_WEIGHT, budget="full",
                   batch_size="auto", seed=0, device=None, cascade=True, attack_dtype=None,
                   joint_weights=recipe.JOINT_AUX_WEIGHTS, taus=recipe.ST_TAUS, progress=False, on_result=None,
                   finished=None, meta=None, full_set=()):
    """Evaluate any ``nn.Module`` mapping [0, 1] images (N×C×H×W) to logits (the RobustBench
    convention) under ``attacks`` (names and presets, as ``test_white_attack.py --attacks``).

    Attacks that need reverse-attention heads are skipped for models without them. Returns an
    :class:`Evaluation` whose ``checks`` hold the sanity checks and whose ``markdown()`` /
    ``to_json()`` give the report. ``batch_size="auto"`` sizes batches to the device. With the
    cascade, attacks named in ``full_set`` (e.g. ``("autoattack",)``) still run on every example.
    """
    device = torch.device(device) if device is not None else model_device(model)
    attack_dtype = attack_dtype or default_attack_dtype(device)
    if budget not in BUDGETS:
        raise EvaluationError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    if not 0 < eps <= 1:
        raise EvaluationError(f"eps must be in (0, 1] for images in [0, 1], got {eps}")
    settings = Settings(eps=eps, aux_weight=aux_weight, budget=BUDGETS[budget], joint_weights=tuple(joint_weights),
                        taus=tuple(taus))
    specs, skipped = choose_attacks(model, x, attacks, settings, device, full_set)
    note = f"{batch_size} (given)"
    if batch_size == "auto":
        batch_size, note = auto_batch_size(model, x, device, len(y))
    evaluation = run_attacks(model, x, y, specs, eps=eps, batch_size=batch_size, seed=seed, device=device,
                             cascade=cascade, attack_dtype=attack_dtype, progress=progress, skipped=skipped,
                             on_result=on_result, finished=finished, full_set=tuple(full_set))
    evaluation.checks = run_checks(evaluation)
    evaluation.meta = dict({"arch": type(model).__name__, "reverse_attention": has_reverse_attention(model),
                            "n_examples": evaluation.n, "eps": eps, "eps_text": eps_text(eps),
                            "aux_weight": aux_weight, "budget": budget, "seed": seed, "device": str(device),
                            "cascade": cascade, "full_set": list(full_set), "attack_dtype": attack_dtype,
                            "smoke": not BUDGETS[budget].evaluation},
                           **(meta or {}))
    package = import_autoattack().name if any(spec.needs_autoattack for spec in specs) else None
    evaluation.meta.update(batch_size=batch_size, batch_size_note=note, autoattack_package=package)
    return evaluation
