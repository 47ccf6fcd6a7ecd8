"""Datasets and client partitions for federated-learning experiments.

Every loader returns an :class:`ImageData`: one ``(N, C, H, W)`` float32 tensor in
``[0, 1]`` and ``(N,)`` int64 labels. Sources: photographs bundled in scikit-image
(``samples``, no network), the user's image files or class folders, and torchvision's
CIFAR-10/100, MNIST and Fashion-MNIST.

Resizing is the same everywhere: center-crop to the target aspect ratio (a square
for square targets), reduce RGB to gray (BT.709 luminance, ``skimage.color.rgb2gray``)
when one channel is asked for, resize bilinearly with anti-aliasing
(``skimage.transform.resize``), and replicate gray to three channels when three are.

Client partitions live in :mod:`fl_core.partition`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from skimage import color, transform, util
from skimage import data as skdata
from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger(__name__)

Shape = tuple[int, int, int]
ShapeLike = Sequence[int]
PathLike = str | os.PathLike[str]
IntArrayLike = Sequence[int] | np.ndarray | torch.Tensor
_CHUNK = 4096  # images resized per call, to bound memory on large datasets


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image set held in memory.

    Attributes:
        images: ``(N, C, H, W)`` float32 tensor with values in ``[0, 1]``.
        labels: ``(N,)`` int64 tensor with values in ``[0, num_classes)``.
        num_classes: number of classes of the source (not only those present).
        names: ``N`` short descriptions, one per item (file name, sample name,
            or ``f"{dataset}[{index}]"``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        x, y = self.images, self.labels
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError("images must be a float tensor of shape (N, C, H, W)")
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype != torch.int64:
            raise ValueError("labels must be an int64 tensor of shape (N,)")
        if not len(x) == len(y) == len(self.names):
            raise ValueError(
                f"got {len(x)} images, {len(y)} labels, {len(self.names)} names; "
                "pass one label and one name per image"
            )
        _check_int(self.num_classes, "num_classes", 1)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i`` as (image ``(C, H, W)``, label ``()``)."""
        return self.images[i], self.labels[i]

    @property
    def shape(self) -> Shape:
        """Shape ``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return (c, h, w)

    def subset(self, indices: IntArrayLike) -> ImageData:
        """The items at ``indices`` (1-D ints in ``[0, N)``), in that order."""
        idx = _int_array(indices, "subset indices", high=len(self))
        names = tuple(self.names[i] for i in idx.tolist())
        t = torch.from_numpy(idx)
        return ImageData(self.images[t], self.labels[t], self.num_classes, names)


# ---------------------------------------------------------------- checks and conversion


def _check_int(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    return int(value)


def _int_array(values: Any, what: str, *, high: int | None = None) -> np.ndarray:
    """1-D int64 array from a sequence/array/tensor of ints in ``[0, high)``."""
    arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or (high is not None and arr.max() >= high)):
        raise ValueError(f"{what} must lie in [0, {high if high is not None else 'inf'})")
    return arr


def _check_shape(shape: Any) -> Shape:
    try:
        c, h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W), got {shape!r}") from None
    if c not in (1, 3) or h < 1 or w < 1:
        raise ValueError(f"shape must be (C, H, W) with C 1 or 3 and H, W >= 1, got {shape!r}")
    return (c, h, w)


def _to_hwc(arr: np.ndarray) -> np.ndarray:
    """A decoded image as ``(H, W, C)`` float32 in ``[0, 1]``, C 1 or 3 (alpha dropped)."""
    arr = util.img_as_float32(np.clip(arr, 0.0, 1.0) if arr.dtype.kind == "f" else arr)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unsupported image array of shape {arr.shape}")
    return arr[:, :, :-1] if arr.shape[2] in (2, 4) else arr


def _fit(batch: np.ndarray, shape: Shape) -> np.ndarray:
    """Crop, convert and resize an ``(N, H, W, C)`` batch to ``(N, *shape)`` float32.

    Inputs already of the target size and channels pass through unchanged.
    """
    c, h, w = shape
    n, src_h, src_w = batch.shape[:3]
    if src_h * w > src_w * h:  # too tall: keep the middle rows
        keep = max(1, round(src_w * h / w))
        batch = batch[:, (src_h - keep) // 2 :][:, :keep]
    elif src_h * w < src_w * h:  # too wide: keep the middle columns
        keep = max(1, round(src_h * w / h))
        batch = batch[:, :, (src_w - keep) // 2 :][:, :, :keep]
    if c == 1 and batch.shape[3] == 3:
        batch = color.rgb2gray(batch)[..., None]
    if batch.shape[1:3] != (h, w):
        ch = batch.shape[3]
        out = np.empty((n, h, w, ch), dtype=np.float32)
        for i in range(0, n, _CHUNK):  # images side by side on the last axis: same result, faster
            b = batch[i : i + _CHUNK]
            side = b.transpose(1, 2, 0, 3).reshape(b.shape[1], b.shape[2], -1)
            small = transform.resize(side, (h, w), order=1, anti_aliasing=True)
            out[i : i + _CHUNK] = small.reshape(h, w, len(b), ch).transpose(2, 0, 1, 3)
        batch = out
    if c == 3 and batch.shape[3] == 1:
        batch = np.repeat(batch, 3, axis=3)
    batch = np.clip(batch, 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


def _fit_many(arrays: Sequence[np.ndarray], shape: Shape) -> torch.Tensor:
    """Fit ``(H, W, C)`` arrays of any sizes into one ``(N, *shape)`` tensor."""
    out = torch.empty((len(arrays), *shape), dtype=torch.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, arr in enumerate(arrays):
        groups.setdefault(arr.shape, []).append(i)
    for idx in groups.values():  # one batched resize per source size
        out[idx] = torch.from_numpy(_fit(np.stack([arrays[i] for i in idx]), shape))
    return out


def _read_image(path: Path) -> np.ndarray:
    """Decode one image file to ``(H, W, C)`` float32 in ``[0, 1]``, C 1 or 3."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode in ("1", "L", "LA"):
                arr = np.asarray(img.convert("L"))
            elif img.mode.startswith("I"):  # 16/32-bit gray, read as 16-bit
                arr = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float32)
            else:
                arr = np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot read image file {path}: {reason}") from None
    return _to_hwc(arr)


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


# ---------------------------------------------------------------- input normalisation

Stats = tuple[tuple[float, ...], tuple[float, ...]]

NORMALIZATION: dict[str, Stats] = {
    # per-channel mean and std of each training split, in [0, 1] pixel units
    "cifar10": (
        (0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
        (0.24703224003314972, 0.24348513782024384, 0.26158785820007324),
    ),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
"""Published input statistics: the mean/std pairs torchvision's and breaching's
recipes normalise with (CIFAR-10's to full precision as breaching's
``config/case/data/CIFAR10.yaml`` gives them; ImageNet's from torchvision's
model documentation). ``samples`` and image files are natural photographs and
take ImageNet's."""

_LUMA = (0.2125, 0.7154, 0.0721)  # BT.709, as skimage.color.rgb2gray


def _fit_channels(stats: Stats, channels: int) -> Stats:
    """Stats for ``channels``: gray replicated to RGB, RGB reduced with the BT.709 weights.

    The RGB -> gray reduction of the std is an approximation (it ignores the
    correlation between channels); the mean is exact.
    """
    mean, std = stats
    if len(mean) == channels:
        return stats
    if len(mean) == 1:
        return mean * channels, std * channels
    return (
        (sum(w * m for w, m in zip(_LUMA, mean)),),
        (sum(w * s for w, s in zip(_LUMA, std)),),
    )


def image_statistics(images: torch.Tensor) -> Stats:
    """Per-channel mean and std over all pixels of ``images`` (N, C, H, W)."""
    x = images.double().transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return tuple(x.mean(1).tolist()), tuple(x.std(1, correction=0).clamp_min(1e-6).tolist())


def dataset_normalization(name: str | None, data: ImageData | None = None) -> Stats:
    """The input normalisation a victim trained on dataset ``name`` would carry.

    Args:
        name: a key of :data:`NORMALIZATION` (``samples`` and ``None``, i.e.
            image files, mean ImageNet's), or a folder of class sub-folders,
            whose statistics are computed from ``data``.
        data: the loaded images (their channel count decides between gray and
            RGB statistics; a folder's statistics are those of these images).

    Returns:
        ``(mean, std)``, one value per channel each.
    """
    key = "imagenet" if name in (None, "samples") else str(name).lower().replace("_", "-")
    channels = data.shape[0] if data is not None else 3
    if key in NORMALIZATION:
        return _fit_channels(NORMALIZATION[key], channels)
    if data is None:
        raise ValueError(f"no published statistics for dataset {name!r}; pass its images")
    return image_statistics(data.images)
