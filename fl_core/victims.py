"""The victim architectures and their seeded initialisations.

DLG's LeNet (Zhu, Liu, Han, NeurIPS 2019), a small CNN, torchvision's ResNet-18,
the CIFAR ResNet-20 of He, Zhang, Ren, Sun (CVPR 2016), a fully connected MLP
(Phong et al. 2017) and R-GAP's CNN6 (Zhu & Blaschko, ICLR 2021), each with
:class:`InputNormalization` as its first layer and an ``init_weights(generator)``
that draws every initial weight from a ``torch.Generator``.
:mod:`fl_core.models` registers them by name and builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "CNN6",
    "InputNormalization",
    "LeNet",
    "MLP",
    "ResNet18",
    "ResNet20",
    "SmallCNN",
]


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
