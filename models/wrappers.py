"""Seeing through wrappers: the bare model inside DDP / DataParallel / ``torch.compile`` /
:class:`models.Normalized`, and whether it has reverse-attention heads."""


def unwrap(model):
    """The bare model inside DataParallel / DDP / ``torch.compile`` / ``Normalized`` wrappers
    (for its weights and attributes; forward the wrapper itself, which may normalise inputs)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def has_reverse_attention(model):
    """True when ``model`` (possibly wrapped) has RA heads."""
    return bool(getattr(unwrap(model), "reverse_attention", False))
