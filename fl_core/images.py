"""The labelled image set every loader returns, and the image pipeline the loaders share.

:class:`ImageData` holds ``(N, C, H, W)`` float32 images in ``[0, 1]`` and ``(N,)``
int64 labels. Decoding reads a file with PIL to ``(H, W, C)`` float32. Resizing is the
same everywhere: center-crop to the target aspect ratio (a square for square targets),
reduce RGB to gray (BT.709 luminance, ``skimage.color.rgb2gray``) when one channel is
asked for, resize bilinearly with anti-aliasing (``skimage.transform.resize``), and
replicate gray to three channels when three are. The loaders are in :mod:`fl_core.data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from skimage import color, transform, util

__all__ = ["ImageData", "IntArrayLike", "Shape"]

Shape = tuple[int, int, int]
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
