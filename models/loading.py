"""Read checkpoints safely and rebuild their models: our checkpoints by their saved
``model_config``, foreign state dicts by recognising their layout; every refusal is one sentence."""
import os
import pickle
import re
import zipfile

import torch

from .layouts import Layout
from .normalization import NormalizationError, Normalized, check_normalization, parse_normalization
from .registry import arch_help, arch_specs, canonical_arch, create_model, resolve_arch

BASE_KEYS = ("arch", "num_classes", "reverse_attention", "image_size", "normalization")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (missing file, wrong architecture, ...)."""


def read_checkpoint(path, map_location="cpu", what="checkpoint"):
    """Load ``path`` with ``weights_only=True``; a missing, corrupt, foreign or pickled-code file raises
    CheckpointError. ``what`` names the file in the messages (e.g. "--weights file")."""
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder, not a file; pass the path of a .pt/.pth file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path} does not exist; pass the path of a .pt/.pth file")
    kind = _file_kind(path)
    if kind == "pickle":
        raise CheckpointError(_pickle_refusal(path, "a plain Python pickle, not a torch.save file", what))
    if kind != "torch":
        raise CheckpointError(f"cannot read {what} {path}: {kind}; pass a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _GLOBAL.search(str(err))
        if found:
            raise CheckpointError(_pickle_refusal(path, found.group(1) or found.group(2), what)) from None
        raise CheckpointError(f"cannot read {what} {path}: it is damaged or not a torch.save file "
                              f"({type(err).__name__})") from None
    except Exception as err:  # noqa: BLE001  (corrupt or truncated file, not a torch file, ...)
        raise CheckpointError(f"cannot read {what} {path} ({type(err).__name__}: {_first_line(err)})") from None


# First bytes of common files that are not checkpoints, for the refusal's "it looks like ...".
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x1f\x8b", "a gzip archive"),
               (b"{", "a JSON file"), (b"[", "a JSON file"), (b"\x93NUMPY", "a numpy .npy file"))


_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's legacy (non-zip) format


def _file_kind(path):
    """"torch" for a torch.save file (a zip archive, or the legacy pickle stream that starts with torch's
    magic number), "pickle" for any other pickle stream, else why the file cannot be a checkpoint."""
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_MAGIC))
    if not head:
        return "the file is empty"
    if zipfile.is_zipfile(path) or head == _LEGACY_MAGIC:
        return "torch"
    if head.startswith(b"PK"):
        return "it is a truncated or damaged zip archive, not a complete PyTorch checkpoint"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    looks = next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)
    if looks is None:
        looks = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "other binary data"
    return f"it is not a PyTorch checkpoint (it looks like {looks})"


def _first_line(err):
    return load_error_text(err)


def load_error_text(err):
    """The first line of a ``torch.load`` error, for a one-line message; torch's weights-only refusal
    (whose text advises retrying with ``weights_only=False``) is told in our words instead: no
    message of this project suggests turning that safety check off."""
    text = _ANSI.sub("", str(err)).strip()
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        found = _GLOBAL.search(text)
        held = f" ({found.group(1) or found.group(2)})" if found else ""
        return f"it holds pickled Python objects{held} besides tensors, which are never loaded (unpickling can run code)"
    return text.split("\n")[0][:200]


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)")


def _pickle_refusal(path, held, what="checkpoint"):
    """One sentence for a file that needs pickle: what it holds, why it is refused, what to do."""
    return (f"{what} {path} holds pickled Python code or objects ({held}), which this project refuses to load "
            f"because unpickling can run arbitrary code; re-save just the weights with the code that wrote it, "
            f"e.g. torch.save(model.state_dict(), 'weights.pt'), and load that file")


def extract_state_dict(payload, use_ema=True):
    """The model's state dict from our checkpoints, reference-style dicts or a bare state dict,
    with any DataParallel/DDP ``module.`` prefix removed. With ``use_ema`` a checkpoint that
    holds an EMA of the weights (``payload["ema"]["state_dict"]``) gives those."""
    state = payload
    ema = payload.get("ema") if isinstance(payload, dict) else None
    if use_ema and isinstance(ema, dict) and isinstance(ema.get("state_dict"), dict):
        state = ema["state_dict"]
    elif isinstance(payload, dict):
        for key in ("model", "state_dict", "model_state_dict", "net"):
            if key in payload and isinstance(payload[key], dict):
                state = payload[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError("checkpoint holds no model state dict")
    return {(k.removeprefix("module.")): v for k, v in state.items()}


def saved_model_config(payload):
    """The ``model_config`` our checkpoints store (with at least arch and num_classes), else None;
    a config whose values have the wrong type or range is refused (CheckpointError)."""
    saved = payload.get("model_config") if isinstance(payload, dict) else None
    if saved is None or (isinstance(saved, dict) and not saved):
        return None
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint's model_config is a {type(saved).__name__}, not a dictionary; the file is "
                              f"damaged or was not written by this project")
    _check_model_config(saved)
    if saved.get("arch") and saved.get("num_classes"):
        return dict(saved)
    return None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model_config(saved):
    """Refuse in one sentence a ``model_config`` entry of the wrong type or range."""
    problems = []
    if saved.get("arch") is not None and not (isinstance(saved["arch"], str) and saved["arch"]):
        problems.append(f"arch {saved['arch']!r} is not a name")
    for key in ("num_classes", "image_size"):
        value = saved.get(key)
        if value is not None and not (_is_int(value) and value >= 1):
            problems.append(f"{key} {value!r} is not a positive integer")
    if saved.get("reverse_attention") not in (True, False, None):
        problems.append(f"reverse_attention {saved['reverse_attention']!r} is not true, false or null")
    norm = saved.get("normalization")
    if norm is not None:
        try:
            if not isinstance(norm, dict):
                raise NormalizationError("not a dictionary")
            check_normalization(norm["mean"], norm["std"])
        except (NormalizationError, KeyError, TypeError, ValueError) as err:
            problems.append(f"normalization {norm!r} is unusable ({type(err).__name__}: {_first_line(err)})")
    if problems:
        raise CheckpointError(f"checkpoint's model_config is malformed: {'; '.join(problems)}; the file is damaged "
                              f"or was not written by this project")


ARG_TYPES = {"dataset": str, "data_dir": str, "data_seed": int, "image_size": int, "aux_weight": (int, float)}


def saved_args(payload):
    """The training ``args`` a checkpoint saved (``{}`` when it has none), refused in one sentence
    when they are not a dictionary or a value this project reads back has the wrong type."""
    args = payload.get("args") if isinstance(payload, dict) else None
    if args is None:
        return {}
    if not isinstance(args, dict):
        raise CheckpointError(f"checkpoint's args is a {type(args).__name__}, not a dictionary; the file is damaged "
                              f"or was not written by this project")
    wrong = [f"{key} {args[key]!r}" for key, kind in ARG_TYPES.items()
             if args.get(key) is not None and (not isinstance(args[key], kind) or isinstance(args[key], bool))]
    if wrong:
        raise CheckpointError(f"checkpoint's saved args have values of the wrong type ({', '.join(wrong)}); the file "
                              f"is damaged or was not written by this project")
    return dict(args)


def infer_layout(state, arch=None, num_classes=None):
    """The :class:`Layout` of a foreign state dict, recognised by the registered architectures;
    when none recognises it, ``arch`` and ``num_classes`` (if both given) build it as stated."""
    for spec in arch_specs():
        layout = spec.infer(state) if spec.infer else None
        if layout is not None:
            return layout
    if arch and num_classes:
        spec, _ = _resolve(arch)
        return Layout(canonical_arch(arch), num_classes, spec.input_size, state, ("layout given by arch/num_classes",))
    raise CheckpointError(f"checkpoint does not look like a state dict of {arch_help()}; "
                          f"pass --arch and --num-classes to load it into one of them")


def checkpoint_model_config(payload):
    """Model config of a checkpoint: the one our checkpoints saved, read first; inferred from
    parameter names and shapes only for foreign state dicts (``reverse_attention`` None there:
    RA adds no parameters, so the weights cannot tell)."""
    saved = saved_model_config(payload)
    if saved is not None:
        return dict({"reverse_attention": None, "image_size": None}, **saved)
    layout = infer_layout(extract_state_dict(payload))
    return {"arch": layout.arch, "num_classes": layout.num_classes, "reverse_attention": None,
            "image_size": layout.image_size}




def _resolve(arch):
    try:
        return resolve_arch(arch)
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _model_phrase(arch, num_classes, reverse_attention):
    kind = {True: "an RA", False: "a plain", None: "a (RA or plain: not recorded)"}[reverse_attention]
    return f"{kind} {arch} with {num_classes} classes"


def _wanted_config(found, arch, num_classes, reverse_attention):
    """``found`` overridden by the arguments given; a disagreement or an unanswerable RA question
    is refused in one sentence."""
    spec, _ = _resolve(found["arch"])
    if reverse_attention is None and found["reverse_attention"] is None and not spec.supports_ra:
        reverse_attention = False  # a plain-only architecture leaves nothing to guess
    wanted = {
        "arch": canonical_arch(arch or found["arch"]),
        "num_classes": num_classes or found["num_classes"],
        "reverse_attention": reverse_attention if reverse_attention is not None else found["reverse_attention"],
    }
    if (wanted["arch"] != canonical_arch(found["arch"]) or wanted["num_classes"] != found["num_classes"]
            or (found["reverse_attention"] is not None and wanted["reverse_attention"] != found["reverse_attention"])):
        raise CheckpointError(
            f"checkpoint is {_model_phrase(found['arch'], found['num_classes'], found['reverse_attention'])}; "
            f"you asked for {_model_phrase(wanted['arch'], wanted['num_classes'], wanted['reverse_attention'])}")
    if wanted["reverse_attention"] is None:
        raise CheckpointError(
            f"checkpoint holds a {wanted['arch']} state dict but does not record whether it was trained with "
            f"reverse attention, and RA adds no parameters, so its weights cannot tell; pass --reverse-attention on "
            f"(reverse_attention=True) for an RA model or --reverse-attention off (reverse_attention=False) for a "
            f"plain one such as a TRADES or RobustBench model")
    return dict(found, **wanted)


def _examples(keys, n=2):
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _load_weights(model, state, phrase):
    """Load ``state`` into ``model``: every key must match in name and shape, except that the
    model's unused submodules (``unused_state_prefixes``) may be absent as a whole."""
    own = model.state_dict()
    absent_ok = [p for p in getattr(model, "unused_state_prefixes", ())
                 if not any(k.startswith(p) for k in state)]
    missing = [k for k in own if k not in state and not any(k.startswith(p) for p in absent_ok)]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {'×'.join(map(str, state[k].shape))}, model {'×'.join(map(str, own[k].shape))}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(keys)} {what} (e.g. {_examples(keys)})" for what, keys in
                (("keys missing", missing), ("unexpected keys", unexpected), ("tensors of the wrong shape", wrong))
                if keys]
    if problems:
        raise CheckpointError(f"checkpoint does not fit {phrase}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def _carried_normalization(state):
    """Pop RobustBench-style ``mu``/``sigma`` buffers (normalisation inside the model) from ``state``."""
    if "mu" in state and "sigma" in state and state["mu"].numel() == state["sigma"].numel():
        try:
            return check_normalization(state.pop("mu"), state.pop("sigma"))
        except NormalizationError as err:
            raise CheckpointError(f"checkpoint's mu/sigma buffers are no usable input normalization ({err})") from None
    return None


def _normalization(given, carried):
    """The normalisation to apply: the argument (text or (mean, std)) or the checkpoint's own."""
    if isinstance(given, str):
        given = parse_normalization(given)
    given = check_normalization(*given) if given is not None else None
    if given is not None and carried is not None and not _same_normalization(given, carried):
        raise CheckpointError(f"checkpoint carries its own input normalization (mean {carried[0]}, std {carried[1]}); "
                              f"drop the normalization you passed ({given[0]} / {given[1]})")
    return given or carried


def _same_normalization(a, b):
    return all(len(x) == len(y) and all(abs(u - v) < 1e-6 for u, v in zip(x, y)) for x, y in zip(a, b))


def load_model(path_or_payload, arch=None, num_classes=None, reverse_attention=None, device="cpu", use_ema=True,
               normalization=None):
    """Build the model a checkpoint holds and load its weights (every key must fit).

    Our checkpoints are rebuilt from their saved ``model_config`` (read first, so any registered
    architecture loads); foreign state dicts are recognised by their parameter names (see
    ``docs/training.md``, "Foreign checkpoints"). Arguments left as None come from the checkpoint; ones given must
    agree with it. A foreign state dict does not say whether it is RA or plain, so
    ``reverse_attention`` must then be given (plain-only architectures excepted).
    ``use_ema``: take the EMA weights when present. ``normalization``: None, a preset/explicit
    text for :func:`parse_normalization`, or ``(mean, std)``; the model is then wrapped in
    :class:`Normalized` (RobustBench ``mu``/``sigma`` buffers in a state dict do this by themselves).

    Returns ``(model, config)``; ``config`` holds arch, num_classes, reverse_attention (the one
    used), image_size, the architecture's options, ``weights`` ("ema"/"raw"), ``source``
    ("checkpoint config" or "parameter names"), ``adaptations`` (what was changed to fit a
    foreign layout) and ``normalization`` (None or {"mean", "std"}).
    """
    payload = read_checkpoint(path_or_payload) if isinstance(path_or_payload, (str, os.PathLike)) else path_or_payload
    saved_args(payload)
    state = extract_state_dict(payload, use_ema)
    saved = saved_model_config(payload)
    if saved is not None:
        found, notes, carried, source = checkpoint_model_config(payload), (), None, "checkpoint config"
        if saved.get("normalization"):
            carried = check_normalization(saved["normalization"]["mean"], saved["normalization"]["std"])
    else:
        carried = _carried_normalization(state)
        layout = infer_layout(state, arch, num_classes)
        state, notes, source = layout.state, layout.notes, "parameter names"
        found = {"arch": layout.arch, "num_classes": layout.num_classes, "reverse_attention": None,
                 "image_size": layout.image_size}
        if carried is not None:
            notes += ("input normalization taken from the mu/sigma buffers",)
    config = _wanted_config(found, arch, num_classes, reverse_attention)
    options = {k: v for k, v in config.items() if k not in BASE_KEYS}
    phrase = _model_phrase(config["arch"], config["num_classes"], config["reverse_attention"])
    try:
        model = create_model(config["arch"], config["num_classes"], config["reverse_attention"],
                             config["image_size"], **options)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"cannot build {phrase}: {err}") from None
    _load_weights(model, state, phrase)
    config["image_size"] = config["image_size"] or model.arch_config["image_size"]
    norm = _normalization(normalization, carried)
    if norm is not None:
        model = Normalized(model, *norm)
    has_ema = isinstance(payload, dict) and isinstance(payload.get("ema"), dict)
    config.update(weights="ema" if (use_ema and has_ema) else "raw", source=source, adaptations=list(notes),
                  normalization=model.normalization if norm is not None else None)
    return model.to(device), config
