"""Trained victims on disk: weights, architecture and provenance in one file.

A checkpoint is a ``torch.save`` of a dict holding only tensors and plain Python
values, so ``torch.load(path, weights_only=True)`` reads it without unpickling
code (safe on files from elsewhere)::

    {"format": "leakage-lab checkpoint", "version": 1,
     "spec": model.spec.to_dict(),          # rebuilt with fl_core.models.build_model
     "state_dict": {name: tensor},           # parameters and buffers (BatchNorm stats)
     "meta": {...}}                          # dataset, epochs, lr, seed, accuracy, versions
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import ModelSpec, build_model

logger = logging.getLogger(__name__)

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT = "leakage-lab checkpoint"
VERSION = 1
_PLAIN = (str, int, float, bool, type(None))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("leakage-lab", "torch", "torchvision", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _check_plain(value: Any, where: str) -> None:
    """Raise unless ``value`` is made of tensors and plain Python values only."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, _PLAIN):
                raise ValueError(f"{where} has a key of type {type(k).__name__}; use str keys")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise ValueError(
            f"{where} is a {type(value).__module__}.{type(value).__name__}; "
            "a checkpoint holds only tensors, str, int, float, bool, None, lists and dicts"
        )


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, meta: Mapping) -> Path:
    """Write ``model`` (built by :func:`~fl_core.models.build_model`) to ``path``.

    Args:
        model: a victim carrying ``model.spec``; its parameters and buffers are
            saved from the CPU.
        path: the file to write (parent folders are created; written to a
            temporary name first, so a crash leaves no half file).
        meta: provenance (dataset, epochs, lr, seed, test accuracy, ...): plain
            Python values and tensors only. ``versions`` (Python, torch,
            torchvision, numpy, leakage-lab) is added unless given.

    Returns:
        The path written.
    """
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no .spec; build it with fl_core.build_model")
    meta = {"versions": _versions(), **dict(meta)}
    _check_plain(meta, "meta")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": spec.to_dict(),
        "state_dict": state,
        "meta": meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    logger.info("saved %s checkpoint to %s", spec.name, path)
    return path


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``torch.load(weights_only=True)``, the model rebuilt
    from the stored spec and its weights loaded strictly.

    Args:
        path: the checkpoint file.
        map_location: device of the returned model.

    Returns:
        ``(model, meta)``: the model in train mode (as ``build_model`` returns
        it; call ``.eval()`` to use BatchNorm's running statistics) on
        ``map_location``, and the stored ``meta`` dict.

    Raises:
        ValueError: missing file, a file that is not a leakage-lab checkpoint,
            or weights that do not fit the stored architecture (one line each).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on foreign or corrupt files
        raise ValueError(f"{path} is not a leakage-lab checkpoint ({_one_line(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a leakage-lab checkpoint (no 'format' marker)")
    if payload.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint version {payload.get('version')!r}; this code reads {VERSION}"
        )
    spec = payload.get("spec")
    if not isinstance(spec, dict) or not isinstance(payload.get("state_dict"), dict):
        raise ValueError(f"{path} is not a leakage-lab checkpoint (no spec or state_dict)")
    try:
        model = build_model(
            spec["name"],
            num_classes=spec["num_classes"],
            in_shape=tuple(spec["in_shape"]),
            activation=spec["activation"],
            convert=spec.get("convert"),
            normalize=ModelSpec.normalize_from_dict(spec.get("normalize")),
            **spec.get("options", {}),
        )
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: stored weights do not fit the stored spec {spec}: {_one_line(exc)}"
        ) from exc
    return model.to(map_location), dict(payload.get("meta") or {})
