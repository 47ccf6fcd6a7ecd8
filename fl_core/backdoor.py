"""Backdoor triggers and their success rate, for the model-replacement attack.

:func:`apply_trigger` / :class:`PixelTrigger` stamp a pixel pattern;
:func:`backdoor_success` measures how often a model sends triggered images to
the attacker's class. Re-exported by :mod:`fl_core.adversaries`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CORNERS", "PixelTrigger", "apply_trigger", "backdoor_success"]

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def apply_trigger(
    images: torch.Tensor,
    *,
    size: int = 3,
    corner: str = "bottom_right",
    value: float = 1.0,
) -> torch.Tensor:
    """Stamp a ``size × size`` square of ``value`` (white for images in [0, 1]) in a corner.

    A pixel-pattern backdoor trigger in the spirit of Gu et al. 2017 (BadNets)
    and Bagdasaryan et al. 2020; the same pattern on every channel.

    Args:
        images: (N, C, H, W).
        size: side of the square, in pixels.
        corner: ``"bottom_right"``, ``"bottom_left"``, ``"top_right"`` or ``"top_left"``.
        value: the pixel value written.

    Returns:
        A triggered copy (N, C, H, W); ``images`` is left unchanged.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"trigger size {size}: use 1..{min(h, w)} for {h}x{w} images")
    if corner not in CORNERS:
        raise ValueError(f"unknown corner {corner!r}; valid corners: {', '.join(CORNERS)}")
    rows = slice(h - size, h) if corner.startswith("bottom") else slice(0, size)
    cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
    out = images.clone()
    out[..., rows, cols] = value
    return out


@dataclass(frozen=True)
class PixelTrigger:
    """A square pixel trigger, callable on images (N, C, H, W); see :func:`apply_trigger`."""

    size: int = 3
    corner: str = "bottom_right"
    value: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"trigger size {self.size}: use a positive integer")
        if self.corner not in CORNERS:
            raise ValueError(f"unknown corner {self.corner!r}; valid corners: {', '.join(CORNERS)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return apply_trigger(images, size=self.size, corner=self.corner, value=self.value)


def backdoor_success(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: int,
    trigger: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Backdoor accuracy (Bagdasaryan et al. 2020): the share of triggered test images
    whose true class is not ``target`` that ``model`` (eval mode) classifies as ``target``.

    Args:
        model: the model under test.
        images: (N, C, H, W) clean test images.
        labels: (N,) their labels.
        target: the attacker's label.
        trigger: the trigger (default :class:`PixelTrigger`'s white 3x3 square).
    """
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"every test image is of class {target}: nothing to measure")
    x = (trigger or PixelTrigger())(images[keep])  # (n, C, H, W)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x.to(next(model.parameters()).device)).argmax(1).cpu()
    model.train(was_training)
    return float((pred == target).float().mean())
