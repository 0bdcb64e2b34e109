"""In-memory datasets (CIFAR-10/100, Tiny-ImageNet, synthetic) and a vectorised batch loader.

Every supported dataset fits in memory, so a split is held as a :class:`TensorPair`: uint8
images ``x`` (N×3×H×W), int64 labels ``y`` and class names. :class:`BatchLoader` moves the
uint8 tensor to the device once and yields float batches in [0, 1] (no normalisation).

Sources, auto-detected under ``data_dir`` (default ``./data``), first match wins:

* CIFAR pickle layout ``cifar-10-batches-py/`` or ``cifar-100-python/``: read directly
  (torchvision would insist on the official md5s); torchvision is used only to download it.
* CIFAR image folders ``<data_dir>/<name>/{train,test}/<class>/*.png|jpg|jpeg`` or
  ``<data_dir>/{train,test}/<class>/...``; class index = sorted folder name, which for
  CIFAR-10/100 class names is exactly the official order.
* Tiny-ImageNet archive ``<data_dir>/tiny-imagenet-200/`` (or ``<data_dir>`` itself) with
  ``wnids.txt``, ``train/<wnid>/images/*.JPEG`` and ``val/images`` + ``val/val_annotations.txt``
  (split "test" means the labelled val set); or image folders ``train|val|test/<wnid>/*``.
  Class index = line order of ``wnids.txt`` (sorted ``train/`` folders when it is absent).
* ``synthetic``: generated in memory from ``seed`` (see :func:`make_synthetic`).
"""

from __future__ import annotations

import codecs
import math
import os
import pickle
import stat
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "test")
DEFAULT_DATA_DIR = "./data"
CROP_PADDING = 4
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
SYNTHETIC_SIZES = {"train": 2000, "test": 500}
SYNTHETIC_MAX_BYTES = 4 * 2 ** 30  # uint8 images of one synthetic split

# Synthetic recipe (pixel units in [0, 1]): mid-grey + per-class low-frequency colour pattern
# scaled by a per-example amplitude, a per-example colour cast and i.i.d. pixel noise. The
# pattern contrast (0.05 per pixel, RMS) is about 1.6 times eps = 8/255: the classes are robustly
# separable in principle, and a smoke model (--smoke: 64 images, two epochs) learns them well
# above chance, yet an ε = 8/255 attack breaks part of its test images, not all
# (tests/test_data.py holds both).
_SYNTH_GRID = 4
_SYNTH_CONTRAST = 0.05
_SYNTH_AMPLITUDE = (0.7, 1.3)
_SYNTH_CAST = 0.05
_SYNTH_NOISE = 0.15
_SYNTH_ROUNDS = 10  # rounds of one example per class in each independently seeded block


class DatasetError(RuntimeError):
    """A dataset could not be found, downloaded or parsed; the message says how to fix it."""


class _CifarLayout(NamedTuple):
    """Where torchvision's pickle layout keeps one CIFAR variant's files and keys."""

    title: str
    folder: str
    files: dict
    meta_file: str
    names_key: str
    labels_key: str


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10", "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "batches.meta", "label_names", "labels"),
    "cifar100": _CifarLayout(
        "CIFAR-100", "cifar-100-python", {"train": ["train"], "test": ["test"]},
        "meta", "fine_label_names", "fine_labels"),
}


@dataclass
class TensorPair:
    """One in-memory split: uint8 images ``x`` N×3×H×W, int64 labels ``y`` (N) and class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        """Reject malformed tensors at load time rather than deep inside training."""
        if self.x.dtype != torch.uint8 or self.x.dim() != 4 or self.x.shape[1] != 3:
            raise ValueError(f"x must be uint8 N×3×H×W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or tuple(self.y.shape) != (self.x.shape[0],):
            raise ValueError(f"y must be int64 of shape ({self.x.shape[0]},), got "
                             f"{self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        """Number of examples."""
        return self.x.shape[0]

    def subset(self, idx) -> TensorPair:
        """The examples at ``idx`` (index tensor/list, bool mask or slice), same class list."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, device=self.x.device)
            idx = idx if idx.dtype == torch.bool else idx.long()
        return TensorPair(self.x[idx], self.y[idx], self.classes)

    def float(self) -> torch.Tensor:
        """All images as float32 in [0, 1], the models' input range."""
        return self.x.float().div_(255)


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, everything the rest of the code asks of it.

    ``load(root, split, download)`` returns the split as a :class:`TensorPair` (``root``: the data
    folder as an absolute Path; ``split``: ``train`` or ``test``; ``download``: whether fetching is
    allowed) and raises :class:`DatasetError` with a sentence saying what to do. ``augment``: the
    recipe's random crop + flip applies by default. ``load`` is None only for the generated
    ``synthetic`` dataset."""

    name: str
    num_classes: int
    image_size: int
    augment: bool
    load: Callable[[Path, str, bool], TensorPair] | None
    description: str = ""


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset under ``spec.name``: every script's ``--dataset`` then accepts it."""
    if spec.name in _REGISTRY:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    if spec.num_classes < 2 or spec.image_size < 1:
        raise ValueError(f"dataset {spec.name!r}: num_classes >= 2 and image_size >= 1 are required")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_dataset(name: str) -> None:
    """Remove a registered dataset (tests register toy datasets and clean up)."""
    _REGISTRY.pop(name, None)


class _ClassCounts(Mapping):
    """``DATASETS``: a live read-only view ``name -> number of classes`` of the registry."""

    def __getitem__(self, name):
        return _REGISTRY[name].num_classes

    def __iter__(self):
        return iter(_REGISTRY)

    def __len__(self):
        return len(_REGISTRY)


DATASETS = _ClassCounts()


def dataset_spec(name: str) -> DatasetSpec:
    """The registered :class:`DatasetSpec` of ``name``; a DatasetError lists the valid names."""
    if name not in _REGISTRY:
        raise DatasetError(f"Unknown dataset {name!r}; valid names are: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def num_classes(name: str) -> int:
    """Number of classes of dataset ``name`` (the model's output width)."""
    return dataset_spec(name).num_classes


def image_size(name: str) -> int:
    """Side length of the dataset's square images (synthetic: its default of 32)."""
    return dataset_spec(name).image_size


def default_augment(name: str) -> bool:
    """Whether the reference recipe augments this dataset: crop+flip for CIFAR only (docs/protocol.md §5)."""
    return dataset_spec(name).augment


def load_dataset(name: str, data_dir=None, split: str = "train", download: bool = True, *,
                 synthetic_size: int | None = None, synthetic_image_size: int = 32,
                 seed: int = 0) -> TensorPair:
    """Load one split of ``name`` into memory; ``seed`` and ``synthetic_*`` affect synthetic only."""
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise DatasetError(f"Unknown split {split!r}; use one of: {', '.join(SPLITS)}.")
    if spec.load is None:
        return make_synthetic(split, synthetic_size, synthetic_image_size, seed)
    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir).expanduser().absolute()
    return spec.load(root, split, download)


def resolve_data_dir(dataset: str, given=None, recorded=None, *, source: str = "the checkpoint") -> str | None:
    """The data folder to read ``dataset`` from, announced in one line on stderr with the reason.

    Order: ``given`` (--data-dir), else ``./data`` when it exists, else ``recorded`` (the folder
    ``source`` was trained on). The folder must exist: a download never creates a folder named by
    a checkpoint. Synthetic data need no folder (None)."""
    if dataset_spec(dataset).load is None:  # generated in memory
        return None
    default = Path(DEFAULT_DATA_DIR)
    if given:
        folder, why = str(given), "given by --data-dir"
    elif default.is_dir():
        other = f"; {source} recorded {recorded}" if recorded and Path(recorded).absolute() != default.absolute() else ""
        folder, why = DEFAULT_DATA_DIR, f"the default folder{other}; pass --data-dir to change"
    elif recorded:
        folder, why = str(recorded), f"recorded in {source}; pass --data-dir to change"
    else:
        raise DatasetError(f"No data folder for {dataset}: {DEFAULT_DATA_DIR} does not exist and {source} records "
                           f"none; pass --data-dir pointing at a copy of {dataset}.")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DatasetError(f"The data folder {folder} ({why.split(';')[0]}) is not an existing folder; pass "
                           f"--data-dir pointing at a copy of {dataset} (nothing was created or downloaded).")
    print(f"data: {path.absolute()} ({why})", file=sys.stderr)
    return folder


# ----------------------------------------------------------------------------- CIFAR


def _load_cifar(name: str, root: Path, split: str, download: bool) -> TensorPair:
    """CIFAR from the pickle layout, else from image folders, else via a torchvision download."""
    layout = _CIFAR[name]
    if (root / layout.folder).is_dir():
        return _read_cifar_pickles(name, root, split)
    folder = _find_image_folder([root / name, root], split)
    if folder is not None:
        return _read_cifar_folder(name, folder, split)
    if download:
        created = [p for p in (root, *root.parents) if not p.exists()]
        try:
            _download_cifar(name, root)
        except Exception as err:  # offline, proxy, disk full...: all mean "provide it yourself"
            _remove_empty(created)
            reason = f"the download failed ({_one_line(err)})"
        else:
            return _read_cifar_pickles(name, root, split)
    else:
        reason = "downloading is disabled"
    raise DatasetError(
        f"{layout.title} not found under {root} (looked for {layout.folder}/ or "
        f"{split}/<class>/ image folders, also under {name}/) and {reason}; pass --data-dir "
        f"pointing at an existing copy, or run once with internet access to download it.")


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created (deepest first), as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (a partial download) or already gone: leave it and its parents
            return


def _download_cifar(name: str, root: Path) -> None:
    """Fetch the official CIFAR pickles into ``root`` with torchvision (needs internet)."""
    from torchvision import datasets  # imported lazily: slow, and only needed here

    root.mkdir(parents=True, exist_ok=True)
    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    dataset_class(str(root), train=True, download=True)


def _one_line(err: Exception) -> str:
    """A short single-line description of an exception for error messages."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:120]}" if text else type(err).__name__


def _numpy_globals() -> dict:
    """The only globals a CIFAR pickle may name: numpy's array and scalar reconstruction functions
    (under numpy 1.x and 2.x module names, resolved to the installed numpy), the plain containers
    set/frozenset/bytearray and ``_codecs.encode``, which Python 3 protocol-2 pickles use for raw bytes.
    None of them can run code of the file's choosing."""
    reconstruct = np.array(0).__reduce__()[0]
    from_buffer = np.array([0]).__reduce_ex__(5)[0]
    scalar = np.float64(0).__reduce__()[0]
    admitted = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for builtins in ("builtins", "__builtin__"):  # Python 3 and 2 names of the plain containers
        admitted.update({(builtins, c.__name__): c for c in (set, frozenset, bytearray)})
    for module in ("numpy.core", "numpy._core"):
        admitted[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        admitted[(f"{module}.multiarray", "scalar")] = scalar
        admitted[(f"{module}.numeric", "_frombuffer")] = from_buffer
    return admitted


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR's python pickles: plain containers and numpy arrays, nothing else."""

    ADMITTED = _numpy_globals()

    def find_class(self, module: str, name: str):
        """The admitted numpy functions; any other global is refused (it could run code)."""
        found = self.ADMITTED.get((module, name))
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        """Persistent ids are never part of a CIFAR pickle."""
        raise pickle.UnpicklingError("persistent id in a CIFAR pickle")


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_CifarUnpickler.ADMITTED`."""


def _unpickle(path: Path) -> dict:
    """Load one CIFAR pickle (byte-string keys decoded to str) without running any code from it."""
    try:
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="bytes").load()
    except _RefusedGlobal as err:
        raise DatasetError(f"{path} is not a CIFAR data file: it names the Python object {err}, and unpickling it "
                           f"could run arbitrary code, so it was not loaded; replace the folder with an official "
                           f"copy.") from None
    except Exception as err:  # noqa: BLE001  (truncated or garbage: EOFError, UnpicklingError, ValueError, ...)
        raise DatasetError(f"Cannot read {path} ({_one_line(err)}): it is truncated or not a CIFAR pickle; "
                           f"replace it with an intact copy.") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{path} holds a {type(entry).__name__}, not the dictionary of a CIFAR pickle; "
                           f"replace it with an intact copy.")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_batch(path: Path, labels_key: str, n_classes: int) -> tuple[np.ndarray, list[int]]:
    """Images (N×3×32×32 uint8) and labels of one CIFAR pickle, checked for shape, count and range."""
    entry = _unpickle(path)
    data, labels = entry.get("data"), entry.get(labels_key)
    damaged = lambda why: DatasetError(f"{path} is damaged ({why}); replace it with an intact copy.")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise damaged(f"'data' must be a uint8 array of N×3072 pixels, found a {what}")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) for v in labels):
        raise damaged(f"'{labels_key}' must be a list of integers")
    if len(labels) != len(data):
        raise damaged(f"{len(labels)} labels for {len(data)} images")
    bad = [int(v) for v in labels if not 0 <= v < n_classes]
    if bad:
        raise damaged(f"label {bad[0]} is outside 0..{n_classes - 1}")
    return data.reshape(-1, 3, 32, 32), [int(v) for v in labels]


def _cifar_classes(path: Path, names_key: str, n_classes: int) -> list[str]:
    """Class names from a CIFAR meta pickle, which must list exactly ``n_classes`` names."""
    names = _unpickle(path).get(names_key)
    if (not isinstance(names, list) or len(names) != n_classes
            or not all(isinstance(n, (bytes, str)) for n in names)):
        raise DatasetError(f"{path} is damaged ('{names_key}' must list {n_classes} class names); replace it with "
                           f"an intact copy.")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _read_cifar_pickles(name: str, root: Path, split: str) -> TensorPair:
    """Read torchvision's CIFAR pickle files (``data`` N×3072 uint8 plus labels) for one split."""
    layout = _CIFAR[name]
    folder = root / layout.folder
    missing = [f for f in layout.files[split] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{layout.title} folder {folder} is incomplete (missing "
                           f"{', '.join(missing)}); delete it to re-download, or pass --data-dir "
                           f"pointing at a complete copy.")
    n_classes = DATASETS[name]
    images, labels = [], []
    for file_name in layout.files[split]:
        batch, batch_labels = _cifar_batch(folder / file_name, layout.labels_key, n_classes)
        images.append(batch)
        labels.extend(batch_labels)
    classes = [str(i) for i in range(n_classes)]
    if (folder / layout.meta_file).is_file():
        classes = _cifar_classes(folder / layout.meta_file, layout.names_key, n_classes)
    x = torch.from_numpy(np.concatenate(images))
    return TensorPair(x, torch.tensor(labels, dtype=torch.int64), classes)


def _read_cifar_folder(name: str, folder: Path, split: str) -> TensorPair:
    """Read a CIFAR image-folder split, insisting on the dataset's class count."""
    classes = _folder_classes(folder, split)
    if len(classes) != DATASETS[name]:
        raise DatasetError(f"Image folder {folder} has {len(classes)} class folders but {name} has "
                           f"{DATASETS[name]}; pass --data-dir pointing at a {name} copy.")
    return _read_class_folders(folder / split, classes, image_size(name))


# ----------------------------------------------------------------------------- Tiny-ImageNet


def _load_tiny_imagenet(root: Path, split: str, download: bool = False) -> TensorPair:
    """Tiny-ImageNet from the official archive layout or from image folders (never downloaded:
    the archive's host is not a package index; the error names the URL)."""
    base = next((c for c in (root / "tiny-imagenet-200", root)
                 if (c / "wnids.txt").is_file() or (c / "train").is_dir()), None)
    if base is None:
        raise DatasetError(
            f"Tiny-ImageNet not found under {root} (looked for tiny-imagenet-200/ with wnids.txt, "
            f"train/ and val/); pass --data-dir pointing at an existing copy, or download "
            f"{TINY_IMAGENET_URL} and unzip it there.")
    wnids = base / "wnids.txt"
    classes = _read_wnids(wnids) if wnids.is_file() else _folder_classes(base, split)
    size = image_size("tiny-imagenet")
    if split == "train":
        return _read_class_folders(base / "train", classes, size)
    if (base / "val" / "val_annotations.txt").is_file():
        return _read_tiny_val(base / "val", classes, size)
    for name in ("val", "test"):
        folders = _subfolders(base / name)
        if folders and set(folders) <= set(classes):
            return _read_class_folders(base / name, classes, size, every_class=False)
    raise DatasetError(f"Tiny-ImageNet under {base} has no labelled test split (looked for "
                       f"val/val_annotations.txt, val/<wnid>/ and test/<wnid>/); pass --data-dir "
                       f"pointing at a complete copy, or unzip {TINY_IMAGENET_URL} there again.")


def _read_wnids(path: Path) -> list[str]:
    """The class ids listed in ``wnids.txt``: non-empty and without repeats."""
    classes = path.read_text(errors="replace").split()
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if not classes or repeated:
        why = f"lists {repeated[0]!r} more than once" if repeated else "lists no class"
        raise DatasetError(f"{path} {why}; pass --data-dir pointing at an intact copy.")
    return classes


def _read_tiny_val(val_dir: Path, classes: list[str], size: int) -> TensorPair:
    """Read the official val split: images in ``val/images``, labels in val_annotations.txt."""
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    paths, labels = [], []
    for line in (val_dir / "val_annotations.txt").read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        if fields[1] not in class_index:
            raise DatasetError(f"{val_dir / 'val_annotations.txt'} names class {fields[1]!r} that "
                               f"is not in wnids.txt; pass --data-dir pointing at an intact copy.")
        paths.append(val_dir / "images" / fields[0])
        labels.append(class_index[fields[1]])
    return _pair_from_files(paths, labels, classes, size)


# ----------------------------------------------------------------------------- image folders


def _subfolders(path: Path) -> list[str]:
    """Sorted names of the sub-directories of ``path`` (empty when it is not a directory)."""
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def _find_image_folder(candidates: list[Path], split: str) -> Path | None:
    """The first candidate root holding ``<split>/<class>/`` directories."""
    return next((c for c in candidates if _subfolders(c / split)), None)


def _folder_classes(root: Path, split: str) -> list[str]:
    """Class names of an image-folder root: sorted ``train/`` folders, so splits agree."""
    return _subfolders(root / "train") or _subfolders(root / split)


def _read_class_folders(split_dir: Path, classes: list[str], size: int, every_class: bool = True) -> TensorPair:
    """Read ``split_dir/<class>/**/*.<image>``; label = position of the folder in ``classes``.

    An existing class folder without images is refused (training would silently lose the class),
    and so is a missing one when ``every_class``."""
    unknown = sorted(set(_subfolders(split_dir)) - set(classes))
    if unknown:
        raise DatasetError(f"{split_dir} has folders {unknown[:3]} that are not classes of the "
                           f"training split; pass --data-dir pointing at a consistent copy.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            if every_class:
                raise DatasetError(f"Class folder {class_dir} is missing, so class {name!r} would have no images; "
                                   f"pass --data-dir pointing at a complete copy.")
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir())
        if not files:
            raise DatasetError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}), so class "
                               f"{name!r} would be left out; add its images or pass --data-dir pointing at a "
                               f"complete copy.")
        paths.extend(files)
        labels.extend([label] * len(files))
    return _pair_from_files(paths, labels, classes, size)


def _pair_from_files(paths: list[Path], labels: list[int], classes: list[str],
                     size: int) -> TensorPair:
    """Decode image files with PIL into a TensorPair (about 0.2 ms per small image)."""
    if not paths:
        raise DatasetError(f"No images found for {len(classes)} classes (first class folder tried: "
                           f"{classes[0] if classes else 'none'}); pass --data-dir pointing at a "
                           f"complete copy.")
    images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded
        for i, path in enumerate(paths):
            images[i] = _read_rgb(path, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return TensorPair(x, torch.tensor(labels, dtype=torch.int64), classes)


def _read_rgb(path: Path, size: int) -> np.ndarray:
    """One image as an H×W×3 uint8 RGB array, checking it is a regular file of the right size
    (read from the header, before decoding); 16-bit grey images are scaled to 8 bits, not clipped."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block open() forever
            raise DatasetError(f"{path} is not a regular file (a FIFO, socket or device named like an image), so it "
                               f"is refused rather than read; remove it or pass --data-dir pointing at an intact copy.")
        with Image.open(path) as image:
            if image.size != (size, size):
                raise DatasetError(f"Image {path} is {image.size[0]}×{image.size[1]} but this dataset needs "
                                   f"{size}×{size}; pass --data-dir pointing at the original images.")
            return _to_rgb8(image, path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DatasetError(f"Image {path} is refused as a possible decompression bomb ({_one_line(err)}); remove "
                           f"it or pass --data-dir pointing at the original images.") from None
    except OSError as err:
        raise DatasetError(f"Cannot read image {path} ({_one_line(err)}); remove it or pass "
                           f"--data-dir pointing at an intact copy.") from None


def _to_rgb8(image: Image.Image, path: Path) -> np.ndarray:
    """H×W×3 uint8 pixels of an open image: 8-bit modes through PIL, 16-bit grey divided by 257."""
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format == "PNG")
    if sixteen_bit:  # PIL's convert("RGB") would clip 0..65535 at 255; PNG's "I" is its 16-bit grey
        grey = np.asarray(image).astype(np.float64)
        if grey.min() < 0 or grey.max() > 65535:
            raise DatasetError(f"Image {path} has grey values outside 0..65535; convert it to 8-bit RGB.")
        return np.repeat(np.rint(grey / 257).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise DatasetError(f"Image {path} has {'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels "
                           f"(mode {image.mode}) whose range is unknown; convert it to 8-bit RGB.")
    return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------- synthetic


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (e.g. seed, epoch) so streams never collide."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def make_synthetic(split: str = "train", size: int | None = None, image_size: int = 32,
                   seed: int = 0) -> TensorPair:
    """Seeded class-pattern images: learnable in a few epochs, moderate L∞ margin (see _SYNTH_*).

    Both splits share the class patterns of ``seed``; their noise streams differ. Examples are
    drawn in blocks of ``_SYNTH_ROUNDS`` rounds, each round one example per class in random order;
    each block comes from its own seeded stream, so example ``i`` is the same whatever ``size`` (a
    smaller split is a prefix of a larger one) and the class counts of any split differ by at most one.
    """
    count = SYNTHETIC_SIZES[split] if size is None else size
    _check_synthetic_size(count, image_size)
    n_classes = DATASETS["synthetic"]
    patterns = _synthetic_patterns(seed, n_classes, image_size)
    x = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    y = torch.empty(count, dtype=torch.int64)
    per_block = _SYNTH_ROUNDS * n_classes
    for block, start in enumerate(range(0, count, per_block)):
        stop = min(start + per_block, count)
        x[start:stop], y[start:stop] = _synthetic_block(patterns, _generator(seed, 1 + SPLITS.index(split), block),
                                                        stop - start)
    return TensorPair(x, y, [f"pattern{c}" for c in range(n_classes)])


def _synthetic_block(patterns: torch.Tensor, gen: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` examples of one block of ``_SYNTH_ROUNDS`` rounds (each a random order of
    the classes), drawn from ``gen``; the draws never depend on ``count``."""
    n_classes, _, side, _ = patterns.shape
    n = _SYNTH_ROUNDS * n_classes
    y = torch.rand(_SYNTH_ROUNDS, n_classes, generator=gen).argsort(dim=1).flatten()
    low, high = _SYNTH_AMPLITUDE
    amplitude = low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)
    cast = _SYNTH_CAST * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    noise = _SYNTH_NOISE * torch.randn(n, 3, side, side, generator=gen)
    y, amplitude, cast, noise = y[:count], amplitude[:count], cast[:count], noise[:count]
    x = 0.5 + _SYNTH_CONTRAST * amplitude * patterns[y] + cast + noise
    return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8), y


def max_synthetic_size(image_size: int) -> int:
    """The most synthetic images of ``image_size`` pixels one split may hold (SYNTHETIC_MAX_BYTES of uint8)."""
    return SYNTHETIC_MAX_BYTES // (3 * max(image_size, 1) ** 2)


def _check_synthetic_size(count: int, image_size: int) -> None:
    """Refuse a synthetic split that is negative or would not fit in SYNTHETIC_MAX_BYTES of memory."""
    if count < 0 or image_size < 1 or count > max_synthetic_size(image_size):
        raise DatasetError(f"A synthetic split of {count} images of {image_size}×{image_size} pixels is impossible or "
                           f"would take {count * 3 * image_size ** 2 / 2 ** 30:.1f} GiB; ask for between 0 and "
                           f"{max_synthetic_size(image_size)} images.")


def _synthetic_patterns(seed: int, n_classes: int, size: int) -> torch.Tensor:
    """Per-class smooth colour patterns (C×3×S×S), each pixel-standardised to unit std."""
    coarse = torch.randn(n_classes, 3, _SYNTH_GRID, _SYNTH_GRID, generator=_generator(seed, 0))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    smooth = smooth - smooth.mean(dim=(1, 2, 3), keepdim=True)
    return smooth / smooth.std(dim=(1, 2, 3), keepdim=True)


# ----------------------------------------------------------------------------- registered datasets

register_dataset(DatasetSpec("cifar10", 10, 32, True, lambda root, split, download: _load_cifar("cifar10", root, split, download),
                             "CIFAR-10: torchvision pickles or image folders; downloaded when online"))
register_dataset(DatasetSpec("cifar100", 100, 32, True,
                             lambda root, split, download: _load_cifar("cifar100", root, split, download),
                             "CIFAR-100: torchvision pickles or image folders; downloaded when online"))
register_dataset(DatasetSpec("tiny-imagenet", 200, 64, False, _load_tiny_imagenet,
                             f"Tiny-ImageNet: the official archive layout or image folders ({TINY_IMAGENET_URL})"))
register_dataset(DatasetSpec("synthetic", 10, 32, False, None,
                             "generated in memory: seeded class patterns plus noise (offline smoke runs)"))


# ----------------------------------------------------------------------------- subsets


def split_holdout(data: TensorPair, n_holdout: int, seed: int) -> tuple[TensorPair, TensorPair]:
    """Split off ``n_holdout`` random examples (seeded, class-agnostic) for --val-size.

    Both parts keep the original example order.
    """
    if not 0 <= n_holdout < len(data):
        raise ValueError(f"n_holdout must be in [0, {len(data)}), got {n_holdout}")
    perm = torch.randperm(len(data), generator=_generator(seed))
    holdout, train = perm[:n_holdout].sort().values, perm[n_holdout:].sort().values
    return data.subset(train), data.subset(holdout)


def fixed_subset(data: TensorPair, n: int | None, seed: int = 0) -> TensorPair:
    """The first ``n`` examples of a seeded permutation: a fixed eval subset; whole set if n is None.

    Kept in permutation order, so a smaller ``n`` gives a prefix of a larger one.
    """
    if n is None or n >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=_generator(seed))[:n])


# ----------------------------------------------------------------------------- loader


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              padding: int = CROP_PADDING) -> torch.Tensor:
    """Crop each image at (top, left) of its zero-padded copy, mirrored where ``flip``: one gather.

    ``x`` is B×C×H×W (any dtype/device); ``top``/``left`` are in [0, 2*padding], ``flip`` is bool.
    """
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    device = x.device
    rows = top.to(device)[:, None] + torch.arange(height, device=device)
    col_offsets = torch.arange(width, device=device)
    col_offsets = torch.where(flip.to(device)[:, None], width - 1 - col_offsets, col_offsets)
    cols = left.to(device)[:, None] + col_offsets
    batch_idx = torch.arange(batch, device=device)[:, None, None, None]
    channel_idx = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_idx, channel_idx, rows[:, None, :, None], cols[:, None, None, :]]


def crop_flip_params(batch: int, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """3×batch int64 rows (top, left, flip) of the docs/protocol.md §5 augmentation, drawn on the CPU."""
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.stack([top, left, flip.long()])


def random_crop_flip(x: torch.Tensor, generator: torch.Generator,
                     padding: int = CROP_PADDING) -> torch.Tensor:
    """docs/protocol.md §5 augmentation: random crop with zero padding plus random horizontal flip."""
    top, left, flip = crop_flip_params(x.shape[0], generator, padding)
    return crop_flip(x, top, left, flip.bool(), padding)


class BatchLoader:
    """Iterates (x float [0,1] B×3×H×W, y int64) batches of a TensorPair on ``device``.

    The whole uint8 set is moved to ``device`` once. Order and augmentation are drawn on the CPU
    from (seed, epoch), so they are identical on any device and in resumed runs. Each pass uses
    the current epoch and then advances it; ``set_epoch(e)`` makes the next pass use epoch ``e``.

    Sharding: every rank draws the same global permutation, padded by wrapping its start to a
    multiple of ``world_size``, and takes the strided elements ``[rank::world_size]``. Shards are
    thus equal-sized, disjoint up to that padding, and batch b of all ranks together is global
    batch b of size ``batch_size * world_size``. With ``pad=False`` (evaluation) nothing is
    repeated: every example is in exactly one shard and shards may differ by one in size.
    """

    def __init__(self, data: TensorPair, batch_size: int, *, shuffle: bool, augment: bool,
                 device="cpu", drop_last: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, pad: bool = True):
        """Validate the arguments and move the dataset to ``device``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=}, {world_size=}")
        self.x = data.x.to(device)
        self.y = data.y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use ``epoch``'s order and augmentation (for resume and sharding)."""
        self.epoch = epoch

    def _shard_size(self) -> int:
        """Examples this rank sees per pass."""
        if not self.pad:
            return len(range(self.rank, self.x.shape[0], self.world_size))
        return math.ceil(self.x.shape[0] / self.world_size)

    def __len__(self) -> int:
        """Batches per pass on this rank."""
        if self.drop_last:
            return self._shard_size() // self.batch_size
        return math.ceil(self._shard_size() / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's example indices (CPU, int64) for ``epoch``, in iteration order."""
        total = self.x.shape[0]
        order = (torch.randperm(total, generator=_generator(self.seed, epoch)) if self.shuffle
                 else torch.arange(total))
        if self.pad:
            padded_total = self._shard_size() * self.world_size
            order = torch.cat([order, order[:padded_total - total]])
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Start a pass with the current epoch and advance the epoch counter."""
        epoch, self.epoch = self.epoch, self.epoch + 1
        order = self.indices(epoch).to(self.x.device)
        return self._batches(order, _generator(self.seed, epoch, self.rank, 1))

    def _augment_params(self, order: torch.Tensor, aug_gen: torch.Generator):
        """Every batch's crop/flip parameters, drawn batch by batch as :func:`random_crop_flip`
        would, and sent to the device in one copy (a copy per batch would stall a GPU queue)."""
        sizes = [len(order[b * self.batch_size:(b + 1) * self.batch_size]) for b in range(len(self))]
        params = torch.cat([crop_flip_params(size, aug_gen) for size in sizes], 1) if sizes else None
        if params is not None and self.x.device.type == "cuda":
            params = params.pin_memory().to(self.x.device, non_blocking=True)
        return params

    def _batches(self, order: torch.Tensor, aug_gen: torch.Generator):
        """Yield the batches of one pass in ``order``."""
        params = self._augment_params(order, aug_gen) if self.augment else None
        for b in range(len(self)):
            chunk = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[chunk]
            x = self.x[idx]
            if params is not None:
                top, left, flip = params[:, chunk]
                x = crop_flip(x, top, left, flip.bool())
            yield x.float().div_(255), self.y[idx]
