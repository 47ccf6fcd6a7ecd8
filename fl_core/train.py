"""Centralised training and evaluation: the baseline FL is compared against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_accuracy", "train_centralized", "train_victim"]


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on images (N, C, H, W), labels (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = images[i : i + batch_size].to(device)
        correct += int((model(x).argmax(1).cpu() == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def train_centralized(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 20,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    progress: bool = False,
) -> list[float]:
    """Plain minibatch SGD on all the data: the centralised baseline.

    Minibatches of ``batch_size`` images (N, C, H, W) are cut from consecutive
    random permutations of the data drawn from ``generator``; ``weight_decay``
    is SGD's L2 penalty.

    Returns:
        The training loss of every step.
    """
    from tqdm.auto import trange

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    losses, order = [], torch.empty(0, dtype=torch.long)
    for _ in trange(steps, disable=not progress, desc="centralized"):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(labels), generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_victim(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    progress: bool = False,
) -> list[float]:
    """Train a victim with minibatch SGD for ``epochs`` passes over the data.

    One epoch is ``ceil(N / batch_size)`` steps of :func:`train_centralized`
    (one call for all epochs, so SGD momentum carries over). Batches are cut from
    consecutive permutations: when ``batch_size`` does not divide ``N``, an
    epoch's last batch is completed from the next permutation.

    Args:
        model: the victim, changed in place (left in train mode).
        images: ``(N, C, H, W)`` float inputs.
        labels: ``(N,)`` int64 class indices.
        epochs: passes over the data.
        batch_size: images per step (capped at ``N``).
        lr, momentum, weight_decay: SGD's settings (He et al. 2016 train
            ResNet-20 with 0.1, 0.9 and 1e-4 at batch size 128).
        generator: source of every batch order.
        progress: show a progress bar over the steps.

    Returns:
        The mean training loss of each epoch (``epochs`` floats).
    """
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or not len(labels):
        raise ValueError(
            f"need images (N, C, H, W) and labels (N,) with N >= 1; "
            f"got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    for value, what in ((epochs, "epochs"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive int; got {value!r}")
    if not lr > 0 or not 0 <= momentum < 1 or not weight_decay >= 0:
        raise ValueError(
            f"need lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
            f"got {lr}, {momentum}, {weight_decay}"
        )
    batch_size = min(batch_size, len(labels))
    per_epoch = math.ceil(len(labels) / batch_size)
    losses = train_centralized(
        model,
        images,
        labels,
        steps=epochs * per_epoch,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        generator=generator,
        progress=progress,
    )
    return [sum(losses[e * per_epoch : (e + 1) * per_epoch]) / per_epoch for e in range(epochs)]
