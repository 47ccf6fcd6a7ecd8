"""Tests for fl_core.checkpoint and fl_core.train.train_victim.

A checkpoint must load with ``torch.load(weights_only=True)`` (PyTorch's safe
loader: tensors and plain Python values only) and give back the same function:
identical outputs on a fixed input, BatchNorm running statistics included.
"""

from __future__ import annotations

import pytest
import torch

from fl_core import build_model, load_checkpoint, save_checkpoint, train_victim

pytestmark = pytest.mark.usefixtures("torch_single_thread")

VICTIMS = [
    ("lenet", {}),
    ("resnet20", {"in_shape": (1, 28, 28), "num_classes": 5}),
    ("mlp", {"width": 32, "depth": 3, "activation": "tanh"}),
    ("resnet18", {"cifar_stem": True, "in_shape": (3, 16, 16)}),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _touch_batchnorm(model: torch.nn.Module, in_shape) -> None:
    """Move BatchNorm running statistics away from their initial 0 / 1."""
    with torch.no_grad():
        model.train()(torch.rand(4, *in_shape, generator=_gen(5)) * 3 + 1)


@pytest.mark.parametrize(("name", "kwargs"), VICTIMS)
def test_round_trip_gives_identical_outputs(tmp_path, name, kwargs):
    model = build_model(name, generator=_gen(1), **kwargs)
    in_shape = model.spec.in_shape
    _touch_batchnorm(model, in_shape)
    meta = {"dataset": "samples", "epochs": 2, "lr": 0.01, "accuracy": 0.5, "losses": [2.3, 1.1]}
    path = save_checkpoint(model, tmp_path / "sub" / "v.pt", meta=meta)
    assert path == tmp_path / "sub" / "v.pt" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))

    raw = torch.load(path, weights_only=True)  # the safe loader reads it
    assert raw["spec"] == model.spec.to_dict()

    loaded, got = load_checkpoint(path)
    assert loaded.spec == model.spec
    assert {k: got[k] for k in meta} == meta
    assert got["versions"]["torch"] == torch.__version__.split("+")[0]
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # parameters and buffers (BatchNorm running stats, batch counts)
        assert torch.equal(a[key], b[key]), key
    x = torch.rand(3, *in_shape, generator=_gen(2))  # (B, C, H, W)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_resnet20_round_trip_keeps_batchnorm_statistics(tmp_path):
    model = build_model("resnet20", generator=_gen(3))
    _touch_batchnorm(model, (3, 32, 32))
    assert not torch.equal(model.bn1.running_mean, torch.zeros(16))
    save_checkpoint(model, tmp_path / "r.pt", meta={})
    loaded, _ = load_checkpoint(tmp_path / "r.pt")
    assert torch.equal(loaded.bn1.running_mean, model.bn1.running_mean)
    assert torch.equal(loaded.layer3[2].bn2.running_var, model.layer3[2].bn2.running_var)
    assert int(loaded.bn1.num_batches_tracked) == 1


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="checkpoint not found") as err:
        load_checkpoint(tmp_path / "nope.pt")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all", None, {"state_dict": {}}, {"format": "other"}],
    ids=["text", "plain-tensor", "dict-without-marker", "foreign-marker"],
)
def test_foreign_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(torch.zeros(3) if content is None else content, path)
    with pytest.raises(ValueError, match="not a leakage-lab checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_pickled_object_is_refused_by_the_safe_loader(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": "leakage-lab checkpoint", "model": build_model("lenet")}, path)
    with pytest.raises(ValueError, match="not a leakage-lab checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_weights_that_do_not_fit_the_spec_are_a_one_line_error(tmp_path):
    path = save_checkpoint(build_model("lenet"), tmp_path / "v.pt", meta={})
    payload = torch.load(path, weights_only=True)
    payload["spec"]["in_shape"] = [1, 28, 28]  # fc expects 588 inputs, the file has 768
    torch.save(payload, path)
    with pytest.raises(ValueError, match="do not fit") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "fc.weight" in str(err.value)


def test_meta_must_be_plain(tmp_path):
    with pytest.raises(ValueError, match=r"meta\['when'\]"):
        save_checkpoint(build_model("lenet"), tmp_path / "v.pt", meta={"when": object()})
    assert not (tmp_path / "v.pt").exists()


def test_model_without_spec_is_refused(tmp_path):
    with pytest.raises(ValueError, match="spec"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "v.pt", meta={})


# ---------------------------------------------------------------- train_victim


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by the mean brightness of a 1x8x8 image."""
    g = _gen(seed)
    labels = torch.arange(n) % 2  # (N,)
    images = 0.3 * torch.rand(n, 1, 8, 8, generator=g) + 0.6 * labels.view(-1, 1, 1, 1)
    return images, labels


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_train_victim_lowers_the_loss(name, seed):
    # measured over seeds 0-3: mlp 0.56-0.61 -> 0.41-0.46, resnet20 0.28-0.37 -> < 0.005
    images, labels = _separable(64, seed=seed)
    model = build_model(name, num_classes=2, in_shape=(1, 8, 8), generator=_gen(seed))
    losses = train_victim(
        model, images, labels, epochs=2, batch_size=16, lr=0.05, generator=_gen(seed + 1)
    )
    assert len(losses) == 2 and all(isinstance(v, float) for v in losses)
    assert losses[1] < losses[0]
    assert model.training


def test_train_victim_is_reproducible_and_leaves_global_rng_alone():
    images, labels = _separable(40, seed=1)

    def run(seed: int) -> list[float]:
        model = build_model("mlp", num_classes=2, in_shape=(1, 8, 8), width=16)
        return train_victim(
            model, images, labels, epochs=2, batch_size=16, lr=0.05, generator=_gen(seed)
        )

    before = torch.get_rng_state()
    assert run(3) == run(3)
    assert run(3) != run(4)  # the generator alone orders the batches
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
    ],
)
def test_train_victim_checks_its_settings(kwargs, fragment):
    images, labels = _separable(8, seed=0)
    settings = {"epochs": 1, "batch_size": 4, "lr": 0.1, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        model = build_model("lenet", in_shape=(1, 8, 8))
        train_victim(model, images, labels, generator=_gen(0), **settings)


def test_train_victim_rejects_mismatched_data():
    images, labels = _separable(8, seed=0)
    with pytest.raises(ValueError, match="labels"):
        train_victim(
            build_model("lenet", in_shape=(1, 8, 8)),
            images,
            labels[:5],
            epochs=1,
            batch_size=4,
            lr=0.1,
            generator=_gen(0),
        )
