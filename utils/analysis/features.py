"""Feature analysis of docs/protocol.md §6 (paper Fig. 1, 3): penultimate features of natural examples,
their PGD-10 adversarial examples (PP pairs) and other-class examples (NP pairs).

The feature is the vector fed to the classifier, ``model(x, return_features=True)`` in eval
mode (RA models use argmax masks, as at inference). Saved ``.npz`` files (load with
``allow_pickle=False``, see :func:`load_npz`) hold:

========================== ======================================================================
``pp_cos``, ``pp_l2``      float64 (N,): cosine similarity / L2 distance of f(x) and f(x_adv)
``np_cos``, ``np_l2``      float64 (N,): cosine similarity / L2 distance of f(x) and f(x_other)
``anchor_index``           int64 (N,): test-set index of each natural example (all of one class)
``negative_index``         int64 (N,): test-set index of the image each other-class example came from
``checkpoint``             str: checkpoint path
``label``                  str: method label drawn in legends (e.g. ``TRADES-ANCRA``)
``target_label``           int: the class of the natural examples
``dataset``                str: dataset name
``strategy``               str: negative strategy of the NP pairs (docs/protocol.md §3)
``attack``                 str: JSON of the attack settings (``ae`` and, for ``*_adv``, ``oe``)
``seed``                   int: seed of the attacks' noise and the negatives' sampling
``n_examples``             int: N
``feat_nat|adv|neg``       float32 (N, R), only with ``save_features``: the features themselves
========================== ======================================================================
"""
import io
import json
import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from models import NORMALIZATION_HELP, has_reverse_attention, load_model, parse_normalization, read_checkpoint
from models.loading import saved_args
from utils import data as datasets
from utils import recipe
from utils.attacks import EPS, pgd
from utils.cli import add_device_argument, eps_type, nonnegative_float, positive_int, resolve_device
from utils.evaluation.options import write_bytes
from utils.training.ancra import STRATEGIES, choose_negatives, effective_strategy, get_method, method_names
from utils.training.ancra import method_label as registry_label
from utils.training.config import saved_method_name

METRIC_KEYS = ("pp_cos", "pp_l2", "np_cos", "np_l2")
META_KEYS = ("checkpoint", "label", "target_label", "dataset", "strategy", "attack", "seed", "n_examples")
INDEX_KEYS = ("anchor_index", "negative_index")
FEATURE_KEYS = ("feat_nat", "feat_adv", "feat_neg")
METHOD_NAMES = {name: get_method(name).label for name in method_names()}  # from the method registry


class FeatureError(ValueError):
    """Feature analysis asked for something impossible; the message says what to change."""


@dataclass(frozen=True)
class AttackSettings:
    """PGD of the training recipe (docs/protocol.md §2): CE, x + 0.001·N(0,1) start, eval mode; λ on RA heads."""

    eps: float = EPS
    step_size: float = recipe.STEP_SIZE
    steps: int = recipe.TRAIN_ATTACK_STEPS
    aux_weight: float = recipe.AUX_WEIGHT

    def for_model(self, model):
        """The settings actually used: plain models have no auxiliary heads, so λ = 0."""
        aux = self.aux_weight if has_reverse_attention(model) else 0.0
        return AttackSettings(self.eps, self.step_size, self.steps, aux)

    def describe(self, strategy=None):
        """JSON-ready record of the adversarial (``ae``) and other-class (``oe``) attacks."""
        ae = dict(asdict(self), loss="ce", init="normal", targeted=False, model_mode="eval")
        oe = dict(ae, targeted="toward the anchor's label") if strategy and strategy.endswith("_adv") else None
        return {"ae": ae, "oe": oe}


@dataclass
class Analysis:
    """A checkpoint's model in eval mode with the test split it is analysed on."""

    model: torch.nn.Module
    config: dict
    args: dict
    dataset: str
    data: datasets.TensorPair
    label: str
    checkpoint: str


# --------------------------------------------------------------------------- checkpoint + data


def _flag(args, positive, negative):
    """A boolean option stored either as ``positive`` or as ``negative`` (negated); None if absent."""
    if args.get(positive) is not None:
        return bool(args[positive])
    if args.get(negative) is not None:
        return not args[negative]
    return None


def method_label(args, reverse_attention=None):
    """Legend label from a checkpoint's training args, e.g. ``TRADES``, ``MART-ANC``, ``TRADES-ANCRA``.

    Tolerant of missing keys: ANC comes from ``anc``/``no_anc``/``zeta``, RA from the model
    itself (``reverse_attention``) or ``ra``/``no_ra``, else from an ``-ancra``-style suffix."""
    name, named_anc, named_ra = saved_method_name(args.get("method") or "model")
    anc = _flag(args, "anc", "no_anc")
    if anc is None and args.get("zeta") is not None and named_anc is None:
        anc = float(args["zeta"]) > 0
    if anc is None:
        anc = bool(named_anc)
    ra = reverse_attention if reverse_attention is not None else _flag(args, "ra", "no_ra")
    if ra is None:
        ra = bool(named_ra)
    return registry_label(name, anc, ra)


def load_analysis(checkpoint, dataset=None, data_dir=None, device="cpu", label=None, use_ema=True,
                  reverse_attention=None, normalization=None):
    """Load a checkpoint (its EMA weights when it has them, unless ``use_ema`` is False) and the
    test split of its dataset, refusing a model/dataset mismatch. ``reverse_attention`` and
    ``normalization`` complete a foreign state dict (see ``models.load_model``).

    Synthetic data are regenerated as training made them: the checkpoint's image size and
    ``data_seed`` (default 0); the data folder is chosen by ``utils.data.resolve_data_dir``."""
    payload = read_checkpoint(checkpoint)
    model, config = load_model(payload, reverse_attention=reverse_attention, device=device, use_ema=use_ema,
                               normalization=normalization)
    args = saved_args(payload)
    dataset = dataset or args.get("dataset")
    if not dataset:
        raise FeatureError(f"checkpoint {checkpoint} does not record its dataset; pass --dataset")
    n_classes = datasets.num_classes(dataset)
    if config["num_classes"] != n_classes:
        raise FeatureError(f"checkpoint {checkpoint} has {config['num_classes']} classes but {dataset} has "
                           f"{n_classes}; pass the --dataset it was trained on")
    size = config.get("image_size") or args.get("image_size") or datasets.image_size(dataset)
    if dataset != "synthetic" and size != datasets.image_size(dataset):
        side = datasets.image_size(dataset)
        raise FeatureError(f"checkpoint {checkpoint} expects {size}×{size} images but {dataset} has {side}×{side}; "
                           f"pass the --dataset it was trained on")
    data_dir = datasets.resolve_data_dir(dataset, data_dir, args.get("data_dir"), source=f"checkpoint {checkpoint}")
    data = datasets.load_dataset(dataset, data_dir, "test", synthetic_image_size=size,
                                 seed=int(args.get("data_seed") or 0))
    model.eval()
    label = label or method_label(args, config.get("reverse_attention"))
    return Analysis(model, config, args, dataset, data, label, str(checkpoint))


# --------------------------------------------------------------------------- features and pairs


def progress_bar(total, desc, enabled):
    """A tqdm bar over ``total`` images, shown only when enabled and stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled or not sys.stderr.isatty())


@torch.no_grad()
def features_of(model, x):
    """Penultimate features of a batch in eval mode (argmax masks for RA models), float32 on CPU."""
    was_training = model.training
    model.eval()
    try:
        _, feat = model(x, return_features=True)
    finally:
        model.train(was_training)
    return feat.float().cpu()


def check_finite(values, what):
    """Refuse NaN / ±inf values (a broken model or file) instead of drawing or saving them."""
    finite = torch.isfinite(torch.as_tensor(values))
    if not bool(finite.all()):
        bad = int((~finite).reshape(len(finite), -1).any(1).sum())
        raise FeatureError(f"{what} hold NaN or infinite values ({bad} of {len(finite)} rows); the model's weights or "
                           "--normalize are broken: check the checkpoint")
    return values


def finite_features(model, x, what):
    """:func:`features_of`, refused when a feature is NaN or infinite."""
    return check_finite(features_of(model, x), what)


def pair_metrics(a, b):
    """Row-wise cosine similarity and L2 distance of two N×R feature arrays, as float64 numpy."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    l2 = (a - b).norm(dim=1)
    return cos.numpy(), l2.numpy()


def summarize(values):
    """min, max, mean and (population) variance of a 1-D array."""
    values = np.asarray(values, dtype=np.float64)
    return {"min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "var": float(values.var())}


def adversarial(model, x, y, attack, generator):
    """PGD of :class:`AttackSettings` (untargeted CE, normal start)."""
    return pgd(model, x, y, attack.eps, attack.step_size, attack.steps, loss="ce", init="normal",
               aux_weight=attack.aux_weight, generator=generator)


def other_class_examples(model, strategy, x, y, pool_x, pool_y, num_classes, attack, generator):
    """One other-class example per anchor chosen from ``pool`` by the library's strategy rules.

    The anchors and the pool form one batch, so ``choose_negatives`` sees the same kind of batch
    as in training; only the anchors' choices are kept. ``*_adv`` strategies then attack the
    chosen examples toward the anchor's label (docs/protocol.md §2 training OE). Returns ``(x_o, pool index)``.
    """
    base = effective_strategy(strategy)
    batch_x, batch_y = torch.cat([x, pool_x]), torch.cat([y, pool_y])
    logits = None
    if base != "random":
        with torch.no_grad():
            logits = model(batch_x)
    index, valid = choose_negatives(base, batch_y, num_classes, logits, generator)
    index, valid = index[: len(x)], valid[: len(x)]
    if not bool(valid.all()):
        raise FeatureError("no other-class example available for some anchors; the test set needs a second class")
    x_o = batch_x[index]
    if strategy.endswith("_adv"):
        x_o = pgd(model, x_o, y, attack.eps, attack.step_size, attack.steps, loss="ce", targeted=True,
                  init="normal", aux_weight=attack.aux_weight, generator=generator)
    return x_o, index - len(x)


def class_indices(data, target_label, n_examples=None):
    """Test-set indices of the first ``n_examples`` (default all) images of ``target_label``."""
    n_classes = len(data.classes)
    if not 0 <= target_label < n_classes:
        raise FeatureError(f"--target-label must be in [0, {n_classes - 1}], got {target_label}")
    index = (data.y == target_label).nonzero().flatten()
    if len(index) == 0:
        raise FeatureError(f"the test set has no image of class {target_label}; choose another --target-label")
    if n_examples is not None and n_examples > len(index):  # as the evaluation: refuse, never silently fewer
        raise FeatureError(f"--n-examples {n_examples} is more than the {len(index)} test images of class "
                           f"{target_label}; use at most {len(index)}")
    return index if n_examples is None else index[:n_examples]


def feature_distances(analysis, target_label=0, *, strategy="random_adv", n_examples=None, batch_size=200,
                      attack=AttackSettings(), seed=0, device="cpu", progress=True, save_features=False):
    """PP and NP cosine / L2 arrays for the test images of ``target_label`` (docs/protocol.md §6), as the
    dict that :func:`save_npz` writes."""
    if strategy not in STRATEGIES:
        raise FeatureError(f"unknown negative strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    model, data = analysis.model, analysis.data
    attack = attack.for_model(model)
    anchors = class_indices(data, target_label, n_examples)
    others = (data.y != target_label).nonzero().flatten()
    if len(others) == 0:
        raise FeatureError("the test set holds a single class; NP pairs need other-class images")
    sampler = torch.Generator().manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    images = lambda idx: data.x[idx].to(device).float().div_(255)
    feats = {key: [] for key in FEATURE_KEYS}
    negative_index = []
    with progress_bar(len(anchors), f"features class {target_label}", progress) as bar:
        for start in range(0, len(anchors), batch_size):
            idx = anchors[start:start + batch_size]
            x, y = images(idx), data.y[idx].to(device)
            pool = others[torch.randperm(len(others), generator=sampler)[: len(idx)]]
            x_adv = adversarial(model, x, y, attack, generator)
            x_o, picked = other_class_examples(model, strategy, x, y, images(pool), data.y[pool].to(device),
                                               len(data.classes), attack, generator)
            for key, batch, what in zip(FEATURE_KEYS, (x, x_adv, x_o), ("natural", "adversarial", "other-class")):
                feats[key].append(finite_features(model, batch, f"the features of {what} examples"))
            negative_index.append(pool[picked.cpu()])
            bar.update(len(idx))
    feats = {key: torch.cat(value).numpy() for key, value in feats.items()}
    pp_cos, pp_l2 = pair_metrics(feats["feat_nat"], feats["feat_adv"])
    np_cos, np_l2 = pair_metrics(feats["feat_nat"], feats["feat_neg"])
    result = {
        "pp_cos": pp_cos, "pp_l2": pp_l2, "np_cos": np_cos, "np_l2": np_l2,
        "anchor_index": anchors.numpy(), "negative_index": torch.cat(negative_index).numpy(),
        "checkpoint": analysis.checkpoint, "label": analysis.label, "target_label": int(target_label),
        "dataset": analysis.dataset, "strategy": strategy, "attack": json.dumps(attack.describe(strategy)),
        "seed": int(seed), "n_examples": len(anchors),
    }
    if save_features:
        result.update(feats)
    return result


def umap_inputs(analysis, n_examples=500, *, batch_size=200, attack=AttackSettings(), seed=0, device="cpu",
                progress=True):
    """Features of ``n_examples`` random test images (seeded) and of their PGD adversarial examples.

    Returns a dict: ``features`` (2N×R, natural rows first), ``labels`` (2N), ``is_adv`` (2N bool)
    and ``index`` (N test-set indices)."""
    model, data = analysis.model, analysis.data
    if n_examples > len(data):  # as the evaluation: refuse, never silently fewer
        raise FeatureError(f"--n-examples {n_examples} is more than the {len(data)} test images of {analysis.dataset}; "
                           f"use at most {len(data)}")
    attack = attack.for_model(model)
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n_examples]
    generator = torch.Generator(device=device).manual_seed(seed)
    natural, adv = [], []
    with progress_bar(len(chosen), "features for UMAP", progress) as bar:
        for start in range(0, len(chosen), batch_size):
            idx = chosen[start:start + batch_size]
            x, y = data.x[idx].to(device).float().div_(255), data.y[idx].to(device)
            natural.append(finite_features(model, x, "the features of natural examples"))
            adv.append(finite_features(model, adversarial(model, x, y, attack, generator),
                                       "the features of adversarial examples"))
            bar.update(len(idx))
    labels = data.y[chosen].numpy()
    n = len(chosen)
    return {"features": torch.cat(natural + adv).numpy(), "labels": np.concatenate([labels, labels]),
            "is_adv": np.repeat([False, True], n), "index": chosen.numpy()}


# --------------------------------------------------------------------------- tables and files


def stats_table(result):
    """Markdown table of min / max / mean / var of the four arrays."""
    rows = ["| pairs | metric | min | max | mean | var |", "|---|---|---|---|---|---|"]
    for key in METRIC_KEYS:
        s = summarize(result[key])
        pairs, metric = key.split("_")
        metric = "cosine" if metric == "cos" else "L2"
        numbers = " | ".join(f"{s[name]:.4f}" for name in ("min", "max", "mean", "var"))
        rows.append(f"| {pairs.upper()} | {metric} | {numbers} |")
    return "\n".join(rows)


def save_npz(path, result):
    """Write ``result`` with numpy-native types only (strings as str arrays): no pickle needed.
    The file is replaced atomically (a full disk leaves the previous one intact: ``OutputError``);
    ``.npz`` is appended to a name without it, as ``np.savez`` does. Returns the path written."""
    arrays = {}
    for key, value in result.items():
        arrays[key] = np.array(value) if isinstance(value, (str, int, float)) else np.asarray(value)
        if arrays[key].dtype == object:
            raise TypeError(f"{key} is not numpy-native")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = str(path)
    return write_bytes(path if path.endswith(".npz") else path + ".npz", buffer.getvalue())


def load_npz(path):
    """Read a :func:`save_npz` file with ``allow_pickle=False``; scalars come back as str/int."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            raw = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as err:
        raise FeatureError(f"cannot read {path} ({err}); pass files written by feature_distance.py") from err
    missing = [key for key in METRIC_KEYS + META_KEYS if key not in raw]
    if missing:
        raise FeatureError(f"{path} lacks {', '.join(missing)}; pass files written by feature_distance.py")
    for key in METRIC_KEYS:
        if raw[key].dtype.kind != "f" or not np.isfinite(raw[key]).all():
            raise FeatureError(f"{path}: {key} holds NaN, infinite or non-numeric values; recompute the file with "
                               "feature_distance.py from a working checkpoint")
    return {key: value.item() if value.ndim == 0 else value for key, value in raw.items()}


def safe_name(text):
    """``text`` reduced to characters that are safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"



# --------------------------------------------------------------------------- shared CLI options


def add_common_arguments(parser):
    """Checkpoint, data, attack, device and output options shared by the feature scripts."""
    parser.add_argument("--ckpt", required=True, help="checkpoint (.pt) in this project's format or a state dict")
    parser.add_argument("--dataset", choices=sorted(datasets.DATASETS),
                        help="test set to analyse (default: the one recorded in the checkpoint)")
    parser.add_argument("--data-dir", default=None,
                        help="dataset folder (default: ./data if it exists, else the checkpoint's; printed)")
    parser.add_argument("--n-examples", type=positive_int, default=None, help="analyse at most this many test images")
    parser.add_argument("--batch-size", type=positive_int, default=200)
    parser.add_argument("--eps", type=eps_type, default=EPS,
                        help="L∞ budget: 8/255 (default), 0.031 or 8 (pixel units)")
    parser.add_argument("--steps", type=int, default=recipe.TRAIN_ATTACK_STEPS, help="PGD steps (default 10)")
    parser.add_argument("--step-size", type=nonnegative_float, default=recipe.STEP_SIZE, help="PGD step size (default 0.007)")
    parser.add_argument("--aux-weight", type=nonnegative_float, default=None,
                        help="λ on the RA heads' CE in the attacks, as in training (default: the checkpoint's, "
                             "else 2.0; unused for plain models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack noise and sampling")
    parser.add_argument("--label", default=None, help="method label (default: from the checkpoint's args)")
    parser.add_argument("--out-dir", default="figures", help="output folder (created if missing)")
    add_device_argument(parser)
    parser.add_argument("--no-ema", action="store_true", help="analyse the raw weights even if the checkpoint has EMA")
    parser.add_argument("--reverse-attention", choices=("on", "off"), default=None,
                        help="RA or plain: required for a state dict without a saved config")
    parser.add_argument("--normalize", type=parse_normalization, default=None, metavar="PRESET|MEAN/STD",
                        help=NORMALIZATION_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def check_options(args):
    """Reject impossible options before any loading; ``--device`` becomes the device it names here
    (``auto`` → ``cuda`` or ``cpu``), or a :class:`FeatureError` when it is not here."""
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as err:
        raise FeatureError(str(err)) from None
    if not 0 <= args.eps <= 1:
        raise FeatureError(f"--eps is a fraction of the [0, 1] pixel range such as 8/255, got {args.eps}")
    if args.steps < 0 or args.step_size < 0:
        raise FeatureError("--steps and --step-size must be non-negative")
    if args.n_examples is not None and args.n_examples < 1:
        raise FeatureError("--n-examples must be at least 1")
    if args.batch_size < 1:
        raise FeatureError("--batch-size must be at least 1")


def analysis_from_args(args):
    """:func:`load_analysis` with the common options of the feature scripts."""
    ra = None if args.reverse_attention is None else args.reverse_attention == "on"
    return load_analysis(args.ckpt, args.dataset, args.data_dir, args.device, args.label, use_ema=not args.no_ema,
                         reverse_attention=ra, normalization=args.normalize)


def attack_from_args(args, analysis):
    """:class:`AttackSettings` from the options; λ defaults to the one the checkpoint trained with."""
    aux_weight = args.aux_weight if args.aux_weight is not None else float(analysis.args.get("aux_weight", 2.0))
    if not math.isfinite(aux_weight) or aux_weight < 0:
        raise FeatureError(f"the checkpoint's aux_weight is {aux_weight}; pass --aux-weight (e.g. 2.0)")
    return AttackSettings(args.eps, args.step_size, args.steps, aux_weight)
