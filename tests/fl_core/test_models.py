"""Tests for fl_core.models: the victims, their published structure, init and determinism.

References:

* LeNet: Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019, and the
  authors' code (``models/vision.py``): three 5x5 convolutions with 12 channels,
  padding ``5 // 2``, strides 2, 2, 1, sigmoid activations, one linear layer with
  768 inputs for 32x32 images, and every weight and bias drawn ``U(-0.5, 0.5)``.
* PyTorch's default ``nn.Conv2d`` / ``nn.Linear`` init: ``U(-1/sqrt(fan_in),
  1/sqrt(fan_in))`` (the ``torch.nn`` docs of both layers).
* torchvision's ResNet init: convolutions ``kaiming_normal_(mode="fan_out",
  nonlinearity="relu")``, i.e. std ``sqrt(2 / fan_out)``; BatchNorm weight 1, bias 0.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from fl_core import ACTIVATIONS, MODELS, ModelSpec, build_model, count_parameters

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SHAPES = [(3, 32, 32), (1, 28, 28)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _modules(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def _tokens(message: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9_]+", message))


# ---------------------------------------------------------------- every victim builds and runs


@pytest.mark.parametrize("in_shape", SHAPES)
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_gives_logits(name, num_classes, in_shape):
    model = build_model(name, num_classes=num_classes, in_shape=in_shape)
    assert model.training  # build_model documents: returned in train mode
    x = torch.rand(2, *in_shape, generator=_gen(0))  # (B, C, H, W)
    with torch.no_grad():
        out = model(x)  # train mode: BatchNorm uses the batch statistics
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert model.spec.name == name
    assert model.spec.num_classes == num_classes
    assert model.spec.in_shape == in_shape


@pytest.mark.parametrize(
    ("in_shape", "cifar_stem"),
    [((3, 32, 32), True), ((3, 32, 32), False), ((1, 28, 28), True), ((1, 28, 28), False)],
)
def test_resnet18_stem(in_shape, cifar_stem):
    model = build_model("resnet18", in_shape=in_shape, cifar_stem=cifar_stem)
    conv1 = model.net.conv1
    assert conv1.in_channels == in_shape[0]
    assert conv1.out_channels == 64
    if cifar_stem:  # 3x3 stride-1 first convolution and no max-pool (docstring, He et al. 2016)
        assert conv1.kernel_size == (3, 3)
        assert conv1.stride == (1, 1)
        assert conv1.padding == (1, 1)
        assert not _modules(model, nn.MaxPool2d)
    else:  # torchvision's ImageNet stem: 7x7 stride 2, then a 3x3/2 max-pool
        assert conv1.kernel_size == (7, 7)
        assert conv1.stride == (2, 2)
        assert len(_modules(model, nn.MaxPool2d)) == 1
    # torchvision's ResNet-18: 1 stem conv + 8 blocks x 2 convs + 3 downsample convs
    assert len(_modules(model, nn.Conv2d)) == 20
    with torch.no_grad():
        out = model(torch.rand(2, *in_shape, generator=_gen(1)))  # (B, classes)
    assert out.shape == (2, 10)
    assert dict(model.spec.options) == {"cifar_stem": cifar_stem}


def test_resnet18_default_stem_for_small_images():
    # documented: the CIFAR stem is the default for inputs up to 64x64
    assert isinstance(build_model("resnet18", in_shape=(3, 32, 32)).net.maxpool, nn.Identity)


# ---------------------------------------------------------------- LeNet of the DLG paper


def _reference_lenet(in_channels: int, fc_in: int, num_classes: int) -> nn.Sequential:
    """The DLG authors' LeNet written out by hand (``models/vision.py``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 12, kernel_size=5, padding=5 // 2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(fc_in, num_classes),
    )


# fc inputs: 12 channels x (32 -> 16 -> 8 -> 8)^2 = 768 (the paper's code);
# 12 x (28 -> 14 -> 7 -> 7)^2 = 588, from the conv output-size formula by hand.
@pytest.mark.parametrize(("in_shape", "fc_in"), [((3, 32, 32), 768), ((1, 28, 28), 588)])
def test_lenet_structure_matches_dlg_paper(in_shape, fc_in):
    model = build_model("lenet", in_shape=in_shape)
    convs = _modules(model, nn.Conv2d)
    assert [c.kernel_size for c in convs] == [(5, 5)] * 3
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert [c.padding for c in convs] == [(2, 2)] * 3
    assert [c.out_channels for c in convs] == [12, 12, 12]
    assert [c.in_channels for c in convs] == [in_shape[0], 12, 12]
    assert all(c.bias is not None for c in convs)
    (fc,) = _modules(model, nn.Linear)
    assert (fc.in_features, fc.out_features) == (fc_in, 10)
    assert len(_modules(model, nn.Sigmoid)) == 3  # the paper's default activation
    assert model.spec.activation == "sigmoid"
    assert not _modules(model, nn.MaxPool2d)


@pytest.mark.parametrize(("in_shape", "fc_in"), [((3, 32, 32), 768), ((1, 28, 28), 588)])
def test_lenet_forward_equals_hand_written_reference(in_shape, fc_in):
    model = build_model("lenet", in_shape=in_shape, generator=_gen(7))
    ref = _reference_lenet(in_shape[0], fc_in, 10)
    with torch.no_grad():
        for r, p in zip(ref.parameters(), model.parameters(), strict=True):
            r.copy_(p)
        x = torch.rand(3, *in_shape, generator=_gen(8))
        torch.testing.assert_close(model(x), ref(x))  # same ops, float32 defaults


# Parameter counts by hand: conv1 C*12*25 + 12, conv2 = conv3 = 12*12*25 + 12 = 3612,
# fc fc_in*classes + classes.
@pytest.mark.parametrize(
    ("in_shape", "num_classes", "expected"),
    [
        ((3, 32, 32), 10, 912 + 3612 + 3612 + 7690),
        ((3, 32, 32), 100, 912 + 3612 + 3612 + 76900),
        ((1, 28, 28), 10, 312 + 3612 + 3612 + 5890),
    ],
)
def test_lenet_parameter_count(in_shape, num_classes, expected):
    model = build_model("lenet", in_shape=in_shape, num_classes=num_classes)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("in_shape", SHAPES)
def test_lenet_init_is_uniform_half(seed, in_shape):
    """All weights and biases ~ U(-0.5, 0.5), as ``weights_init`` in the DLG code."""
    model = build_model("lenet", in_shape=in_shape, generator=_gen(seed))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert flat.min() >= -0.5 and flat.max() <= 0.5
    for p in model.parameters():
        if p.numel() >= 300:  # P(max < 0.4) = 0.9**300 ~ 2e-14 for a true U(-0.5, 0.5)
            assert p.min() < -0.4 and p.max() > 0.4
    # U(-0.5, 0.5): mean 0, std 1/sqrt(12) = 0.2887. With n >= 13426 draws the standard
    # errors are 0.0025 (mean) and 0.001 (std); the tolerances are > 6 of them, while
    # PyTorch's default init (std <= 0.12 here) would miss by far.
    assert abs(float(flat.mean())) < 0.015
    assert float(flat.std()) == pytest.approx(1 / math.sqrt(12), abs=0.01)


def test_cnn_uses_pytorch_default_init():
    model = build_model("cnn", in_shape=(1, 28, 28), generator=_gen(3))
    layers = _modules(model, nn.Conv2d) + _modules(model, nn.Linear)
    assert len(layers) == 3
    for layer in layers:
        bound = 1 / math.sqrt(layer.weight[0].numel())  # torch.nn docs: U(-sqrt(k), sqrt(k))
        w = layer.weight.detach().abs()
        assert float(w.max()) <= bound
        assert float(w.max()) > 0.9 * bound  # >= 400 draws: P(all < 0.9 bound) < 1e-18
        assert float(layer.bias.detach().abs().max()) <= bound


def test_resnet18_uses_torchvision_init():
    model = build_model("resnet18", generator=_gen(4))
    for conv in (model.net.layer1[0].conv1, model.net.layer4[1].conv2):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        # >= 36864 normal draws: relative standard error of the std ~0.4%
        assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
    for bn in _modules(model, nn.BatchNorm2d):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("name", ["lenet", "cnn", "resnet18"])
def test_activation_swap(name):
    relu = build_model(name, activation="relu")
    assert _modules(relu, nn.ReLU)
    assert not _modules(relu, nn.Sigmoid)
    assert relu.spec.activation == "relu"
    sigmoid = build_model(name, activation="sigmoid")
    assert _modules(sigmoid, nn.Sigmoid)
    assert not _modules(sigmoid, nn.ReLU)
    assert sigmoid.spec.activation == "sigmoid"
    default = build_model(name)  # the leakage literature's default: sigmoid
    assert default.spec.activation == "sigmoid"
    assert not _modules(default, nn.ReLU)


def test_resnet18_sigmoid_replaces_every_relu():
    # torchvision's ResNet-18 holds 9 ReLU modules: the stem's and one per BasicBlock
    assert len(_modules(build_model("resnet18", activation="relu"), nn.ReLU)) == 9
    assert len(_modules(build_model("resnet18", activation="sigmoid"), nn.Sigmoid)) == 9


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", MODELS.names())
def test_generator_seed_determines_weights(name):
    a = build_model(name, generator=_gen(11)).state_dict()
    b = build_model(name, generator=_gen(11)).state_dict()
    c = build_model(name, generator=_gen(12)).state_dict()
    default = build_model(name).state_dict()
    seed0 = build_model(name, generator=_gen(0)).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(default[key], seed0[key]), key  # documented default: seed 0
    random_weights = [k for k in a if k.endswith("weight") and a[k].numel() > 1]
    random_weights = [k for k in random_weights if a[k].std() > 0]  # not BatchNorm's ones
    assert random_weights
    for key in random_weights:
        assert not torch.equal(a[key], c[key]), key


@pytest.mark.parametrize("name", MODELS.names())
def test_build_leaves_global_rng_alone(name):
    before = torch.get_rng_state()
    build_model(name)
    build_model(name, generator=_gen(5), activation="relu")
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------- names and specs


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="vgg11") as err:
        build_model("vgg11")
    assert set(MODELS.names()) <= _tokens(str(err.value))


@pytest.mark.parametrize("name", MODELS.names())
def test_unknown_activation_lists_valid_names(name):
    with pytest.raises(ValueError, match="gelu") as err:
        build_model(name, activation="gelu")
    assert set(ACTIVATIONS) <= _tokens(str(err.value))


@pytest.mark.parametrize(
    ("kwargs", "fragment"), [({"in_shape": (32, 32)}, "in_shape"), ({"num_classes": 1}, "num_")]
)
def test_bad_shape_or_classes_raise(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_model("lenet", **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("lenet", {"in_shape": (1, 28, 28), "num_classes": 100}),
        ("cnn", {"activation": "tanh"}),
        ("resnet18", {"in_shape": (3, 32, 32), "cifar_stem": False}),
        ("resnet18", {"in_shape": (1, 28, 28), "activation": "relu"}),
    ],
)
def test_spec_rebuilds_same_architecture(name, kwargs):
    model = build_model(name, generator=_gen(9), **kwargs)
    spec = model.spec
    assert isinstance(spec, ModelSpec)
    rebuilt = spec.build(generator=_gen(9))
    assert str(rebuilt) == str(model)
    assert rebuilt.spec == spec
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert spec.build().spec == spec  # default generator: same architecture again


def test_model_spec_is_hashable():
    spec = build_model("lenet").spec
    assert hash(spec) == hash(ModelSpec("lenet", 10, (3, 32, 32), "sigmoid"))
    stem = build_model("resnet18", cifar_stem=True).spec
    assert stem.options == (("cifar_stem", True),) and {stem: 1}[stem] == 1
