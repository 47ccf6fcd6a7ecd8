"""Victim models, built by name from a registry.

The architectures themselves live in :mod:`fl_core.victims`; this module holds
the registry, the :class:`ModelSpec` that rebuilds a victim and the checks of
its options.

Every victim takes ``num_classes``, an input shape ``in_shape = (C, H, W)``,
``activation`` where it applies, and a ``torch.Generator`` for its initial
weights. Models are created on the meta device and then initialised from the
generator, so building a model never reads or advances the global RNG.

Victims take images in pixel space [0, 1] and may carry their input
normalisation, ``(x - mean) / std`` per channel with the training data's
statistics, as deployed models do (``normalize=(mean, std)``). It is the
model's first layer (:class:`InputNormalization`, constants without
parameters or buffers) and part of its :class:`ModelSpec`, so every rebuild
of the architecture, the attacker's included, normalises the same way, and
updates, aggregation and checkpoints see the same parameters as without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .registry import Registry
from .victims import CNN6, MLP, InputNormalization, LeNet, ResNet18, ResNet20, SmallCNN

__all__ = [
    "ACTIVATIONS",
    "InputNormalization",
    "MODELS",
    "MODEL_CONVERTERS",
    "MODEL_MODIFICATIONS",
    "ModelSpec",
    "build_model",
    "count_parameters",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}

MODELS: Registry[nn.Module] = Registry("model")

MODEL_CONVERTERS: Registry[nn.Module] = Registry("model converter")
"""Named rewrites applied to a freshly built victim (``module -> module``).

A converter changes the architecture itself (``defenses.dpsgd`` registers
``opacus``, which replaces BatchNorm by GroupNorm with Opacus's module
validator), so it is part of the :class:`ModelSpec`: every party that rebuilds
the global model, the attacker included, gets the converted architecture.
The package that registers a converter must be imported before a spec naming
it is built.
"""

MODEL_MODIFICATIONS: Registry[nn.Module] = Registry("model modification")
"""Architectures a malicious server may send in place of the victim
(``victim -> modified victim``, weights not yet chosen; see :mod:`fl_core.malicious`).

Like a converter, a modification is part of the :class:`ModelSpec` (its
``modification`` entry names it and its settings), so every party that
rebuilds the model the server sent gets the same architecture; the weights the
server chose travel as the observed parameters.
"""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a victim's architecture (not its weights).

    The server publishes the architecture with the global model, so an attacker
    may rebuild it from this spec and load the observed parameters. Hashable:
    victim-specific ``options`` are kept as sorted ``(name, value)`` pairs, and so
    is ``modification``: empty for the victim as registered, else the
    :data:`MODEL_MODIFICATIONS` entry a malicious server sent (``("name", ...)``
    and its architectural settings).
    """

    name: str
    num_classes: int = 10
    in_shape: tuple[int, int, int] = (3, 32, 32)
    activation: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    convert: str | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    modification: tuple[tuple[str, Any], ...] = ()

    def build(self, *, generator: torch.Generator | None = None) -> nn.Module:
        """A fresh model of this architecture, initialised from ``generator``
        (with a ``modification``: the modified architecture, its added weights unset)."""
        model = build_model(
            self.name,
            num_classes=self.num_classes,
            in_shape=self.in_shape,
            activation=self.activation,
            generator=generator,
            convert=self.convert,
            normalize=self.normalize,
            **dict(self.options),
        )
        if self.modification:
            settings = dict(self.modification)
            model = MODEL_MODIFICATIONS.get(settings.pop("name"))(model, **settings)
        return model

    def to_dict(self) -> dict[str, Any]:
        norm = self.normalize
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "in_shape": list(self.in_shape),
            "activation": self.activation,
            **({"options": dict(self.options)} if self.options else {}),
            **({"convert": self.convert} if self.convert else {}),
            **({"normalize": {"mean": list(norm[0]), "std": list(norm[1])}} if norm else {}),
            **({"modification": dict(self.modification)} if self.modification else {}),
        }

    @staticmethod
    def normalize_from_dict(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The ``normalize`` entry of :meth:`to_dict` (or ``None``) back as ``(mean, std)``."""
        if value is None:
            return None
        try:
            return tuple(map(float, value["mean"])), tuple(map(float, value["std"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"normalize must be {{'mean': [...], 'std': [...]}}; got {value!r}"
            ) from None

    @property
    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as (C, 1, 1) float64 tensors; zeros and ones without normalisation."""
        c = self.in_shape[0]
        if self.normalize is None:
            return torch.zeros(c, 1, 1, dtype=torch.float64), torch.ones(
                c, 1, 1, dtype=torch.float64
            )
        mean, std = self.normalize
        return (
            torch.tensor(mean, dtype=torch.float64).view(c, 1, 1),
            torch.tensor(std, dtype=torch.float64).view(c, 1, 1),
        )


def _check_normalize(normalize: Any, channels: int):
    """``(mean, std)`` as float tuples of length ``channels`` with ``std > 0``, or ``None``."""
    if normalize is None:
        return None
    try:
        mean, std = normalize
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    except (TypeError, ValueError):
        raise ValueError(
            f"normalize must be (mean, std), one value per channel each; got {normalize!r}"
        ) from None
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"normalize has {len(mean)} means and {len(std)} stds for {channels} input channels"
        )
    if min(std) <= 0 or not all(math.isfinite(v) for v in mean + std):
        raise ValueError(f"normalize needs finite means and positive stds; got {normalize!r}")
    return mean, std


def _activation(name: str) -> Callable[[], nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid names: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def _check_shape(in_shape: tuple[int, ...], num_classes: int) -> tuple[int, int, int]:
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes; got {in_shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}")
    return tuple(int(s) for s in in_shape)  # type: ignore[return-value]


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_shape: tuple[int, int, int] = (3, 32, 32),
    activation: str | None = None,
    generator: torch.Generator | None = None,
    convert: str | None = None,
    normalize: tuple[Any, Any] | None = None,
    **options: Any,
) -> nn.Module:
    """Build the victim registered as ``name``.

    Args:
        name: registry name (see ``MODELS.names()``).
        num_classes: size of the output layer.
        in_shape: input ``(C, H, W)``.
        activation: activation name for victims that take one (``None``: the
            victim's default).
        generator: source of the initial weights (default: seed 0).
        convert: a converter of :data:`MODEL_CONVERTERS` applied after
            initialisation (``None``: the victim as registered).
        normalize: ``(mean, std)``, one value per input channel each: the
            model's first layer maps pixel-space inputs to ``(x - mean) / std``
            (``None``: inputs go in as they are).
        **options: victim-specific options (``cifar_stem`` for ``resnet18``,
            ``width`` and ``depth`` for ``mlp``, ``negative_slope`` for ``cnn6``).

    Returns:
        The model in train mode, on the CPU, with ``model.spec`` set to its
        :class:`ModelSpec`.
    """
    factory = MODELS.get(name)
    in_shape = _check_shape(tuple(in_shape), num_classes)
    normalize = _check_normalize(normalize, in_shape[0])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        model, resolved_activation = factory(
            num_classes=num_classes, in_shape=in_shape, activation=activation, **options
        )
    model = model.to_empty(device="cpu")
    model.init_weights(generator)  # type: ignore[operator]
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_running_stats()
    if convert is not None:
        model = MODEL_CONVERTERS.get(convert)(model)
    if normalize is not None:
        model.input_norm = InputNormalization(*normalize)
    model.spec = ModelSpec(
        name,
        num_classes,
        in_shape,
        resolved_activation,
        tuple(sorted(options.items())),
        convert,
        normalize,
    )
    return model.train()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@MODELS.register("lenet")
def _lenet(*, num_classes, in_shape, activation=None):
    activation = activation or "sigmoid"
    model = LeNet(num_classes, in_shape, _activation(activation), activation == "sigmoid")
    return model, activation


@MODELS.register("cnn")
def _cnn(*, num_classes, in_shape, activation=None):
    activation = activation or "sigmoid"
    return SmallCNN(num_classes, in_shape, _activation(activation)), activation


@MODELS.register("resnet18")
def _resnet18(*, num_classes, in_shape, activation=None, cifar_stem: bool | None = None):
    activation = activation or "sigmoid"
    if cifar_stem is None:
        cifar_stem = max(in_shape[1:]) <= 64
    model = ResNet18(num_classes, in_shape, _activation(activation), bool(cifar_stem))
    return model, activation


@MODELS.register("resnet20")
def _resnet20(*, num_classes, in_shape, activation=None):
    activation = activation or "relu"
    return ResNet20(num_classes, in_shape, _activation(activation)), activation


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mlp {what} must be a positive int; got {value!r}")
    return value


@MODELS.register("mlp")
def _mlp(*, num_classes, in_shape, activation=None, width: int = 1024, depth: int = 3):
    activation = activation or "relu"
    width, depth = _positive_int(width, "width"), _positive_int(depth, "depth")
    return MLP(num_classes, in_shape, _activation(activation), width, depth), activation


@MODELS.register("cnn6")
def _cnn6(*, num_classes, in_shape, activation=None, negative_slope: float = 0.2):
    activation = activation or "leaky_relu"
    if activation == "leaky_relu":
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
            raise ValueError(f"cnn6 negative_slope must be a number; got {negative_slope!r}")
        slope = float(negative_slope)
        act = lambda: nn.LeakyReLU(negative_slope=slope)  # noqa: E731
    else:
        act = _activation(activation)
    return CNN6(num_classes, in_shape, act), activation
