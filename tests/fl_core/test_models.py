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
* ResNet-20: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016, sec. 4.2: 6n + 2 = 20 weighted layers (n = 3), 16/32/64 channels,
  identity (option A) shortcuts, "0.27M" parameters (their Table 6).
* Fully connected first layer: Phong et al., "Privacy-Preserving Deep Learning via
  Additively Homomorphic Encryption", 2017: for one example, ``dL/dW_i = dL/db_i * x``.
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


# ---------------------------------------------------------------- ResNet-20 (He et al. 2016)


# Parameter count by hand (option A shortcuts have none; convolutions have no bias;
# each BatchNorm has 2 per channel):
#   stem     conv 3*16*9 = 432, BN 32                                     ->     464
#   stage 1  3 blocks x (2 convs 16*16*9 = 2304, 2 BN 32)  = 3 x 4672     ->  14,016
#   stage 2  first: 16*32*9 + 32*32*9 + 2*64 = 4608 + 9216 + 128 = 13,952
#            two more: 2 x (2*9216 + 128) = 37,120                        ->  51,072
#   stage 3  first: 32*64*9 + 64*64*9 + 2*128 = 18432 + 36864 + 256 = 55,552
#            two more: 2 x (2*36864 + 256) = 147,968                      -> 203,520
#   fc       64*10 + 10                                                   ->     650
#   total 464 + 14,016 + 51,072 + 203,520 + 650 = 269,722 (the paper's "0.27M").
# One input channel: the stem conv has 1*16*9 = 144 weights, 288 fewer; 100 classes:
# the fc has 64*100 + 100 = 6500, 5850 more.
@pytest.mark.parametrize(
    ("in_shape", "num_classes", "expected"),
    [((3, 32, 32), 10, 269_722), ((1, 28, 28), 10, 269_434), ((3, 32, 32), 100, 275_572)],
)
def test_resnet20_parameter_count(in_shape, num_classes, expected):
    model = build_model("resnet20", in_shape=in_shape, num_classes=num_classes)
    assert count_parameters(model) == expected


def test_resnet20_has_20_weighted_layers_and_no_projections():
    model = build_model("resnet20")
    convs = _modules(model, nn.Conv2d)
    assert len(convs) + len(_modules(model, nn.Linear)) == 20  # 6n + 2 with n = 3
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)  # option A: no 1x1
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    assert [c.stride[0] for c in convs].count(2) == 2  # first conv of stages 2 and 3
    assert len(_modules(model, nn.BatchNorm2d)) == 19


@pytest.mark.parametrize(
    ("in_shape", "final_hw"), [((3, 32, 32), (8, 8)), ((1, 28, 28), (7, 7)), ((3, 15, 15), (4, 4))]
)
def test_resnet20_shapes(in_shape, final_hw):
    model = build_model("resnet20", in_shape=in_shape, num_classes=7)
    seen = {}
    model.layer3.register_forward_hook(lambda m, i, o: seen.update(out=o.shape))
    with torch.no_grad():
        out = model(torch.rand(2, *in_shape, generator=_gen(0)))  # (B, C, H, W)
    assert out.shape == (2, 7)
    assert seen["out"] == (2, 64, *final_hw)  # spatial size ceil(H / 4) after two stride-2 stages


def test_resnet20_option_a_shortcut_pads_zero_channels():
    block = build_model("resnet20").layer2[0]  # 16 -> 32 channels, stride 2
    x = torch.rand(2, 16, 8, 8, generator=_gen(1))
    short = block.shortcut(x)
    assert short.shape == (2, 32, 4, 4)
    assert torch.equal(short[:, :16], x[:, :, ::2, ::2])
    assert torch.equal(short[:, 16:], torch.zeros(2, 16, 4, 4))


def test_resnet20_uses_kaiming_normal_init():
    model = build_model("resnet20", generator=_gen(4))
    conv = model.layer3[2].conv2  # 64*64*9 = 36864 draws: relative s.e. of the std ~0.4%
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)
    assert abs(float(conv.weight.detach().mean())) < 0.003  # s.e. 0.059 / 192 = 0.0003
    for bn in _modules(model, nn.BatchNorm2d):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    bound = 1 / math.sqrt(64)  # PyTorch's default Linear init
    assert float(model.fc.weight.detach().abs().max()) <= bound


# ---------------------------------------------------------------- MLP


# By hand: 3*32*32 = 3072 inputs; 3072*1024 + 1024 = 3,146,752; 1024*1024 + 1024 =
# 1,049,600; 1024*10 + 10 = 10,250; total 4,206,602. Width 64, depth 2 on 1x28x28:
# 784*64 + 64 = 50,240 and 64*10 + 10 = 650; depth 1 on 1x28x28: 784*10 + 10 = 7850.
@pytest.mark.parametrize(
    ("in_shape", "options", "expected"),
    [
        ((3, 32, 32), {}, 4_206_602),
        ((1, 28, 28), {"width": 64, "depth": 2}, 50_890),
        ((1, 28, 28), {"depth": 1}, 7_850),
    ],
)
def test_mlp_parameter_count(in_shape, options, expected):
    assert count_parameters(build_model("mlp", in_shape=in_shape, **options)) == expected


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mlp_first_layer_is_linear_with_bias(depth):
    model = build_model("mlp", in_shape=(1, 28, 28), width=32, depth=depth)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == depth
    first = next(m for m in model.modules() if list(m.parameters(recurse=False)))
    assert first is layers[0] and first.bias is not None
    assert first.in_features == 784
    w, b = list(model.parameters())[:2]  # an update's tensors 0 and 1
    assert w is first.weight and b is first.bias


def test_mlp_input_is_read_off_the_first_layer_gradient():
    """Phong et al. 2017: for one image, row i of dL/dW equals dL/db_i times x."""
    model = build_model("mlp", in_shape=(1, 8, 8), width=16, generator=_gen(2)).double()
    x = torch.rand(1, 1, 8, 8, generator=_gen(3), dtype=torch.float64)  # (1, C, H, W)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([3]))
    gw, gb = torch.autograd.grad(loss, list(model.parameters())[:2])  # (16, 64), (16,)
    i = int(gb.abs().argmax())
    torch.testing.assert_close(gw[i] / gb[i], x.reshape(-1))


def test_mlp_uses_pytorch_default_init():
    model = build_model("mlp", in_shape=(1, 28, 28), width=64, generator=_gen(3))
    for layer in _modules(model, nn.Linear):
        bound = 1 / math.sqrt(layer.in_features)  # torch.nn.Linear docs
        assert float(layer.weight.detach().abs().max()) <= bound
        assert float(layer.weight.detach().abs().max()) > 0.9 * bound  # >= 640 draws
        assert float(layer.bias.detach().abs().max()) <= bound


@pytest.mark.parametrize(("option", "value"), [("width", 0), ("depth", 0), ("depth", 2.5)])
def test_mlp_bad_options_raise(option, value):
    with pytest.raises(ValueError, match=option):
        build_model("mlp", **{option: value})


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


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_activation_swap_relu_default(name):
    default = build_model(name)  # ResNet and MLP are published with ReLU
    assert default.spec.activation == "relu"
    assert _modules(default, nn.ReLU)
    tanh = build_model(name, activation="tanh")
    assert _modules(tanh, nn.Tanh)
    assert not _modules(tanh, nn.ReLU)
    assert tanh.spec.activation == "tanh"


def test_resnet20_sigmoid_replaces_every_relu():
    # the stem's activation and two per BasicBlock: 1 + 2 * 9 = 19
    assert len(_modules(build_model("resnet20"), nn.ReLU)) == 19
    sigmoid = build_model("resnet20", activation="sigmoid")
    assert len(_modules(sigmoid, nn.Sigmoid)) == 19
    assert not _modules(sigmoid, nn.ReLU)


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
        ("resnet20", {"in_shape": (1, 28, 28), "activation": "sigmoid", "num_classes": 5}),
        ("mlp", {"width": 32, "depth": 4, "activation": "tanh"}),
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


# ---------------------------------------------------------------- input normalisation, ReLU init

CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@pytest.mark.parametrize("name", ["lenet", "cnn", "resnet18", "resnet20", "mlp"])
def test_normalisation_is_the_first_layer_and_adds_no_state(name):
    """A normalising victim on pixels equals the same weights on (x - mean) / std."""
    plain = build_model(name, generator=_gen(0)).eval()
    normed = build_model(name, normalize=CIFAR, generator=_gen(0)).eval()
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in normed.named_parameters()]
    assert plain.state_dict().keys() == normed.state_dict().keys()
    assert len(list(plain.buffers())) == len(list(normed.buffers()))
    x = torch.rand(2, 3, 32, 32, generator=_gen(1))
    mean = torch.tensor(CIFAR[0]).view(3, 1, 1)
    std = torch.tensor(CIFAR[1]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            normed.double()(x.double()), plain.double()((x.double() - mean) / std)
        )
    assert normed.spec.normalize == (CIFAR[0], CIFAR[1])
    rebuilt = ModelSpec(**{**normed.spec.__dict__}).build()
    assert rebuilt.spec == normed.spec and rebuilt.input_norm.mean == CIFAR[0]


def test_normalisation_spec_round_trips_through_a_dict_and_a_checkpoint(tmp_path):
    from fl_core import load_checkpoint, save_checkpoint

    model = build_model("resnet20", normalize=CIFAR, generator=_gen(0))
    d = model.spec.to_dict()
    assert d["normalize"] == {"mean": list(CIFAR[0]), "std": list(CIFAR[1])}
    assert "normalize" not in build_model("resnet20").spec.to_dict()  # old dicts unchanged
    assert ModelSpec.normalize_from_dict(d["normalize"]) == (CIFAR[0], CIFAR[1])
    save_checkpoint(model, tmp_path / "v.pt", meta={})
    loaded, _ = load_checkpoint(tmp_path / "v.pt")
    assert loaded.spec == model.spec


@pytest.mark.parametrize(
    "normalize, fragment",
    [
        (((0.5,), (0.5,)), "1 means and 1 stds for 3"),
        (((0.5, 0.5, 0.5), (0.2, 0.0, 0.2)), "positive stds"),
        ((0.5, 0.2), "one value per channel"),
    ],
)
def test_bad_normalisation_raises(normalize, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        build_model("lenet", normalize=normalize)


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "silu"])
def test_lenet_off_sigmoid_uses_pytorch_default_init_and_is_not_saturated(activation):
    """U(-0.5, 0.5) weights under ReLU give logits of std ~50 (softmax saturated, the
    cross-entropy exactly 0 in float32); PyTorch's default keeps them O(0.1)."""
    model = build_model("lenet", activation=activation, generator=_gen(0))
    for layer in _modules(model, nn.Conv2d) + _modules(model, nn.Linear):
        assert float(layer.weight.detach().abs().max()) <= 1 / math.sqrt(layer.weight[0].numel())
    with torch.no_grad():
        logits = model(torch.rand(64, 3, 32, 32, generator=_gen(1)))
    assert float(logits.std()) < 1.0
    paper = build_model("lenet", activation="relu", generator=_gen(0))
    for p in paper.parameters():  # the paper's init for comparison: saturating
        with torch.no_grad():
            p.uniform_(-0.5, 0.5, generator=_gen(2))
    with torch.no_grad():
        assert float(paper(torch.rand(64, 3, 32, 32, generator=_gen(1))).std()) > 10
