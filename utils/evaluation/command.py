"""Robust accuracy of a checkpoint, or of any model built by a Python function: the paper's
white-box protocol (docs/protocol.md §2) and an adaptive evaluation that sees through reverse
attention (§8), with sanity checks for gradient masking, run as a cascade by default.

This module is the library behind ``test_white_attack.py``: :func:`parse_args` and :func:`main`
are its command line, and :func:`load_checkpoint`, :func:`build_factory_model` and
:func:`load_test_subset` are the typed pieces other commands (``reproduce.py``, the feature
scripts) use to see exactly the model and the fixed test subset the evaluation sees.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import shlex
import sys
from datetime import datetime
from pathlib import Path

import torch

from models import (
    NORMALIZATION_HELP,
    CheckpointError,
    arch_help,
    has_reverse_attention,
    load_model,
    parse_normalization,
    read_checkpoint,
)
from models.loading import saved_args
from utils import data as datasets
from utils import recipe
from utils.cli import (
    InertOptionError,
    OneLineArgumentParser,
    OnlyWith,
    add_device_argument,
    batch_size_type,
    eps_type,
    explicit_options,
    positive_float,
    positive_float_list,
    positive_int,
    refuse_inert,
    resolve_device,
    run_cli,
    sigterm_as_interrupt,
)
from utils.evaluation import compare, review
from utils.evaluation.autoattack_adapter import AutoAttackUnavailable
from utils.evaluation.catalogue import BUDGETS, PRESETS, EvaluationError, Settings
from utils.evaluation.options import (
    OutputError,
    check_output_dir,
    create_output_dir,
    create_unique_dir,
    write_json,
    write_text,
)
from utils.evaluation.report import eps_text
from utils.evaluation.results import AttackResult
from utils.evaluation.suite import (
    ATTACK_DTYPES,
    choose_attacks,
    count_classes,
    default_attack_dtype,
    evaluate_model,
    head_count,
)
from utils.locks import FolderLock, LockError, check_unlocked

DESCRIPTION = """Robust accuracy of a checkpoint, or of any model built by a Python function: the paper's
white-box protocol (docs/protocol.md §2) and an adaptive evaluation that sees through reverse
attention (§8), with sanity checks for gradient masking, run as a cascade by default.

Writes report.md and results.json (every attack's accuracy, parameters, seed, time and
per-example correctness) to --out-dir, saving each finished attack as it goes (--resume picks
up an interrupted run), and prints the markdown report.
"""
PARTIAL = "results.partial.json"
RESUME_KEYS = ("model", "weights", "indices", "seed", "eps", "budget", "aux_weight", "joint_weights", "taus",
               "cascade", "full_set", "attack_dtype", "attacks_requested",
               # what changes the model or the data (the content of the files, not their paths)
               "checkpoint_sha256", "factory_sha256", "weights_sha256", "normalize", "reverse_attention_option",
               "arch_option", "num_classes_option", "no_ema", "dataset", "data_dir", "n_examples", "subset_seed")
KEY_TEXT = {"checkpoint_sha256": "the checkpoint file's content (SHA-256)",
            "factory_sha256": "the --model-factory file's content (SHA-256)",
            "weights_sha256": "the --weights file's content (SHA-256)", "normalize": "--normalize",
            "reverse_attention_option": "--reverse-attention", "arch_option": "--arch",
            "num_classes_option": "--num-classes", "no_ema": "--no-ema", "data_dir": "the data folder",
            "indices": "the test subset", "attacks_requested": "--attacks"}


def name_list(text):
    """argparse type: comma-separated attack names."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _model_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", nargs="+", help="checkpoint in this project's format, or a reference state dict; "
                                                  "several: compare them on one subset (docs/evaluation.md#for-reviewers)")
    source.add_argument("--model-factory", metavar="FILE.py:FUNCTION",
                        help="build any model: FUNCTION() in FILE.py returns an nn.Module mapping [0,1] images to logits")
    review.add_model_source(source)
    model = parser.add_argument_group("model (default: from the checkpoint)")
    model.add_argument("--weights", default=None, help="with --model-factory: a state dict loaded into the module")
    model.add_argument("--arch", default=None, help=arch_help())
    model.add_argument("--num-classes", type=int, default=None)
    model.add_argument("--reverse-attention", choices=("on", "off"), default=None,
                       help="RA or plain: required for a state dict without a saved config (RA adds no parameters, "
                            "so it cannot be read from the weights)")
    model.add_argument("--normalize", type=parse_normalization, default=None, metavar="PRESET|MEAN/STD",
                       help=NORMALIZATION_HELP)
    model.add_argument("--no-ema", action="store_true", help="evaluate the raw weights even if the checkpoint has EMA")


def _attack_arguments(parser):
    attack = parser.add_argument_group("attacks")
    attack.add_argument("--attacks", default="all",
                        help=f"comma-separated attack names and/or presets {', '.join(PRESETS)} (default all; "
                             "'reference' is not part of all)")
    attack.add_argument("--protocol", choices=("paper", "reference"), default="paper",
                        help="reference: also run the reference evaluation script's FGSM and C&W-20 (the 'reference' "
                             "preset; they reproduce the reference code and never enter the worst case)")
    attack.add_argument("--eps", type=eps_type, default=recipe.EPS,
                        help="L∞ budget: 8/255 (default), 0.031 or 8 (pixel units)")
    attack.add_argument("--aux-weight", type=positive_float, default=recipe.AUX_WEIGHT,
                        help="λ of the 'with p' attacks (default 2.0)")
    attack.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="strength of the adaptive/sanity attacks: full (default) or small (CPU smoke runs)")
    attack.add_argument("--joint-weights", type=positive_float_list, default=recipe.JOINT_AUX_WEIGHTS,
                        help="aux weights of the joint attacks (default 0.5,2,8)")
    attack.add_argument("--taus", type=positive_float_list, default=recipe.ST_TAUS,
                        help="temperatures of the straight-through attacks (default 0.1,1,10)")
    attack.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts (default 0)")
    attack.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=True,
                        help="run each non-paper attack only on the examples earlier attacks failed to break "
                             "(default; the worst case is the same); --no-cascade runs every attack on every example")
    attack.add_argument("--full-set", type=name_list, default=(), metavar="NAME,...",
                        help="with the cascade: these attacks still run on every example so their own figure is "
                             "reported (e.g. autoattack,autoattack+p for the paper's AA column); the paper's "
                             "FGSM/PGD-40/C&W always do")
    attack.add_argument("--attack-dtype", choices=ATTACK_DTYPES, default=None,
                        help="bf16 autocast for our own attacks, every judgment in fp32 (default bf16 on CUDA, "
                             "fp32 on CPU); AutoAttack always runs in fp32")


def _always_standalone(args):
    """``--full-set`` names of attacks that run on every example anyway (the paper's FGSM/PGD-40/C&W,
    the reference reproductions, attacks at another ε)."""
    return [s.name for s in args.specs if s.name in args.full_set and s.standalone]


def _full_set_idle(args):
    """``--full-set`` names that would change nothing: not among the attacks --attacks selects (the
    RA-only ones skipped for a plain model count as selected: the report lists them as skipped),
    or attacks that always run on every example."""
    chosen = {s.name for s in args.specs} | set(args.skipped)
    return [name for name in args.full_set if name not in chosen] + _always_standalone(args)


def _full_set_why(args):
    idle = _full_set_idle(args)
    if any(name not in _always_standalone(args) for name in idle):
        return f"--attacks {args.attacks} does not run {', '.join(idle)}"
    return f"{', '.join(idle)} always run on every example"


def _uses(args, test):
    return any(test(spec) for spec in args.specs)


def _no_heads_or(why):
    """The reason an RA-attack option is idle: the model has no heads, else ``why(args)``."""
    return lambda a: "the model has no RA heads, so no attack uses it" if not a.heads else why(a)


# Options that would change nothing (utils.cli.refuse_inert), kept as data. PARSE_RULES need only the
# arguments; ATTACK_RULES also see the model (``heads``) and the attacks chosen for it (``specs``,
# ``skipped``), and are checked after loading, before any output is created.
PARSE_RULES = (
    OnlyWith(("full_set",), lambda a: a.cascade,
             "with --no-cascade every attack already runs on every example"),
    OnlyWith(("weights",), lambda a: a.model_factory,
             "a checkpoint's weights come from --ckpt; --weights goes with --model-factory"),
    OnlyWith(("model_dir", "threat_model", "rb_dataset"), lambda a: a.robustbench,
             "they choose RobustBench's weights, so they go with --robustbench NAME"),
)
ATTACK_RULES = (
    OnlyWith(("aux_weight",), lambda a: _uses(a, lambda s: s.params.get("aux_weight")),
             _no_heads_or(lambda a: f"--attacks {a.attacks} runs no attack with p (λ weighs the RA heads only there)")),
    OnlyWith(("joint_weights",), lambda a: _uses(a, lambda s: s.family == "joint"),
             _no_heads_or(lambda a: f"--attacks {a.attacks} runs no joint attack")),
    OnlyWith(("taus",), lambda a: _uses(a, lambda s: s.family == "straight-through"),
             _no_heads_or(lambda a: f"--attacks {a.attacks} runs no straight-through attack")),
    OnlyWith(("full_set",), lambda a: not _full_set_idle(a), _full_set_why),
    OnlyWith(("export_robustbench",), lambda a: _uses(a, lambda s: s.in_threat_model(a.eps)),
             lambda a: f"--attacks {a.attacks} runs no attack of the threat model, so there is no robust accuracy "
                       "to export"),
)


def check_attack_options(args, models):
    """Refuse (:class:`InertOptionError`, one sentence) an option written on the command line that the
    attacks chosen for the evaluated models would not use. ``models``: ``(specs, skipped, heads)`` of
    each model (several with ``--ckpt a.pt b.pt``: an option is refused when no model would use it)."""
    given = set(getattr(args, "given_options", ()))
    views = [argparse.Namespace(**vars(args), specs=specs, skipped=skipped, heads=heads)
             for specs, skipped, heads in models]
    for rule in ATTACK_RULES:
        if not any(rule.applies(view) for view in views):
            refuse_inert((rule,), views[0], given)


# What --budget smoke sets unless given: no cascade (otherwise the first attacks break every example
# of a smoke model and the adaptive families and AutoAttack receive none), one joint weight and one
# straight-through temperature (every family still runs, in under 2 minutes on 2 CPU cores).
SMOKE_PRESET = {"cascade": False, "joint_weights": (recipe.AUX_WEIGHT,), "taus": (1.0,)}


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=sorted(datasets.DATASETS), default=None,
                      help="default: the dataset in the checkpoint's saved args")
    data.add_argument("--data-dir", default=None,
                      help="dataset folder (default: ./data if it exists, else the checkpoint's; printed)")
    data.add_argument("--n-examples", type=positive_int, default=1000, help="size of the fixed test subset (default 1000)")
    data.add_argument("--subset-seed", type=int, default=0, help="seed of the fixed test subset (default 0)")
    _attack_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=batch_size_type, default="auto",
                     help="examples per batch, or auto (default): from free CUDA memory (docs/evaluation.md), 128 on CPU")
    add_device_argument(run)
    run.add_argument("--out-dir", default=None, help="default: CKPT_FOLDER/eval_TIMESTAMP (./eval_TIMESTAMP with "
                                                      "--model-factory)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out-dir, skipping finished attacks")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-attack lines on stderr")
    review.add_arguments(parser)
    args = parser.parse_args(argv)
    args.given_options = sorted(explicit_options(parser, argv))  # for the options that would change nothing
    if args.budget == "smoke":  # the preset: every family receives every example, one weight and temperature each
        for name, value in SMOKE_PRESET.items():
            if name not in args.given_options:
                setattr(args, name, value)
    try:
        refuse_inert(PARSE_RULES, args, set(args.given_options))
    except InertOptionError as err:
        parser.error(str(err))
    args.compare = args.ckpt if args.ckpt and len(args.ckpt) > 1 else None
    args.ckpt = args.ckpt[0] if args.ckpt else None
    review.check_args(parser, args)
    try:  # "auto" becomes "cuda" or "cpu"; a device that is not here is refused before any work
        args.device = str(resolve_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    if args.resume and not args.out_dir:
        parser.error("--resume needs the --out-dir of the run to continue")
    if args.protocol == "reference" and "reference" not in args.attacks.split(","):
        args.attacks = f"{args.attacks},reference" if args.attacks.strip() else "reference"
    return args


def load_checkpoint(path, *, arch=None, num_classes=None, reverse_attention=None, normalization=None,
                    use_ema=True, device="cpu"):
    """``(model, config, saved_args)`` of a checkpoint: the model in eval mode on ``device``, its
    config (arch, num_classes, reverse_attention, image_size, ...) and the checkpoint's saved
    training args (``{}`` for a bare state dict). ``reverse_attention`` is None (read it from the
    checkpoint), True or False; the other overrides are None to use what the checkpoint says."""
    payload = read_checkpoint(path)
    model, config = load_model(payload, arch, num_classes, reverse_attention, device=device, use_ema=use_ema,
                               normalization=normalization)
    return model, config, saved_args(payload)


def _checkpoint_from_args(args):
    ra = None if args.reverse_attention is None else args.reverse_attention == "on"
    return load_checkpoint(args.ckpt, arch=args.arch, num_classes=args.num_classes, reverse_attention=ra,
                           normalization=args.normalize, use_ema=not args.no_ema, device=args.device)


def _import_factory(spec):
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise EvaluationError(f"--model-factory wants FILE.py:FUNCTION, got {spec!r}")
    if not Path(path).is_file():
        raise EvaluationError(f"--model-factory file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"model_factory_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise EvaluationError(f"{path} has no function {name}")
    return getattr(module, name)


def _load_weights(model, path):
    state = read_checkpoint(path, what="--weights file")  # missing, empty, truncated, a folder: one sentence
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    missing, unexpected = [], []
    try:
        result = model.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    except (RuntimeError, TypeError, AttributeError) as err:
        raise EvaluationError(f"--weights {path} do not fit the module ({str(err).splitlines()[0]})") from None
    if missing or unexpected:
        raise EvaluationError(f"--weights {path} do not fit the module: {len(missing)} missing and {len(unexpected)} "
                              f"unexpected keys (first: {(missing + unexpected)[0]})")


def build_factory_model(spec, weights=None, device="cpu"):
    """``(model, config, {})`` from ``FILE.py:FUNCTION`` (and an optional state dict ``weights``)."""
    model = _import_factory(spec)()
    if not isinstance(model, torch.nn.Module):
        raise EvaluationError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        _load_weights(model, weights)
    model = model.to(device).eval()
    config = {"arch": type(model).__name__, "num_classes": None, "reverse_attention": has_reverse_attention(model),
              "image_size": None, "weights": "file " + weights if weights else "as built"}
    return model, config, {}


@dataclasses.dataclass(frozen=True)
class TestSubset:
    """The fixed test subset an evaluation attacks: images in [0, 1] (float), labels, the indices
    of the examples in the test split, and where the data came from."""

    dataset: str
    x: torch.Tensor
    y: torch.Tensor
    indices: list
    data_dir: str | None


def load_test_subset(config, saved, *, n_examples, dataset=None, data_dir=None, subset_seed=0, source="the model"):
    """The fixed test subset of ``n_examples`` drawn with ``subset_seed`` from the test split of
    ``dataset`` (default: the one in the checkpoint's ``saved`` args), checked against the model's
    ``config`` (classes, image size). ``source`` names the model in error messages."""
    dataset = dataset or saved.get("dataset")
    if not dataset:
        raise EvaluationError(f"{source} does not record its dataset; pass --dataset")
    if config["num_classes"] is not None and datasets.num_classes(dataset) != config["num_classes"]:
        raise EvaluationError(f"the model has {config['num_classes']} classes but {dataset} has "
                              f"{datasets.num_classes(dataset)}; pass the --dataset it was trained on")
    size = config.get("image_size") or saved.get("image_size") or datasets.image_size(dataset)
    if dataset == "synthetic" and n_examples > datasets.max_synthetic_size(size):
        raise EvaluationError(f"--n-examples {n_examples} is more synthetic {size}×{size} images than fit in memory; "
                              f"use at most {datasets.max_synthetic_size(size)}")
    data_dir = datasets.resolve_data_dir(dataset, data_dir, saved.get("data_dir"), source=source)
    # synthetic: example i is the same whatever the split's size (utils.data.make_synthetic)
    test = datasets.load_dataset(dataset, data_dir, "test", synthetic_image_size=size,
                                 synthetic_size=max(n_examples, datasets.SYNTHETIC_SIZES["test"]),
                                 seed=int(saved.get("data_seed") or 0))
    if n_examples > len(test):
        raise EvaluationError(f"--n-examples {n_examples} is more than the {len(test)} test images of {dataset}; "
                              f"use at most {len(test)}")
    if config.get("image_size") and test.x.shape[-1] != size:
        raise EvaluationError(f"the model expects {size}×{size} images but {dataset} has "
                              f"{test.x.shape[-1]}×{test.x.shape[-1]}; pass the --dataset it was trained on")
    # fixed_subset picks examples by a seeded permutation; labelling each example by its own
    # index recovers which ones, so results.json can name them.
    order = datasets.fixed_subset(datasets.TensorPair(test.x, torch.arange(len(test)), test.classes),
                                  n_examples, seed=subset_seed).y
    subset = test.subset(order)
    return TestSubset(dataset, subset.float(), subset.y, order.tolist(), data_dir)


@torch.no_grad()
def _check_classes(model, x, dataset, device):
    """The model's logits must have one entry per class of the dataset."""
    width = count_classes(model, x, device)  # one sentence for a model that cannot take these images
    if width != datasets.num_classes(dataset):
        raise EvaluationError(f"the model outputs {width} logits but {dataset} has {datasets.num_classes(dataset)} "
                              "classes; pass the --dataset it was trained on")


@torch.no_grad()
def check_finite_logits(model, x, device, batch_size=256):
    """Refuse, before any attack, a model whose clean logits hold NaN or ±inf on the subset: every
    comparison with NaN is False, so such a model would read as never broken."""
    bad = []
    for start in range(0, len(x), batch_size):
        logits = model.eval()(x[start:start + batch_size].to(device)).float()
        bad.append((~torch.isfinite(logits)).any(dim=1).cpu())
    bad = torch.cat(bad) if bad else torch.zeros(0, dtype=torch.bool)
    if bad.any():
        raise EvaluationError(f"the model's logits are NaN or infinite on {int(bad.sum())} of {len(x)} test examples "
                              f"(first: subset position {int(bad.nonzero()[0])}), so no attack can be judged; its "
                              "weights or --normalize are broken: check the checkpoint")


def _default_out_dir(args, started):
    return (Path(args.ckpt).parent if args.ckpt else Path(".")) / f"eval_{started:%Y%m%d_%H%M%S}"


def _previous_results(out_dir, resume):
    """The file of the run to resume in ``out_dir`` (None without ``resume``); refuses a folder that
    holds an evaluation when ``resume`` is not asked for, and one that holds none when it is."""
    previous = out_dir / PARTIAL if (out_dir / PARTIAL).exists() else out_dir / "results.json"
    if resume and not previous.exists():
        raise EvaluationError(f"nothing to resume in {out_dir} (no results.json or {PARTIAL}); drop --resume")
    if not resume and previous.exists():
        raise EvaluationError(f"{out_dir} already holds an evaluation; pass --resume to continue it or another --out-dir")
    return previous if resume else None


def _check_outputs(args, started):
    """``(out_dir, previous)`` checked before any work; creates nothing. The default folder
    (``eval_<timestamp>``) is made unique when it is created, so it is never refused here."""
    if not args.out_dir:
        return check_output_dir(_default_out_dir(args, started)), None
    out_dir = check_output_dir(Path(args.out_dir))
    if out_dir.is_dir():
        check_unlocked(out_dir, "an evaluation")
    return out_dir, _previous_results(out_dir, args.resume)


def _shown(value):
    """A resume-key value short enough for a one-line message."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    if isinstance(value, list) and len(value) > 6:
        return f"{len(value)} values"
    return repr(value)


def _finished_attacks(previous, key):
    """Results of the run being resumed, after checking it used the same model, data and settings."""
    try:
        saved = json.loads(previous.read_text())
        saved_key = saved.get("meta", {}).get("resume_key", {})
    except (OSError, ValueError, AttributeError) as err:
        raise EvaluationError(f"cannot resume: {previous} is unreadable ({err}); start again in another --out-dir") \
            from None
    missing = [name for name in RESUME_KEYS if name not in saved_key]
    if missing:
        raise EvaluationError(f"cannot resume: {previous} was written by an older version that did not record "
                              f"{KEY_TEXT.get(missing[0], missing[0])} (and {len(missing) - 1} more), so it cannot be "
                              "shown to come from the same model and data; evaluate again into another --out-dir")
    for name in RESUME_KEYS:
        if saved_key[name] != key[name]:
            what = KEY_TEXT.get(name, name.replace("_", " "))
            raise EvaluationError(f"cannot resume: {what} differs from the saved run ({_shown(saved_key[name])} there, "
                                  f"{_shown(key[name])} now); use the same model, data and settings or another "
                                  "--out-dir")
    return {record["name"]: AttackResult.from_json(record) for record in saved.get("attacks", [])}


def file_sha256(path):
    """Hex SHA-256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_key(args, meta):
    """What a resumed run must share with the saved one: the settings of :data:`RESUME_KEYS`, the
    content of every model file, and every option that changes the model or the data (JSON values)."""
    factory = args.model_factory.rpartition(":")[0] if args.model_factory else None
    source = _source(args)
    key = {"model": source + (f" + {args.weights}" if args.weights else ""),
           **{k: meta[k] for k in RESUME_KEYS if k in meta},
           "checkpoint_sha256": file_sha256(args.ckpt) if args.ckpt else None,
           "factory_sha256": file_sha256(factory) if factory else None,
           "weights_sha256": file_sha256(args.weights) if args.weights else None,
           "normalize": args.normalize, "reverse_attention_option": args.reverse_attention,
           "arch_option": args.arch, "num_classes_option": args.num_classes, "no_ema": args.no_ema,
           "data_dir": str(Path(meta["data_dir"]).resolve()) if meta["data_dir"] else None}
    return json.loads(json.dumps(key))  # tuples become lists, as in the saved file


def _input_files(args):
    """The files this evaluation reads (no output may be written over them)."""
    files = [args.ckpt, args.weights, args.model_factory.rpartition(":")[0] if args.model_factory else None]
    return [Path(f) for f in files if f] + review.robustbench_inputs(args)


def _source(args):
    if args.robustbench:
        return f"robustbench:{args.rb_dataset}/{args.threat_model}/{args.robustbench}"
    return str(Path(args.ckpt or args.model_factory).resolve())


def _meta(args, config, dataset, indices, data_dir, started):
    meta = {"checkpoint": str(args.ckpt or args.model_factory or args.robustbench), **config, "dataset": dataset,
            "data_dir": data_dir,
            "n_examples": len(indices), "indices": indices, "subset_seed": args.subset_seed, "eps": args.eps,
            "eps_text": eps_text(args.eps), "aux_weight": args.aux_weight, "budget": args.budget,
            "budget_params": dataclasses.asdict(BUDGETS[args.budget]), "joint_weights": list(args.joint_weights),
            "taus": list(args.taus), "seed": args.seed, "attacks_requested": args.attacks, "device": str(args.device),
            "torch": torch.__version__, "started": started.isoformat(timespec="seconds"), "arguments": vars(args),
            "cascade": args.cascade, "full_set": list(args.full_set),
            "attack_dtype": args.attack_dtype or default_attack_dtype(args.device)}
    meta["resume_key"] = resume_key(args, meta)
    return meta


def _has_attacks(request):
    return any(t.strip() and t.strip() != "natural" for t in request.split(","))


def _load(args):
    """The model and the fixed test subset."""
    if args.ckpt:
        model, config, saved = _checkpoint_from_args(args)
    elif args.robustbench:
        model, config, saved = review.load_model(args)
    else:
        model, config, saved = build_factory_model(args.model_factory, args.weights, args.device)
    subset = load_test_subset(config, saved, n_examples=args.n_examples, dataset=args.dataset, data_dir=args.data_dir,
                              subset_seed=args.subset_seed, source=args.ckpt or args.model_factory or args.robustbench)
    _check_classes(model, subset.x, subset.dataset, args.device)
    return model, config, subset


class Progress:
    """Where an evaluation saves its finished attacks (``results.partial.json`` in ``out_dir``), so
    an interruption or a failed write can say what is kept and how to resume."""

    def __init__(self):
        self.out_dir, self.saved = None, 0

    def resume_hint(self):
        if self.out_dir is None or not self.saved:
            return "no attack had finished, so nothing is saved: rerun the same command"
        kept = self.out_dir / PARTIAL if (self.out_dir / PARTIAL).exists() else self.out_dir / "results.json"
        return (f"{self.saved} finished attack(s) are saved in {kept}: continue with the same options plus "
                f"--resume --out-dir {shlex.quote(str(self.out_dir))}")

    def write(self, name, write, content):
        """``write(out_dir / name, content)``; a failed write says what is kept and how to resume."""
        try:
            write(self.out_dir / name, content)
        except OutputError as err:
            raise OutputError(f"{err}; {self.resume_hint()}") from None


def run(args, progress=None, options_checked=False):
    """Check every input and the output folder, load, attack (saving each attack), report.
    ``options_checked``: the attack options were checked over several models already (compare)."""
    started = datetime.now()
    progress = progress if progress is not None else Progress()
    if not _has_attacks(args.attacks):
        raise EvaluationError(f"--attacks {args.attacks!r} names no attack; give names or a preset "
                              f"({', '.join(PRESETS)})")
    out_dir, previous = _check_outputs(args, started)
    review.check_outputs(args, out_dir, inputs=_input_files(args))
    model, config, subset = _load(args)
    specs, skipped = choose_attacks(model, subset.x, args.attacks, Settings(eps=args.eps, budget=BUDGETS[args.budget]),
                                    args.device, args.full_set)
    if not options_checked:
        check_attack_options(args, [(specs, skipped, head_count(model))])
    check_finite_logits(model, subset.x, args.device, args.batch_size if isinstance(args.batch_size, int) else 256)
    meta = _meta(args, config, subset.dataset, subset.indices, subset.data_dir, started)
    if previous:
        _finished_attacks(previous, meta["resume_key"])  # refuse a mismatch before anything is created
    out_dir = create_output_dir(out_dir) if args.out_dir else create_unique_dir(out_dir)
    with FolderLock(out_dir, "an evaluation"):
        previous = _previous_results(out_dir, args.resume)  # again, now that no one else can write here
        finished = _finished_attacks(previous, meta["resume_key"]) if previous else {}
        return _evaluate(args, model, subset, meta, out_dir, finished, progress, started)


def _evaluate(args, model, subset, meta, out_dir, finished, progress, started):
    done = list(finished.values())
    progress.out_dir, progress.saved = out_dir, len(done)

    def save_progress(result):
        done.append(result)
        progress.write(PARTIAL, write_json, {"meta": meta, "status": "partial", "attacks": [r.to_json() for r in done]})
        progress.saved = len(done)
        if not args.quiet:
            figure = "cascade" if result.accuracy is None else f"{100 * result.accuracy:.2f} %"
            print(f"{result.name}: {figure}, broke {result.n_broken}/{result.n_received} ({result.seconds:.1f} s)",
                  file=sys.stderr)

    evaluation = evaluate_model(model, subset.x, subset.y, args.attacks, args.eps, aux_weight=args.aux_weight,
                                budget=args.budget, batch_size=args.batch_size, seed=args.seed, device=args.device,
                                cascade=args.cascade, attack_dtype=meta["attack_dtype"],
                                joint_weights=args.joint_weights, taus=args.taus,
                                progress=not args.quiet and sys.stderr.isatty(), on_result=save_progress,
                                finished=finished, meta=meta, full_set=args.full_set)
    evaluation.indicators = review.run_indicators(args, model, subset.x, subset.y, evaluation)
    evaluation.meta["seconds"] = (datetime.now() - started).total_seconds()
    report = evaluation.markdown()
    progress.write("report.md", write_text, report)
    progress.write("results.json", write_json, evaluation.to_json())
    (out_dir / PARTIAL).unlink(missing_ok=True)
    report = review.after_report(args, model, subset.x, subset.y, evaluation, out_dir, report)
    print(report)
    print(f"saved {out_dir / 'report.md'} and {out_dir / 'results.json'}")
    return out_dir


def main(argv=None):
    """Command line of ``test_white_attack.py``: 0 done, 2 refused (one line), 130 interrupted by
    Ctrl-C or SIGTERM (one line saying what is saved and how to resume, as training does)."""
    errors = (EvaluationError, CheckpointError, datasets.DatasetError, AutoAttackUnavailable, OutputError, LockError,
              InertOptionError)
    progress = Progress()
    try:
        with sigterm_as_interrupt():
            return run_cli(lambda args: _run_one_or_compare(args, progress), parse_args, errors, argv)
    except KeyboardInterrupt:
        print(f"interrupted: {progress.resume_hint()}", file=sys.stderr)
        return 130


def _run_one_or_compare(args, progress):
    if not args.compare:
        return run(args, progress)

    def load(path):
        return _checkpoint_from_args(argparse.Namespace(**dict(vars(args), ckpt=path)))

    compare.check_inputs(args)
    compare.preflight(args, load)  # every checkpoint readable, one dataset
    models = []  # every model's attacks, so an option one of them uses is not refused after another's evaluation
    for path in args.compare:
        model, _, subset = _load(argparse.Namespace(**dict(vars(args), ckpt=path)))
        specs, skipped = choose_attacks(model, subset.x, args.attacks, Settings(eps=args.eps, budget=BUDGETS[args.budget]),
                                        args.device, args.full_set)
        models.append((specs, skipped, head_count(model)))
    check_attack_options(args, models)
    return compare.run_compare(args, lambda one: run(one, progress, options_checked=True))  # checked above
