"""Datasets and client partitions for federated-learning experiments.

Every loader returns an :class:`ImageData`: one ``(N, C, H, W)`` float32 tensor in
``[0, 1]`` and ``(N,)`` int64 labels. Sources: photographs bundled in scikit-image
(``samples``, no network), the user's image files or class folders, and torchvision's
CIFAR-10/100, MNIST and Fashion-MNIST.

Every source is cropped, converted and resized the same way: :mod:`fl_core.images`
holds that pipeline and :class:`ImageData`, :mod:`fl_core.normalization` the
datasets' input statistics; their public names import from here too. Client
partitions live in :mod:`fl_core.partition`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from skimage import data as skdata
from skimage import util
from torchvision.datasets.folder import IMG_EXTENSIONS

from .images import (
    ImageData,
    IntArrayLike,
    Shape,
    _check_int,
    _check_shape,
    _fit,
    _fit_many,
    _int_array,
    _read_image,
    _to_hwc,
)
from .normalization import NORMALIZATION, dataset_normalization, image_statistics

__all__ = [
    "DATASETS",
    "ImageData",
    "NORMALIZATION",
    "SAMPLE_NAMES",
    "dataset_normalization",
    "image_statistics",
    "load_dataset",
    "load_image_files",
    "load_image_folder",
    "load_samples",
    "load_torchvision",
]

logger = logging.getLogger(__name__)

ShapeLike = Sequence[int]
PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------- embedded samples

SAMPLE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "motorcycle",
    "clock", "hubble_deep_field", "immunohistochemistry", "retina", "grass", "gravel",
    "brick", "text", "page", "cell",
)  # fmt: skip
"""The photographs of :func:`load_samples`, in label order: ``skimage.data`` functions
whose files ship inside scikit-image ("motorcycle" is the left ``stereo_motorcycle`` view)."""


@functools.lru_cache(maxsize=8)
def _sample_stack(shape: Shape) -> torch.Tensor:
    out = []
    for name in SAMPLE_NAMES:
        raw = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
        out.append(torch.from_numpy(_fit(_to_hwc(raw)[None], shape)))
    return torch.cat(out)


def load_samples(
    *, shape: ShapeLike = (3, 32, 32), num_classes: int = 10, count: int | None = None
) -> ImageData:
    """The photographs bundled with scikit-image (no download), see ``SAMPLE_NAMES``.

    Sample ``i`` gets label ``i % num_classes``. Each call returns fresh tensors with
    identical values.

    Args:
        shape: target ``(C, H, W)``; ``C`` is 1 (gray) or 3 (RGB).
        num_classes: number of classes the labels cycle through.
        count: keep only the first ``count`` samples (default: all).

    Returns:
        ImageData with images ``(count, C, H, W)`` and labels ``(count,)``.
    """
    shape = _check_shape(shape)
    count = len(SAMPLE_NAMES) if count is None else _check_int(count, "count", 1)
    if count > len(SAMPLE_NAMES):
        raise ValueError(f"count {count} exceeds the {len(SAMPLE_NAMES)} samples available")
    _check_int(num_classes, "num_classes", 1)
    labels = torch.arange(count, dtype=torch.int64) % num_classes
    return ImageData(
        _sample_stack(shape)[:count].clone(), labels, num_classes, SAMPLE_NAMES[:count]
    )


# ---------------------------------------------------------------- user files and folders


def load_image_files(
    paths: Sequence[PathLike] | PathLike,
    *,
    labels: IntArrayLike | None = None,
    shape: ShapeLike = (3, 32, 32),
    num_classes: int = 10,
) -> ImageData:
    """Image files (anything PIL reads), cropped and resized to ``shape``.

    Without ``labels``, file ``i`` (in the order given) gets label ``i % num_classes``.

    Args:
        paths: image files (or one path).
        labels: one int in ``[0, num_classes)`` per file.
        shape: target ``(C, H, W)``; ``C`` is 1 or 3.
        num_classes: number of classes.

    Returns:
        ImageData with images ``(N, C, H, W)``, labels ``(N,)`` and file names.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file cannot be decoded, or bad ``labels`` / ``shape``.
    """
    shape = _check_shape(shape)
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no image files given; pass at least one path")
    _check_int(num_classes, "num_classes", 1)
    if labels is None:
        y = torch.arange(len(files), dtype=torch.int64) % num_classes
    else:
        y = torch.from_numpy(_int_array(labels, "labels", high=num_classes))
        if len(y) != len(files):
            raise ValueError(f"got {len(y)} labels for {len(files)} files; pass one per file")
    images = _fit_many([_read_image(p) for p in files], shape)
    return ImageData(images, y, num_classes, tuple(p.name for p in files))


def _pick(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``limit`` out of ``n`` items."""
    if limit is None or _check_int(limit, "limit", 1) >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _list_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class names and (relative file, label) pairs of an ImageFolder tree."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"no class sub-folders in {root}; expected {root}/<class>/<image files>")
    items = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            images = [f for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
            items += [((rel / f).as_posix(), label) for f in images]
    if not items:
        raise ValueError(f"no image files in the class sub-folders of {root}")
    return classes, items


def load_image_folder(
    path: PathLike, *, shape: ShapeLike | None = None, limit: int | None = None, seed: int = 0
) -> ImageData:
    """A torchvision ``ImageFolder`` tree ``path/<class>/**/<image>``, decoded with PIL.

    Labels follow the sorted class-folder names, as in ``ImageFolder``.

    Args:
        path: folder holding one sub-folder per class.
        shape: target ``(C, H, W)``; ``None`` keeps the native size, which all
            images must then share.
        limit: keep a seeded random subset of ``limit`` items (in file order).
        seed: seed of that subset.

    Returns:
        ImageData with images ``(N, C, H, W)``, labels ``(N,)`` and names
        ``"<class>/<file>"``; ``num_classes`` is the number of class folders.
    """
    root = Path(path)
    classes, items = _list_folder(root)
    items = [items[i] for i in _pick(len(items), limit, seed)]
    arrays = [_read_image(root / rel) for rel, _ in items]
    if shape is None:
        sizes = sorted({a.shape for a in arrays})
        if len(sizes) > 1:
            raise ValueError(
                f"images in {root} differ in (H, W, C): {sizes[0]} vs {sizes[1]}; "
                "pass shape=(C, H, W) to resize them"
            )
        images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    else:
        images = _fit_many(arrays, _check_shape(shape))
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    logger.info("loaded %d images of %d classes from %s", len(items), len(classes), root)
    return ImageData(images, labels, len(classes), tuple(rel for rel, _ in items))


# ---------------------------------------------------------------- torchvision datasets

_TORCHVISION: dict[str, tuple[Callable[..., Any], int]] = {
    "cifar10": (torchvision.datasets.CIFAR10, 10),
    "cifar100": (torchvision.datasets.CIFAR100, 100),
    "mnist": (torchvision.datasets.MNIST, 10),
    "fashion-mnist": (torchvision.datasets.FashionMNIST, 10),
}
# Official label order (batches.meta of the CIFAR-10 release); sorted order equals it.
_CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _cifar10_folder(root: Path, split: str, **kw: Any) -> ImageData | None:
    """CIFAR-10 from class folders ``root/cifar10/<split>/<class>/``; None if absent."""
    folder = root / "cifar10" / split
    if not folder.is_dir():
        return None
    if tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir())) != _CIFAR10_CLASSES:
        raise ValueError(f"{folder} must hold exactly the class folders {_CIFAR10_CLASSES}")
    found = load_image_folder(folder, **kw)
    names = tuple(f"cifar10/{split}/{n}" for n in found.names)
    return ImageData(found.images, found.labels, 10, names)


def load_torchvision(
    name: str,
    *,
    root: PathLike,
    train: bool = False,
    download: bool = False,
    shape: ShapeLike | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> ImageData:
    """A torchvision dataset, converted whole from its ``.data`` / ``.targets`` arrays.

    ``"cifar10"`` without torchvision's files (and without ``download``) falls back
    to class folders ``root/cifar10/{train,test}/<class>/`` (names ``cifar10/<split>/
    <class>/<file>``).

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"mnist"`` or ``"fashion-mnist"``.
        root: folder holding (or receiving) torchvision's files.
        train: the training split instead of the test split.
        download: let torchvision download missing files.
        shape: target ``(C, H, W)``; ``None`` keeps the native ``3x32x32`` (CIFAR)
            or ``1x28x28`` (MNIST).
        limit: keep a seeded random subset of ``limit`` items (in index order).
        seed: seed of that subset.

    Returns:
        ImageData with images ``(N, C, H, W)``, labels ``(N,)`` and names
        ``f"{name}[{index}]"``.
    """
    if name not in _TORCHVISION:
        valid = ", ".join(_TORCHVISION)
        raise ValueError(f"unknown torchvision dataset {name!r}; valid names: {valid}")
    cls, num_classes = _TORCHVISION[name]
    root, split = Path(root), ("train" if train else "test")
    try:
        ds = cls(str(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:  # missing/corrupt files, or a failed download
        if name == "cifar10" and not download:
            found = _cifar10_folder(root, split, shape=shape, limit=limit, seed=seed)
            if found is not None:
                return found
        if download:
            reason = " ".join(str(exc).split())
            raise ValueError(f"cannot download {name} to {root}: {reason}") from exc
        raise ValueError(
            f"dataset {name} not found under {root}; pass download=True (CLI: --download) "
            "or point root (CLI: --data-root) at a folder holding it"
        ) from exc
    raw = np.asarray(ds.data)  # (N, H, W, 3) uint8 for CIFAR, (N, H, W) uint8 for MNIST
    idx = _pick(len(raw), limit, seed)
    raw, targets = raw[idx], np.asarray(ds.targets, dtype=np.int64)[idx]
    raw = raw[..., None] if raw.ndim == 3 else raw  # (N, H, W, C)
    if shape is None:
        images = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    else:
        images = torch.from_numpy(_fit(util.img_as_float32(raw), _check_shape(shape)))
    logger.info("loaded %d items of %s (%s)", len(idx), name, split)
    names = tuple(f"{name}[{i}]" for i in idx.tolist())
    return ImageData(images, torch.from_numpy(targets), num_classes, names)


# ---------------------------------------------------------------- registry

DATASETS: dict[str, Callable[..., ImageData]] = {}
"""Loaders by name; each takes the keyword arguments of :func:`load_dataset`."""


def _samples_entry(*, shape: Any, num_classes: int, limit: int | None, **_: Any) -> ImageData:
    return load_samples(shape=shape or (3, 32, 32), num_classes=num_classes, count=limit)


def _torchvision_entry(name: str) -> Callable[..., ImageData]:
    def entry(*, num_classes: int | None = None, **kw: Any) -> ImageData:
        return load_torchvision(name, **kw)  # the data defines num_classes

    return entry


DATASETS["samples"] = _samples_entry
DATASETS.update({name: _torchvision_entry(name) for name in _TORCHVISION})


def load_dataset(
    name: str,
    *,
    root: PathLike = "data",
    train: bool = False,
    download: bool = False,
    shape: ShapeLike | None = None,
    num_classes: int = 10,
    limit: int | None = None,
    seed: int = 0,
) -> ImageData:
    """A dataset by registered name (a key of ``DATASETS``) or class-folder path.

    Args:
        name: a key of ``DATASETS`` or a folder of class sub-folders.
        root: data folder of the torchvision datasets.
        train: training split instead of test split (torchvision datasets).
        download: allow torchvision downloads.
        shape: target ``(C, H, W)``; ``None`` keeps the native size
            (``(3, 32, 32)`` for ``samples``).
        num_classes: label count of ``samples``; other sources define their own.
        limit: item count: the first ``limit`` photographs of ``samples``, a seeded
            random subset of the others.
        seed: seed of that subset.

    Returns:
        ImageData with images ``(N, C, H, W)`` and labels ``(N,)``.
    """
    key = str(name).lower().replace("_", "-")
    kw = dict(root=root, train=train, download=download, shape=shape, limit=limit, seed=seed)
    if key in DATASETS:
        return DATASETS[key](num_classes=num_classes, **kw)
    if Path(name).is_dir():
        return load_image_folder(name, shape=shape, limit=limit, seed=seed)
    raise ValueError(
        f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}, "
        "or a folder of class sub-folders"
    )
