"""Victim models, built by name from a registry.

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
import torch.nn.functional as F
import torchvision
from torch import nn

from .registry import Registry

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


class InputNormalization(nn.Module):
    """``x -> (x - mean) / std`` per channel: a victim's first layer.

    The constants are plain Python floats, not parameters or buffers, so the
    layer adds nothing to ``parameters()``, ``buffers()`` or the state dict
    and follows the input's device and dtype. With ``mean=None`` it is the
    identity.

    Input (B, C, H, W) in pixel space -> (B, C, H, W) normalised.
    """

    def __init__(
        self, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
    ) -> None:
        super().__init__()
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return "identity" if self.mean is None else f"mean={self.mean}, std={self.std}"


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


def _uniform_(t: torch.Tensor, bound: float, g: torch.Generator) -> None:
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=g)


def _default_init(module: nn.Module, g: torch.Generator) -> None:
    """PyTorch's default Conv/Linear init (Kaiming-uniform, a = sqrt(5)) from ``g``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            _uniform_(m.weight, 1.0 / math.sqrt(fan_in), g)  # == kaiming_uniform(a=sqrt(5))
            if m.bias is not None:
                _uniform_(m.bias, 1.0 / math.sqrt(fan_in), g)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.zero_()


class LeNet(nn.Module):
    """The LeNet of Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019).

    Conv(C->12, k5, s2, p2) -> act -> Conv(12->12, k5, s2, p2) -> act ->
    Conv(12->12, k5, s1, p2) -> act -> Linear(12*h*w -> classes). For 32x32
    inputs the linear layer has 768 inputs, for 28x28 it has 588.

    Initialisation: with the paper's sigmoid, all weights and biases are drawn
    U(-0.5, 0.5) as in the paper's code (and the inverting-gradients code's
    ``LeNetZhu``). With any other activation the layers get PyTorch's default
    init instead: U(-0.5, 0.5) weights on an unbounded activation such as ReLU
    give logits of standard deviation ~50 on a random image, so the softmax
    saturates, the cross-entropy is exactly 0 in float32 and the gradient an
    attacker must match vanishes (~1e-21) — a numerically broken victim, not a
    safe one. PyTorch's default gives logits of std ~0.02 there.

    Input (B, C, H, W) -> logits (B, classes).
    """

    def __init__(
        self, num_classes: int, in_shape: tuple[int, int, int], act: Callable, paper_init: bool
    ) -> None:
        super().__init__()
        self.input_norm = InputNormalization()
        self.paper_init = paper_init
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, stride=2, padding=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, stride=2, padding=2),
            act(),
            nn.Conv2d(12, 12, kernel_size=5, stride=1, padding=2),
            act(),
        )
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        self.fc = nn.Linear(12 * h * w, num_classes)

    def init_weights(self, g: torch.Generator) -> None:
        if not self.paper_init:
            _default_init(self, g)
            return
        for p in self.parameters():
            _uniform_(p, 0.5, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        return self.fc(self.body(x).flatten(1))  # (B, 12*h*w) -> (B, classes)


class SmallCNN(nn.Module):
    """Two sigmoid conv layers and one linear output layer (Fashion-MNIST FL experiments).

    Conv(C->16, k5, p2) -> act -> MaxPool(2) -> Conv(16->32, k5, p2) -> act ->
    MaxPool(2) -> Linear(32*(H/4)*(W/4) -> classes); PyTorch's default init.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], act: Callable) -> None:
        super().__init__()
        self.input_norm = InputNormalization()
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 16, kernel_size=5, padding=2),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            act(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(32 * (h // 4) * (w // 4), num_classes)

    def init_weights(self, g: torch.Generator) -> None:
        _default_init(self, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.input_norm(x)).flatten(1))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with a swappable activation and an optional CIFAR stem.

    The CIFAR stem (He et al. 2016, sec. 4.2 style) replaces the 7x7/2 first
    convolution and the max-pool by a 3x3/1 convolution, keeping spatial detail
    for 32x32 inputs. Every ReLU of torchvision's model is replaced by
    ``act()``; with ``sigmoid`` (the leakage literature's choice) the features
    entering the classifier are positive, which label recovery relies on.
    Initialisation follows torchvision (Kaiming-normal fan-out convolutions,
    BatchNorm weight 1 / bias 0, default Linear) drawn from the generator.
    """

    def __init__(
        self, num_classes: int, in_shape: tuple[int, int, int], act: Callable, cifar_stem: bool
    ) -> None:
        super().__init__()
        net = torchvision.models.resnet18(num_classes=num_classes)
        c = in_shape[0]
        if cifar_stem:
            net.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif c != 3:
            net.conv1 = nn.Conv2d(c, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _swap_relu(net, act)
        self.input_norm = InputNormalization()
        self.net = net

    def init_weights(self, g: torch.Generator) -> None:
        _default_init(self, g)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.weight[0, 0].numel()
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a parameter-free (option A) shortcut.

    Input (B, c_in, H, W) -> (B, c_out, ceil(H/s), ceil(W/s)) for stride ``s``.
    Where the shape changes, the shortcut subsamples the input by ``s`` and
    appends ``c_out - c_in`` zero channels (He et al. 2016, sec. 3.3, option A).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, act: Callable) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = act()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = act()
        self.stride, self.pad = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]  # (B, c_in, ceil(H/s), ceil(W/s))
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))  # (B, c_out, ...): zeros appended
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He, Zhang, Ren, Sun, "Deep Residual Learning for
    Image Recognition", CVPR 2016, sec. 4.2 (n = 3, 6n + 2 = 20 layers).

    Conv(C->16, k3, p1) -> BN -> act -> 3 stages of 3 basic blocks with 16, 32
    and 64 channels (stride 2 in the first block of stages 2 and 3) -> global
    average pool -> Linear(64 -> classes). Convolutions have no bias (BatchNorm
    follows each). 269,722 parameters for 3x32x32 inputs and 10 classes (the
    paper's "0.27M").

    Shortcuts are option A of the paper: identity, with stride-2 subsampling and
    zero channels appended where the shape changes. The paper uses option A for
    its CIFAR networks, so this model has the published parameter count and its
    gradient (what an attacker observes) holds no projection weights that the
    published victim lacks. Option B (1x1 projections and their BatchNorms) would
    add 2,752 parameters.

    Init: convolutions Kaiming-normal, std ``sqrt(2 / fan_out)`` (He et al. 2015,
    as in fb.resnet.torch and torchvision), BatchNorm weight 1 and bias 0,
    the linear layer PyTorch's default; all drawn from the generator.

    Input (B, C, H, W), any C, H, W -> logits (B, classes); 28x28 inputs pass
    through 28 -> 14 -> 7 spatially.
    """

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], act: Callable) -> None:
        super().__init__()
        self.input_norm = InputNormalization()
        self.conv1 = nn.Conv2d(in_shape[0], 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = act()
        blocks, c_in = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            stage = [_BasicBlock(c_in, c_out, stride, act)]
            stage += [_BasicBlock(c_out, c_out, 1, act) for _ in range(2)]
            blocks.append(nn.Sequential(*stage))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = blocks
        self.fc = nn.Linear(64, num_classes)

    def init_weights(self, g: torch.Generator) -> None:
        _default_init(self.fc, g)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.weight[0, 0].numel()
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(self.input_norm(x))))  # (B, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64, ceil(H/4), ceil(W/4))
        return self.fc(x.mean(dim=(2, 3)))  # (B, 64) -> (B, classes)


class MLP(nn.Module):
    """A fully connected victim: Flatten -> Linear(C*H*W -> width) -> act ->
    (Linear(width -> width) -> act) x (depth - 2) -> Linear(width -> classes).

    ``depth`` counts the linear layers (``depth = 1``: multinomial logistic
    regression, ``width`` unused). The first layer is always a ``Linear`` with
    bias and comes first in ``parameters()``, so an update's tensors 0 and 1 are
    its weight ``(width, C*H*W)`` and bias ``(width,)``. For one image, row ``i``
    of the weight gradient is ``dL/db_i * x``: the input is read off analytically
    (Phong et al., "Privacy-Preserving Deep Learning via Additively Homomorphic
    Encryption", 2017; Geiping et al., NeurIPS 2020, sec. 4). PyTorch's default
    init, drawn from the generator.

    Input (B, C, H, W) -> logits (B, classes).
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int],
        act: Callable,
        width: int,
        depth: int,
    ) -> None:
        super().__init__()
        self.input_norm = InputNormalization()
        sizes = [math.prod(in_shape)] + [width] * (depth - 1) + [num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < depth - 1:
                layers.append(act())
        self.net = nn.Sequential(*layers)

    def init_weights(self, g: torch.Generator) -> None:
        _default_init(self, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_norm(x))  # (B, C, H, W) -> (B, C*H*W) -> ... -> (B, classes)


class CNN6(nn.Module):
    """The six-convolution victim of R-GAP (Zhu & Blaschko, "R-GAP: Recursive
    Gradient Attack on Privacy", ICLR 2021, their "CNN6"), with the layers of
    breaching's ``cnn6`` (``breaching/cases/models/model_preparation.py``).

    Conv(C->12, k4, s2, p2) -> act -> Conv(12->36, k3, s2, p1) -> act ->
    Conv(36->36, k3, s1, p1) -> act -> Conv(36->36, k3, s1, p1) -> act ->
    Conv(36->64, k3, s2, p1) -> act -> Conv(64->128, k3, s1, p1) -> act ->
    Linear(128*h*w -> classes). Convolutions have no bias, the linear layer
    has one. For 32x32 inputs the spatial sizes are 17, 9, 9, 9, 5, 5 and the
    linear layer reads 3,200 features (28x28: 15, 8, 8, 8, 4, 4 and 2,048).
    The default activation is the paper's leaky ReLU with slope 0.2 (option
    ``negative_slope``; the ``leaky_relu`` of :data:`ACTIVATIONS` elsewhere has
    PyTorch's 0.01). PyTorch's default init, drawn from the generator.

    Input (B, C, H, W) -> logits (B, classes).
    """

    LAYERS = (
        (12, 4, 2, 2),
        (36, 3, 2, 1),
        (36, 3, 1, 1),
        (36, 3, 1, 1),
        (64, 3, 2, 1),
        (128, 3, 1, 1),
    )
    """(out channels, kernel, stride, padding) of the six convolutions."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], act: Callable) -> None:
        super().__init__()
        self.input_norm = InputNormalization()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for c_out, k, s, p in self.LAYERS:
            layers += [nn.Conv2d(c, c_out, kernel_size=k, stride=s, padding=p, bias=False), act()]
            c = c_out
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c * h * w, num_classes)

    def init_weights(self, g: torch.Generator) -> None:
        _default_init(self, g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.input_norm(x)).flatten(1))  # (B, 128*h*w) -> (B, classes)


def _swap_relu(module: nn.Module, act: Callable) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, act())
        else:
            _swap_relu(child, act)


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
