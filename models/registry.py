"""Architectures as a registry: a name or pattern maps to a builder, its default weight decay,
input size, the options it takes and (for foreign state dicts) how to recognise its layout.

A new architecture is one ``register_arch`` call; ``create_model``, ``load_model`` (for our own
checkpoints, which store ``model_config``), ``arch_info`` and the help texts then know it.
"""
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture (see :func:`register_arch`)."""

    label: str
    pattern: "re.Pattern"
    builder: Callable
    weight_decay: float
    input_size: int
    supports_ra: bool
    options: tuple
    infer: Optional[Callable]
    example: str


class ArchInfo(NamedTuple):
    """What the training code needs to know about an architecture name."""

    name: str
    weight_decay: float
    input_size: int
    supports_ra: bool


_REGISTRY = {}
_ALIASES = {}


def register_arch(name, builder, *, weight_decay, input_size, pattern=None, supports_ra=True, options=(),
                  infer=None, aliases=(), example=None):
    """Register an architecture.

    ``name``: the label shown in help texts (``"resnet18"``, ``"wrn-D-K"``); ``pattern``: a regular
    expression the full (lower-case) name must match, default ``name`` itself; its groups are
    passed to ``builder(num_classes, reverse_attention, image_size, *groups, **options)``.
    ``options``: keyword options the builder takes (e.g. ``("separate_bn",)``). ``infer``:
    ``state_dict -> models.layouts.Layout | None`` recognising foreign state dicts that carry no
    saved config. ``aliases``: other spellings of a fixed name. Returns the spec.
    """
    key = name.lower()
    if key in _REGISTRY:
        raise ValueError(f"architecture {name!r} is already registered")
    spec = ArchSpec(label=name, pattern=re.compile(pattern or re.escape(key)), builder=builder,
                    weight_decay=float(weight_decay), input_size=int(input_size), supports_ra=supports_ra,
                    options=tuple(options), infer=infer, example=example or "")
    _REGISTRY[key] = spec
    for alias in aliases:
        _ALIASES[alias.lower()] = key
    return spec


def unregister_arch(name):
    """Remove an architecture registered under ``name`` (and its aliases); for tests and plug-ins."""
    key = name.lower()
    _REGISTRY.pop(key)
    for alias in [a for a, target in _ALIASES.items() if target == key]:
        del _ALIASES[alias]


def arch_specs():
    """The registered specs, in registration order."""
    return list(_REGISTRY.values())


def canonical_arch(arch):
    """The architecture's canonical name (lower case, aliases resolved: ``preactresnet18`` → ``preact-resnet18``)."""
    arch = str(arch).lower()
    return _ALIASES.get(arch, arch)


def resolve_arch(arch):
    """``(spec, regex match)`` for ``arch``; ValueError naming the choices when none matches."""
    name = canonical_arch(arch)
    for spec in _REGISTRY.values():
        match = spec.pattern.fullmatch(name)
        if match:
            return spec, match
    raise ValueError(f"unknown architecture {arch!r}; choose {arch_help()}")


def arch_names():
    """Labels of the registered architectures (patterns shown as e.g. ``wrn-D-K``)."""
    return [spec.label for spec in _REGISTRY.values()]


def arch_help():
    """Help text listing the registered architectures, derived from the registry."""
    parts = []
    for spec in _REGISTRY.values():
        text = spec.label + (f" (e.g. {spec.example})" if spec.example else "")
        parts.append(text + ("" if spec.supports_ra else " (plain only)"))
    if len(parts) < 2:
        return "".join(parts) or "(none registered)"
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def arch_info(arch):
    """``ArchInfo(name, weight_decay, input_size, supports_ra)`` of ``arch`` (its canonical name)."""
    spec, _ = resolve_arch(arch)
    return ArchInfo(canonical_arch(arch), spec.weight_decay, spec.input_size, spec.supports_ra)


def create_model(arch, num_classes, reverse_attention=True, image_size=None, **options):
    """Build ``arch`` with ``num_classes`` outputs, RA or plain; ``image_size`` defaults to the
    architecture's input size. ``options`` are the architecture's own (e.g. ``separate_bn=True``).

    The model's ``arch_config`` holds what rebuilds it (checkpoints store it as ``model_config``);
    options left at False/None are omitted there, so configs without them stay valid.
    """
    spec, match = resolve_arch(arch)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        takes = ", ".join(spec.options) or "none"
        raise ValueError(f"architecture {canonical_arch(arch)} takes no option {unknown[0]!r} (its options: {takes})")
    if reverse_attention and not spec.supports_ra:
        raise ValueError(f"architecture {canonical_arch(arch)} is plain only; build it with reverse_attention off")
    image_size = image_size or spec.input_size
    model = spec.builder(num_classes, bool(reverse_attention), image_size, *match.groups(), **options)
    model.arch_config = {"arch": canonical_arch(arch), "num_classes": num_classes,
                         "reverse_attention": bool(reverse_attention), "image_size": image_size,
                         **{k: v for k, v in options.items() if v not in (None, False)}}
    return model
