"""Read checkpoints safely and turn architecture mismatches into one clear sentence."""
import os

import torch

from . import canonical_arch, create_model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (missing file, wrong architecture, ...)."""


def read_checkpoint(path, map_location="cpu"):
    """Load ``path`` with ``weights_only=True``; a missing/corrupt file raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pt/.pth file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt file, pickle with disallowed globals, ...
        raise CheckpointError(f"cannot read checkpoint {path} ({type(err).__name__}: {err})") from err


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
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def infer_architecture(state):
    """Guess (arch, num_classes, image_size) from parameter names and shapes."""
    if "block1.layer.0.conv1.weight" in state:
        n = len({k.split(".")[2] for k in state if k.startswith("block1.layer.")})
        widen = state["block1.layer.0.conv1.weight"].shape[0] // 16
        return f"wrn-{6 * n + 4}-{widen}", state["fc.weight"].shape[0], 32
    if "linear.weight" in state and "bn.weight" in state:
        grid = round((state["linear.weight"].shape[1] // 512) ** 0.5)
        return "preact-resnet18", state["linear.weight"].shape[0], 32 * grid
    if "fc.weight" in state and "layer4.0.conv1.weight" in state:
        return "resnet18", state["fc.weight"].shape[0], 32
    raise CheckpointError("checkpoint does not look like resnet18, preact-resnet18 or a wrn-D-K state dict")


def _describe(arch, num_classes, reverse_attention):
    kind = {True: "an RA", False: "a plain", None: "a (RA or plain: not recorded)"}[reverse_attention]
    return f"{kind} {arch} with {num_classes} classes"


def model_config(payload):
    """Model config saved with one of our checkpoints, inferred from shapes for anything else."""
    state = extract_state_dict(payload)
    arch, num_classes, image_size = infer_architecture(state)
    saved = payload.get("model_config", {}) if isinstance(payload, dict) else {}
    return {
        "arch": saved.get("arch", arch),
        "num_classes": saved.get("num_classes", num_classes),
        "reverse_attention": saved.get("reverse_attention"),
        "image_size": saved.get("image_size", image_size),
    }


def load_model(path_or_payload, arch=None, num_classes=None, reverse_attention=None, device="cpu", use_ema=True):
    """Build the model a checkpoint holds and load it with ``strict=True``.

    Arguments left as None come from the checkpoint; ones given must agree with it (for a
    reference state dict, RA or plain is not recorded, so ``reverse_attention`` then defaults
    to True). ``use_ema``: take the EMA weights when the checkpoint has them (``config["weights"]``
    says which were loaded). Returns ``(model, config)``.
    """
    payload = read_checkpoint(path_or_payload) if isinstance(path_or_payload, (str, os.PathLike)) else path_or_payload
    state = extract_state_dict(payload, use_ema)
    found = model_config(payload)
    wanted = {
        "arch": canonical_arch(arch or found["arch"]),
        "num_classes": num_classes or found["num_classes"],
        "reverse_attention": reverse_attention if reverse_attention is not None else found["reverse_attention"],
    }
    if wanted["reverse_attention"] is None:
        wanted["reverse_attention"] = True
    mismatch = (
        wanted["arch"] != found["arch"]
        or wanted["num_classes"] != found["num_classes"]
        or (found["reverse_attention"] is not None and wanted["reverse_attention"] != found["reverse_attention"])
    )
    if mismatch:
        raise CheckpointError(
            f"checkpoint is {_describe(found['arch'], found['num_classes'], found['reverse_attention'])}; "
            f"you asked for {_describe(wanted['arch'], wanted['num_classes'], wanted['reverse_attention'])}"
        )
    config = dict(found, **wanted)
    has_ema = isinstance(payload, dict) and isinstance(payload.get("ema"), dict)
    config["weights"] = "ema" if (use_ema and has_ema) else "raw"
    model = create_model(config["arch"], config["num_classes"], config["reverse_attention"], config["image_size"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0:2]
        raise CheckpointError(f"checkpoint does not fit {_describe(config['arch'], config['num_classes'], config['reverse_attention'])}: {' '.join(first)}") from err
    return model.to(device), config
