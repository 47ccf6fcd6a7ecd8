"""LPIPS (Zhang et al. 2018), computed with the authors' ``lpips`` package (optional)."""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re
import warnings
from typing import Any

import torch
from torch import Tensor

from .images import _check_pair, _is_positive

__all__ = ["LPIPS_NETS", "lpips"]

LPIPS_NETS = ("alex", "vgg", "squeeze")
"""Backbones of the ``lpips`` package; ``alex`` is the paper's recommended metric."""


# The smallest H and W each backbone's last LPIPS layer still has a pixel for (AlexNet's
# stride-4 first convolution and two max-pools; VGG-16's four max-pools; SqueezeNet's three);
# checked against the package in tests/leakage/test_lpips.py.
_LPIPS_MIN_SIZE = {"alex": 31, "vgg": 16, "squeeze": 17}


_LPIPS_WEIGHTS = {  # torchvision weight enums the lpips package's backbones load
    "alex": "AlexNet_Weights",
    "vgg": "VGG16_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}

_LPIPS_MODELS: dict[tuple[str, int | None, str], torch.nn.Module] = {}
"""Loaded LPIPS networks by ``(net, backbone_seed, device)``."""


def _lpips_package() -> Any:
    """The ``lpips`` package, imported on first use; a one-line ImportError if missing."""
    try:
        return importlib.import_module("lpips")
    except ImportError as e:
        raise ImportError(
            f"LPIPS needs the lpips package ({e}): pip install 'leakage-lab[lpips]' "
            "(or pip install lpips), or leave lpips out of the metrics"
        ) from None


def _check_lpips_options(net: str, backbone_seed: int | None) -> None:
    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS net {net!r}; valid: {', '.join(LPIPS_NETS)}")
    whole = isinstance(backbone_seed, int) and not isinstance(backbone_seed, bool)
    if backbone_seed is not None and not (whole and 0 <= backbone_seed < 2**64):
        raise ValueError(
            f"backbone_seed must be None (ImageNet weights) or a whole number in [0, 2**64); "
            f"got {backbone_seed!r}"
        )


def _check_lpips_images(x: Tensor, net: str) -> None:
    _, channels, height, width = x.shape
    if channels not in (1, 3):
        raise ValueError(f"LPIPS takes images with 1 or 3 channels; got {channels}")
    size = _LPIPS_MIN_SIZE[net]
    if height < size or width < size:
        fits = [n for n, m in _LPIPS_MIN_SIZE.items() if m <= min(height, width)]
        hint = f" (net {' or '.join(map(repr, fits))} takes them)" if fits else ""
        raise ValueError(
            f"images must be at least {size}x{size} pixels for LPIPS with net={net!r}; "
            f"got {height}x{width}{hint}"
        )


def _backbone_weights_file(net: str) -> tuple[str, str]:
    """``(url, path)`` of the torchvision ImageNet weights of ``net``'s backbone."""
    from torchvision import models

    url = getattr(models, _LPIPS_WEIGHTS[net]).IMAGENET1K_V1.url
    return url, os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _fetch_backbone_weights(net: str) -> None:
    """Download ``net``'s backbone weights into the torch hub cache unless they are there.

    Done here rather than inside torchvision so that a machine without network gets one
    line that says what to do, not a traceback (and nothing is printed unless the download
    starts: then torch's progress bar).
    """
    url, path = _backbone_weights_file(net)
    if os.path.isfile(path):
        return
    found = re.search(r"-([a-f0-9]*)\.", os.path.basename(path))  # torch.hub's hash suffix
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(url, path, hash_prefix=found and found.group(1))
    except (OSError, RuntimeError) as e:  # no network (URLError), no disk space, bad hash
        raise OSError(
            f"LPIPS (net={net!r}) needs torchvision's ImageNet weights {path}, and downloading "
            f"them failed ({type(e).__name__}: {_first_line(e)}): fetch {url} into "
            f"{os.path.dirname(path)} where there is network (or point TORCH_HOME at a torch "
            "cache that has it), or leave lpips out of the metrics"
        ) from None


def _build_lpips(net: str, backbone_seed: int | None) -> torch.nn.Module:
    """A new LPIPS network on the CPU, in eval mode, without gradients.

    The linear heads are the package's calibrated ones (shipped inside it). The backbone
    has torchvision's ImageNet weights (downloaded into the torch hub cache on first use),
    or, with ``backbone_seed``, torchvision's random initialisation drawn from the CPU
    generator seeded with it (the stream ``torch.manual_seed(backbone_seed)`` gives). Either
    way it is built inside :func:`torch.random.fork_rng`, so the caller's random stream is
    left as it was.
    """
    package = _lpips_package()

    def build() -> torch.nn.Module:
        # torchvision initialises every backbone at random (before loading weights, if any):
        # on a forked CPU stream, so the caller's is left as it was. Only the CPU generator
        # is seeded: torch.manual_seed would also reseed (or, before CUDA starts, queue a
        # reseed of) the caller's CUDA generators, which fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # the package still passes torchvision's deprecated `pretrained=`
            warnings.filterwarnings("ignore", message=".*deprecated", category=UserWarning)
            if backbone_seed is not None:
                torch.default_generator.manual_seed(backbone_seed)
            return package.LPIPS(net=net, pnet_rand=backbone_seed is not None, verbose=False)

    if backbone_seed is None:
        _fetch_backbone_weights(net)
    try:
        model = build()
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        if backbone_seed is not None:
            raise
        # a truncated or corrupt file in the cache, or one that cannot be read
        _, path = _backbone_weights_file(net)
        raise OSError(
            f"LPIPS (net={net!r}) could not load torchvision's ImageNet weights {path} "
            f"({type(e).__name__}: {_first_line(e)}): delete the file and retry, or leave "
            "lpips out of the metrics"
        ) from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _lpips_model(net: str, backbone_seed: int | None, device: torch.device) -> torch.nn.Module:
    """The cached LPIPS network of ``(net, backbone_seed)`` on ``device``, loaded once."""
    key = (net, backbone_seed, str(device))
    if key not in _LPIPS_MODELS:
        cpu = (net, backbone_seed, "cpu")
        if cpu not in _LPIPS_MODELS:
            _LPIPS_MODELS[cpu] = _build_lpips(net, backbone_seed)
        if key != cpu:
            _LPIPS_MODELS[key] = copy.deepcopy(_LPIPS_MODELS[cpu]).to(device)
    return _LPIPS_MODELS[key]


def lpips(
    x: Tensor,
    y: Tensor,
    *,
    net: str = "alex",
    data_range: float = 1.0,
    backbone_seed: int | None = None,
) -> Tensor:
    """Learned Perceptual Image Patch Similarity per image (Zhang et al., 2018), v0.1.

    The distance between the unit-normalised deep features of ``x`` and ``y`` at five
    layers of an ImageNet backbone, weighted channel-wise by linear heads fitted to human
    judgements and averaged over positions, computed by the authors' ``lpips`` package
    (``lpips.LPIPS(net=net)``). **Lower is better**: 0 for identical images, larger the
    less alike they look. Images are mapped from ``[0, data_range]`` to the ``[-1, 1]``
    the package takes; one-channel images are repeated to three (the backbones take RGB).
    It computes in float32 (the networks' precision) under ``torch.no_grad``.

    The package's linear heads ship inside it; the backbone's ImageNet weights are
    torchvision's, downloaded into the torch hub cache (``torch.hub.get_dir()``) on first
    use. Each network is loaded once per ``(net, backbone_seed, device)`` and kept.

    Args:
        x: Images, shape ``(B, C, H, W)`` with ``C`` 1 or 3 and ``H``, ``W`` at least 31
            (``alex``), 16 (``vgg``) or 17 (``squeeze``).
        y: Images, shape ``(B, C, H, W)``.
        net: Backbone: ``alex`` (the paper's recommended metric), ``vgg`` or ``squeeze``.
        data_range: The largest possible pixel value (1.0 for images in [0, 1], 255.0 for
            8-bit images); pixels run from 0 to it.
        backbone_seed: ``None`` for the ImageNet backbone (LPIPS proper). A whole number
            gives a backbone with torchvision's random initialisation drawn from that seed,
            without touching the global random state: for tests where no weights can be
            downloaded; its numbers are not LPIPS and not comparable to published ones.

    Returns:
        Float64 tensor of shape ``(B,)`` on ``x.device``.

    Raises:
        ValueError: On an unknown ``net``, a bad ``backbone_seed`` or ``data_range``, shape
            mismatch, a channel count other than 1 or 3, or images too small for ``net``.
        ImportError: If the ``lpips`` package is not installed.
        OSError: If the backbone's ImageNet weights are neither cached nor downloadable.
    """
    _check_lpips_options(net, backbone_seed)
    if not _is_positive(data_range):
        raise ValueError(f"data_range must be positive (e.g. 1.0 or 255.0); got {data_range!r}")
    _check_pair(x, y)
    _check_lpips_images(x, net)
    channels = x.shape[1]
    model = _lpips_model(net, backbone_seed, x.device)
    scale = 2.0 / float(data_range)
    x1 = x.to(torch.float32) * scale - 1.0  # [0, data_range] -> [-1, 1]
    y1 = y.to(device=x.device, dtype=torch.float32) * scale - 1.0
    if channels == 1:
        x1, y1 = x1.expand(-1, 3, -1, -1), y1.expand(-1, 3, -1, -1)
    with torch.no_grad():
        distance = model(x1, y1)
    return distance.reshape(-1).to(torch.float64)
