"""Centralised training and evaluation: the baseline FL is compared against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_accuracy", "train_centralized"]


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
    generator: torch.Generator,
    progress: bool = False,
) -> list[float]:
    """Plain minibatch SGD on all the data: the centralised baseline.

    Returns:
        The training loss of every step.
    """
    from tqdm.auto import trange

    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    device = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
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
