"""Figures of one experiment: reconstructions next to originals, loss curves.

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot,
so writing them neither needs a display nor switches the caller's backend
(inline plots in a notebook keep working after an attack has saved its PNGs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

__all__ = ["plot_history", "plot_reconstruction", "show_image"]


def show_image(ax, image: torch.Tensor) -> None:
    """Draw one (C, H, W) image in [0, 1] on a matplotlib axis, without ticks."""
    img = image.detach().clamp(0, 1).cpu()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def plot_reconstruction(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    path: str | Path,
    *,
    psnr: Sequence[float],
    ssim: Sequence[float],
    true_labels: Sequence[int],
    recovered_labels: Sequence[int],
    title: str = "",
) -> Path:
    """Originals (top row) above their matched reconstructions (bottom row).

    Args:
        originals, reconstructions: (B, C, H, W) in [0, 1], already matched.
        path: PNG file to write.
        psnr, ssim: per-image scores printed under each reconstruction.
        true_labels, recovered_labels: per-image labels.
    """
    b = len(originals)
    fig = Figure(figsize=(1.9 * b + 0.6, 4.4))
    axes = fig.subplots(2, b, squeeze=False)
    for i in range(b):
        show_image(axes[0, i], originals[i])
        axes[0, i].set_title(f"label {true_labels[i]}", fontsize=9)
        show_image(axes[1, i], reconstructions[i])
        axes[1, i].set_title(f"label {recovered_labels[i]}", fontsize=9)
        axes[1, i].set_xlabel(f"{psnr[i]:.1f} dB\nSSIM {ssim[i]:.3f}", fontsize=9)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel("reconstruction")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_history(history: Sequence[float], path: str | Path, *, title: str = "") -> Path:
    """Gradient-matching loss per optimiser step, log scale."""
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    values = [max(v, 1e-300) for v in history]
    ax.semilogy(range(len(values)), values)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("gradient matching loss")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
