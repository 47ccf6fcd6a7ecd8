"""The Cocktail Party Attack: a linear layer's batch gradient unmixed by ICA.

Kariyappa, Guo, Maeng, Xiong, Suh, Qureshi, Lee, "Cocktail Party Attack:
Breaking Aggregation-Based Privacy in Federated Learning using Independent
Component Analysis", ICML 2023 (arXiv:2209.05578).

For a linear layer z_j = W·x_j + b, the gradient of the mean loss over a
batch of B inputs is

    G = ∂L/∂W = Σ_j δ_j x_jᵀ = A X,        ∂L/∂b = Σ_j δ_j = A 1,

with X (B × n) the inputs and A = Δᵀ (m × B) their output gradients: every
row of G is a mixture of the B inputs, the cocktail party of blind source
separation (sources: the inputs, observed over their n entries). CPA

1. centres each row of G over its n entries and whitens the rows (PCA onto
   the B leading components, unit variance): signals X_w (B × n);
2. estimates an unmixing matrix V (B × B, unit rows) by maximising the
   paper's objective (as restated in its appendix ablation) with Adam,

       max_V  E_i [ J(v_i X_w) − λ_TV·TV(v_i X_w) − λ_MI·E_{j≠i} exp(T·|cos(v_i, v_j)|) ],

   J the negentropy approximation (E G(y) − E G(ν))² with G = log cosh
   (Hyvärinen 1999; ν ~ N(0, 1)), TV the total variation of the unmixed
   signal shown as an image (images only), the last term the mutual
   independence penalty that keeps the rows apart. The paper starts Adam
   from the identity; the default here starts from FastICA's rotation of the
   same whitened signals (``init="fastica"``, :func:`~leakage.attacks.ica.fast_ica`), which the
   objective then refines;
3. undoes the centring, so the sources are the rows of V·K·G (K the
   whitening matrix), each equal to one input up to scale and sign.

Edges (``domain="edges"``, the default for images). Whitening and the
mutual-independence penalty drive the outputs towards being uncorrelated,
but photographs in one batch are not: centred CIFAR-10 test images have a
mean |correlation| of 0.16-0.27 between pairs (up to 0.8) at B = 8-64, and
the unmixing returns decorrelated blends of them. Their horizontal and
vertical pixel differences are nearly uncorrelated (mean 0.04) and sparse,
which is what ICA assumes. Mixing is linear, so the differences of G's rows
are the same mixtures of the images' differences, G_∇ = A·X_∇: this domain
whitens G_∇, evaluates the objective on the unmixed difference signals (the
TV term becomes their mean absolute value, exactly the TV of the image they
differentiate) and applies the unmixing to G itself. ICA on filtered
mixtures is classic (Hyvärinen, "Independent component analysis for
time-dependent stochastic processes", ICANN 1998; subband ICA in Cichocki &
Amari, "Adaptive Blind Signal and Image Processing", 2002); it is this lab's
addition to CPA, and ``domain="pixels"`` is the paper's. On the lab's
``mlp`` victim, CIFAR-10 test batches of 32, it recovers 82 % of the images
at >= 20 dB against 33 % in the pixel domain with the same weights and 12 %
with the authors' weights (``benchmarks/results/cpa/summary.md``).

Scale and sign. ICA leaves each source's scale and sign free; the paper
min-max normalises each recovered image and, in its evaluation, keeps the
better of the image and its negative against the ground truth (an oracle).
Here the attacker uses what the update contains instead: with the sources
S = D·X (D diagonal, unknown) the mixing matrix of S is Â = G·S⁺ = A·D⁻¹,
and the bias gradient A·1 = Â·d gives d = diag(D) by least squares
(``scale="bias"``, exact when the unmixing is). ``scale="range"`` keeps the
bias's sign and min-max normalises to [0, 1] as the paper does.

Two settings, as in the paper:

* **Linear-first victims** (``mlp``): the layer reads the flattened
  (normalised) image, the sources are the images.
* **Feature inversion** (``lenet``, ``cnn``, ``cnn6``, or an MLP attacked at a
  later layer): the layer reads features f(x) of a known front end, CPA
  recovers the B feature vectors (in the edges domain of the feature maps
  when the layer reads flattened (C, h, w) maps, without the TV term), then
  each image is found by minimising 1 − cos(f(x), ẑ) + λ·TV(x) over x in
  [0, 1] with Adam (the paper's "direct" feature inversion). Scope: the
  lab's convolutional victims have only their classifier as a linear layer,
  whose gradient has rank at most (classes − 1), so B ≤ 9 for ten classes;
  and their untrained features are far from independent (mean |correlation|
  between images 0.67 for ReLU ``cnn``, 0.83 for ReLU ``lenet``, 0.98 for
  sigmoid ``lenet`` on CIFAR-10), so only some feature vectors come out
  clean. The paper's case is a trained VGG-16 with a 4,096-wide first FC
  layer and sparse ReLU features.

What the attacker knows: the global model (architecture, parameters, the
input normalisation it carries), the update (a FedSGD gradient, or a FedAvg
delta turned into the gradient it implies,
:func:`leakage.labels.update_as_gradient`, exact after one local step) and
the number of samples B. Labels come from a strategy of
:mod:`leakage.labels`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import trange

from fl_core.types import Observation

from ..labels import update_as_gradient
from ..objectives import total_variation
from .base import ATTACKS, Reconstruction
from .cocktail import DOMAINS, INITS, SCALES, UnmixResult, cocktail_party
from .matching import attack_labels

__all__ = ["CPA", "UnmixResult", "cocktail_party", "invert_features"]


def invert_features(
    front: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    shape: tuple[int, int, int],
    *,
    steps: int = 2000,
    lr: float = 0.1,
    tv: float = 0.4,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Images whose features match ``features``: CPA's feature inversion ("direct").

    Minimises mean_j [1 − cos(f(x_j), ẑ_j)] + tv·TV(x) over images x in
    [0, 1] (clamped after every step) with Adam and cosine step-size
    annealing, from U[0, 1] pixels (Kariyappa et al. 2023, their "direct"
    variant; Mahendran & Vedaldi 2015 for inversion with a TV prior).

    Args:
        front: the known front end, images (B, C, H, W) in [0, 1] -> features (B, d).
        features: (B, d) the features to match (any positive scale).
        shape: (C, H, W) of one image.
        steps: Adam steps.
        lr: Adam's initial step size, in pixels.
        tv: weight of the TV prior.
        generator: draws the start (default: seed 0).
        progress: show a progress bar.

    Returns:
        ``(images (B, C, H, W) in [0, 1], history)`` with the objective per step.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    z = features.detach().float()
    x = torch.rand(len(z), *shape, generator=gen).to(z.device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history: list[float] = []
    for _ in trange(steps, disable=not progress, desc="feature inversion", leave=False):
        opt.zero_grad(set_to_none=True)
        f = front(x)  # (B, d)
        loss = (1 - nn.functional.cosine_similarity(f, z, dim=1)).mean()
        if tv:
            loss = loss + tv * total_variation(x[None])[0]
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        history.append(loss.item())
    return x.detach(), history


class _Stop(Exception):
    """Raised by the front-end hook to end the forward pass at the attacked layer."""


def _front_end(model: nn.Module, layer: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """images (B, C, H, W) -> the layer's input (B, n), running the model up to the layer."""

    def front(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []

        def hook(_module, inputs):
            seen.append(inputs[0])
            raise _Stop

        handle = layer.register_forward_pre_hook(hook)
        try:
            model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not seen:
            raise ValueError("the attacked linear layer is not called in the model's forward pass")
        return seen[0].flatten(1)

    return front


def _probe(
    model: nn.Module, layer: nn.Linear, probe: torch.Tensor
) -> tuple[bool, tuple[int, ...] | None]:
    """Whether ``layer``'s output is the model's output (the logits), and the (C, h, w)
    feature maps it reads flattened (the last 4-D output of a module before it with
    ``in_features`` entries per sample; ``None`` if there is none)."""
    maps: list[tuple[int, ...]] = []
    seen: dict[str, object] = {}

    def record(module, _inputs, output):
        if module is layer:
            seen["out"] = output
            seen.setdefault("maps", list(maps))
        elif torch.is_tensor(output) and output.dim() == 4:
            maps.append(tuple(output.shape[1:]))

    handles = [m.register_forward_hook(record) for m in model.modules()]
    try:
        logits = model(probe)
    finally:
        for h in handles:
            h.remove()
    fits = [s for s in seen.get("maps", []) if math.prod(s) == layer.in_features]
    return seen.get("out") is logits, (fits[-1] if fits else None)


@dataclass(frozen=True)
class CPA:
    """The Cocktail Party Attack (Kariyappa et al., ICML 2023) on a linear layer's gradient.

    Defaults: T = 12.4, λ_TV = 3.1 and negentropy weight 1 as in the authors'
    FC-2 command for Tiny-ImageNet (their README); λ_MI = 0.2 instead of
    their 1.47, FastICA's start instead of the identity, and 500 Adam steps
    at 0.01 instead of their 25,000 at 0.001, chosen on CIFAR-10 batches
    other than the benchmark's (B = 8, 32, 64): with a FastICA start more
    steps changed nothing. Feature inversion: the authors' step size 0.1
    and cosine schedule; TV weight 0.4 on [0, 1] pixels, about their 0.1 on
    normalised images.

    Args:
        layer: index in ``model.parameters()`` of the attacked layer's weight;
            ``None``: the model's first ``nn.Linear``. A layer reading the
            flattened input gives images directly; any other is followed by
            feature inversion through the layers before it.
        steps: Adam steps on the unmixing matrix (see :func:`cocktail_party`,
            as for the next eight).
        lr: Adam's step size.
        negentropy: weight of the negentropy term J.
        mi: weight λ_MI of the mutual-independence penalty.
        temperature: T of that penalty.
        tv: weight λ_TV of the TV prior (images only).
        init: ``"identity"`` or ``"fastica"``, the unmixing's start.
        domain: ``"pixels"`` or ``"edges"``; applies to images (features are
            unmixed as they are).
        scale: ``"bias"`` or ``"range"``, how each unmixed input is scaled.
        feature_steps: steps of :func:`invert_features` (as for the next two).
        feature_lr: its step size.
        feature_tv: its total-variation weight.
        label_strategy: label-recovery strategy of :mod:`leakage.labels`
            (default ``"auto"``); ``"joint"`` does not apply.
    """

    layer: int | None = None
    steps: int = 500
    lr: float = 0.01
    negentropy: float = 1.0
    mi: float = 0.2
    temperature: float = 12.4
    tv: float = 3.1
    init: str = "fastica"
    domain: str = "edges"
    scale: str = "bias"
    feature_steps: int = 2000
    feature_lr: float = 0.1
    feature_tv: float = 0.4
    label_strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.label_strategy == "joint":
            raise ValueError("CPA reads labels with a strategy, not 'joint'")
        for name in ("steps", "feature_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        for name in ("lr", "feature_lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}")
        for name in ("negentropy", "mi", "tv", "feature_tv"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative; got {getattr(self, name)!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}; got {self.init!r}")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {self.scale!r}")
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {', '.join(DOMAINS)}; got {self.domain!r}")

    def _layer(self, model: nn.Module) -> tuple[nn.Linear, int, int | None]:
        """The attacked layer and the indices of its weight and bias in ``parameters()``."""
        params = list(model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("CPA needs a victim with a fully connected layer (e.g. --model mlp)")
        if self.layer is None:
            layer = linears[0]
        else:
            layer = next((m for m in linears if index[id(m.weight)] == self.layer), None)
            if layer is None:
                valid = ", ".join(str(index[id(m.weight)]) for m in linears)
                raise ValueError(
                    f"parameter {self.layer} is not a linear layer's weight; valid: {valid}"
                )
        bias = index[id(layer.bias)] if layer.bias is not None else None
        return layer, index[id(layer.weight)], bias

    def reconstruct(
        self,
        obs: Observation,
        *,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Reconstruction:
        """Images (B, C, H, W) unmixed from a linear layer's update; labels from the strategy."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        spec = obs.model_spec
        model = obs.model()
        for p in model.parameters():
            p.requires_grad_(False)
        layer, w_idx, b_idx = self._layer(model)
        front = _front_end(model, layer)
        n = obs.protocol.num_samples
        probe = torch.linspace(0, 1, math.prod(spec.in_shape)).view(1, *spec.in_shape)
        mean, std = spec.mean_std  # (C, 1, 1): a linear-first layer reads (x - mean) / std
        with torch.no_grad():
            pixels = ((probe.double() - mean) / std).float().flatten(1)  # what mlp's layer reads
            reads_pixels = layer.in_features == probe.numel() and torch.allclose(
                front(probe), pixels, atol=1e-6
            )
            output, maps = _probe(model, layer, probe)
        limit = min(layer.out_features - output, layer.in_features)
        if n > limit:
            why = " (the classifier's gradient rows sum to zero)" if output else ""
            raise ValueError(
                f"batch size {n} exceeds what the attacked layer separates: at most {limit} "
                f"inputs{why}; use a smaller batch or a wider layer"
            )
        if not reads_pixels and self.feature_steps == 0:
            raise ValueError(
                "the attacked layer reads features, not pixels: set feature_steps > 0 to "
                "invert them, or attack a victim whose first layer is linear (--model mlp)"
            )
        weight = update_as_gradient(obs, w_idx)
        bias = update_as_gradient(obs, b_idx) if b_idx is not None else None
        scale = self.scale if reads_pixels or bias is None else "bias"
        res = cocktail_party(
            weight,
            bias,
            n,
            shape=spec.in_shape if reads_pixels else maps,
            steps=self.steps,
            lr=self.lr,
            negentropy=self.negentropy,
            mi=self.mi,
            temperature=self.temperature,
            tv=self.tv if reads_pixels else 0.0,
            init=self.init,
            domain=self.domain if reads_pixels or maps is not None else "pixels",
            scale=scale,
            generator=generator,
            progress=progress,
        )
        history = list(res.history)
        if reads_pixels:
            x = res.inputs.view(n, *spec.in_shape)
            images = x if scale == "range" else x * std + mean
            stage = "linear"
        else:
            images, fi_history = invert_features(
                front,
                res.inputs,
                spec.in_shape,
                steps=self.feature_steps,
                lr=self.feature_lr,
                tv=self.feature_tv,
                generator=generator,
                progress=progress,
            )
            history += fi_history
            stage = "features"
        labels = attack_labels(obs, self.label_strategy, generator=generator)
        loss = history[-1] if history else math.nan
        return Reconstruction(
            images=images.float().clamp(0, 1),
            labels=labels,
            loss=loss,
            history=history,
            restart_losses=[loss],
            steps=len(history),
            total_steps=len(history),
            evaluations=len(history),
            stopped="steps",
            options={
                "stage": stage,
                "layer": w_idx,
                "rank": res.rank,
                "unmix_seconds": round(res.seconds, 4),
                "seconds": round(time.perf_counter() - start, 4),
            },
        )


ATTACKS.register("cpa")(CPA)
