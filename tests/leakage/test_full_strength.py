"""Attacks at full strength: normalised victims, BatchNorm modes, numerically safe matching.

* Geiping et al. (2020) optimise in the network's normalised input coordinates
  and box-constrain the image there; the lab does the same by default and
  reports images in pixel space.
* A saturated ReLU LeNet (U(-0.5, 0.5) weights) has dummy gradients of ~1e-21:
  a cosine whose norms multiply to below float32's smallest normal number
  (1.2e-38) must not blow up (the lab's earlier formula gave -3.1e6).
* The analytic attack reads the *normalised* input off a first linear layer
  and must map it back to pixels with the spec's mean and std.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from fl_core import Client, LocalTraining, Server, build_model, load_samples
from fl_core.data import NORMALIZATION
from leakage import ATTACKS, Analytic, InvertingGradients, psnr, score_images
from leakage.app.cli import main
from leakage.attacks.inverting import VanishingGradientWarning, invert_gradients
from leakage.objectives import cosine_distance

pytestmark = pytest.mark.usefixtures("torch_single_thread")
CIFAR = NORMALIZATION["cifar10"]


def observe(model, images, labels, **training):
    seen, truth = [], []
    client = Client(0, images, labels, training=LocalTraining(**training))
    Server(model, [client], listeners=[seen.append], truth_listeners=[truth.append]).run_round()
    return seen[0], truth[0]


@pytest.mark.parametrize("scale", [1.0, 1e-21, 1e-30, 1e25])
def test_cosine_is_safe_at_any_magnitude(scale):
    """1 − cos in [0, 2] and equal to the float64 value however small or large the vectors."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1000, generator=g)
    dummy = torch.randn(3, 1000, generator=g) + target
    expected = 1 - torch.nn.functional.cosine_similarity(
        dummy.double(), target.double()[None], dim=-1
    )
    got = cosine_distance((dummy * scale).float(), (target * 1e-3).float())
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert bool(((got >= 0) & (got <= 2)).all())


def test_cosine_of_a_vanished_gradient_is_one_with_zero_gradient():
    target = torch.randn(50, generator=torch.Generator().manual_seed(0))
    dummy = torch.zeros(2, 50, requires_grad=True)
    loss = cosine_distance(dummy, target)
    torch.testing.assert_close(loss.detach(), torch.ones(2))
    (grad,) = torch.autograd.grad(loss.sum(), dummy)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


def test_saturated_victim_warns_and_its_loss_stays_in_range():
    """A ReLU LeNet with the DLG paper's U(-0.5, 0.5) weights: the loss history never
    leaves [0, 2] (the earlier formula underflowed to -3,118,000) and, where the dummy
    gradient is exactly zero, the attack says so."""
    data = load_samples(count=1)
    model = build_model("lenet", activation="relu", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
            p.mul_(4.0)  # deeper saturation: the dummy gradients vanish exactly
    obs, _ = observe(model, data.images, data.labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = invert_gradients(obs, labels=data.labels, steps=20, restarts=4, compile=False)
    assert all(0.0 <= v <= 2.0 + 0.1 for v in rec.history)  # TV adds at most a little
    assert all(0.0 <= v <= 2.0 for v in rec.restart_losses if v != float("inf"))
    assert any(issubclass(w.category, VanishingGradientWarning) for w in caught)


def test_ig_on_the_relu_lenet_is_well_above_a_random_image():
    """The ReLU LeNet is not "safe": with PyTorch's init and a normalised input, IG
    (500 iterations, the lab's defaults) recovers the astronaut well above the ~8 dB of
    a random image (measured 16.8 dB)."""
    data = load_samples(count=1)
    model = build_model(
        "lenet", activation="relu", normalize=NORMALIZATION["imagenet"],
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    obs, truth = observe(model, data.images, data.labels)
    rec = InvertingGradients(steps=500).reconstruct(obs)
    noise = float(psnr(torch.rand(1, 3, 32, 32, generator=torch.Generator()), truth.images,
                       data_range=1.0)[0])  # fmt: skip
    score = float(psnr(rec.images, truth.images, data_range=1.0)[0])
    assert score >= noise + 5, (score, noise)
    assert all(v >= 0 for v in rec.history)


def test_normalised_coordinates_box_and_pixel_output():
    """The optimised z = (x − mean)/std stays in the box of [0, 1] pixels, and on a victim
    without normalisation both coordinate systems follow the same trajectory."""
    data = load_samples(count=1)
    plain = build_model("lenet", generator=torch.Generator().manual_seed(0))
    obs, _ = observe(plain, data.images, data.labels)
    kw = dict(labels=data.labels, steps=15, init="uniform", compile=False)
    a = invert_gradients(obs, coordinates="pixel", **kw)
    b = invert_gradients(obs, coordinates="normalized", **kw)
    torch.testing.assert_close(a.images, b.images)
    from leakage.attacks.inverting_loop import Space
    from leakage.attacks.matching import setup

    normed = build_model("lenet", normalize=CIFAR, generator=torch.Generator().manual_seed(0))
    obs, _ = observe(normed, data.images, data.labels)
    space = Space(obs, "normalized", setup(obs, dtype="float32", device=None, lbfgs=False))
    z = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 5
    space.project_(z)
    x = space.to_pixels(z)
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
    assert float(x.min()) == pytest.approx(0.0, abs=1e-6)  # the box is reached, not exceeded
    torch.testing.assert_close(space.from_pixels(x), z)


@pytest.mark.parametrize(
    "model, activation, bn_mode, family, raw_family",
    [
        ("lenet", "sigmoid", "train", "lenet-sigmoid", "lenet-sigmoid-raw"),
        ("lenet", "relu", "train", "lenet", "lenet-raw"),
        ("cnn", "sigmoid", "train", "cnn", "cnn"),
        ("resnet20", "relu", "train", "resnet-train", "raw"),
        ("resnet20", "relu", "eval", "resnet-eval", "resnet-eval"),
        ("resnet18", "sigmoid", "eval", "resnet-sigmoid", "resnet-sigmoid"),
        ("mlp", "relu", "train", "fallback", "raw"),
    ],
)
def test_ig_defaults_follow_the_victim_family(model, activation, bn_mode, family, raw_family):
    """Per-victim defaults (benchmarks/results/tuning/ig/summary.md): the solver reports
    the family it resolved and the values it ran with; explicit options win. Without
    input normalisation the LeNets have swept settings of their own, the others keep a
    pixel-space setting as it is and fall back to the earlier loop otherwise."""
    from leakage.attacks.inverting import FALLBACK, RAW, TUNED, tuned_options

    m = build_model(model, activation=activation, normalize=CIFAR, in_shape=(3, 32, 32))
    train = bn_mode == "train"
    got, options = tuned_options(m.spec, train)
    assert got == family
    assert options == TUNED.get(family, FALLBACK)
    raw = build_model(model, activation=activation, in_shape=(3, 32, 32))
    got_raw, raw_options = tuned_options(raw.spec, train)
    assert got_raw == raw_family
    assert raw_options == (RAW if raw_family == "raw" else TUNED[raw_family])
    assert raw_options["coordinates"] == "pixel"  # nothing to normalise


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_grayscale_lenets_take_the_fashion_mnist_setting(activation):
    from fl_core.data import NORMALIZATION
    from leakage.attacks.inverting import TUNED, tuned_options

    gray = build_model("lenet", activation=activation, in_shape=(1, 28, 28))
    assert tuned_options(gray.spec, True) == ("lenet-gray-raw", TUNED["lenet-gray-raw"])
    norm = build_model(
        "lenet",
        activation=activation,
        in_shape=(1, 28, 28),
        normalize=NORMALIZATION["fashion-mnist"],
    )
    assert tuned_options(norm.spec, True) == ("lenet-gray", TUNED["lenet-gray"])


def test_ig_result_records_the_resolved_options():
    data = load_samples(count=1)
    model = build_model("lenet", normalize=CIFAR, generator=torch.Generator().manual_seed(0))
    obs, _ = observe(model, data.images, data.labels)
    rec = invert_gradients(obs, labels=data.labels, steps=3, tv=0.5, compile=False)
    assert rec.options["tuned_for"] == "lenet-sigmoid"
    assert rec.options["tv"] == 0.5  # given explicitly
    assert rec.options["lr"] == 0.3 and rec.options["schedule"] == "cosine"  # tuned


def test_keep_best_returns_the_lowest_objective_seen():
    data = load_samples(count=1)
    model = build_model("lenet", generator=torch.Generator().manual_seed(0))
    obs, _ = observe(model, data.images, data.labels)
    # a step size far too large: the objective jumps around, the last iterate is not the best
    kw = dict(labels=data.labels, steps=30, lr=3.0, schedule="constant", tv=0.0, compile=False)
    best = invert_gradients(obs, keep_best=True, **kw)
    last = invert_gradients(obs, keep_best=False, **kw)
    assert best.history == last.history  # the same trajectory
    assert best.loss <= min(best.history) + 1e-6
    assert best.loss < last.loss


def test_compiled_objective_follows_the_eager_one():
    """torch.compile changes the arithmetic's order only: same losses to float tolerance."""
    data = load_samples(count=1)
    model = build_model("lenet", normalize=CIFAR, generator=torch.Generator().manual_seed(0))
    obs, _ = observe(model, data.images, data.labels)
    kw = dict(labels=data.labels, steps=5, restarts=2, generator=torch.Generator().manual_seed(0))
    eager = invert_gradients(obs, compile=False, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    fast = invert_gradients(obs, compile=True, **kw)
    assert eager.history[0] == pytest.approx(fast.history[0], rel=1e-4)
    torch.testing.assert_close(eager.images, fast.images, atol=2e-3, rtol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_analytic_attack_is_exact_on_a_normalising_mlp(batch):
    data = load_samples(count=batch)
    model = build_model(
        "mlp", normalize=NORMALIZATION["imagenet"], generator=torch.Generator().manual_seed(0)
    )
    obs, truth = observe(model, data.images, data.labels)
    scores = score_images(Analytic().reconstruct(obs).images, truth.images, data_range=1.0)
    assert bool((scores.psnr >= 60).all()), scores.psnr


def test_cli_records_bn_mode_and_normalisation(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["attack", "--attack", "ig", "--model", "resnet20", "--bn-mode", "eval",
            "--steps", "3", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["bn_mode"] == "eval" and res["observation"]["bn_mode"] == "eval"
    assert res["observation"]["protocol"]["train_mode"] is False
    assert res["victim"]["normalize"]["mean"] == list(NORMALIZATION["imagenet"][0])
    out2 = tmp_path / "s"
    assert main([*argv[:-1], str(out2), "--normalize", "none"]) == 0
    assert "normalize" not in json.loads((out2 / "results.json").read_text())["victim"]


def test_auto_normalisation_keeps_dlgs_victim_raw():
    """DLG's LeNet (sigmoid) takes raw pixels, as in Zhu et al.'s code; other victims, and the
    same LeNet with ReLU, carry the data's normalisation unless told otherwise."""
    from fl_core import load_samples as samples
    from leakage.app.experiment import AttackConfig, victim_normalization

    data = samples(count=1)
    assert victim_normalization(AttackConfig(), "samples", data) is None
    relu = AttackConfig(activation="relu")
    assert victim_normalization(relu, "samples", data) == NORMALIZATION["imagenet"]
    forced = AttackConfig(normalize="dataset")
    assert victim_normalization(forced, "samples", data) == NORMALIZATION["imagenet"]
    cnn = AttackConfig(model="cnn", normalize="none")
    assert victim_normalization(cnn, "samples", data) is None


@pytest.mark.parametrize("flag, value", [("--bn-mode", "test"), ("--normalize", "imagenet")])
def test_cli_rejects_bad_modes_in_one_line(flag, value, tmp_path, capsys):
    code = main(["attack", flag, value, "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and value in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("attack", ["dlg", pytest.param("idlg", marks=pytest.mark.slow)])
def test_compiled_gradient_matching_follows_the_eager_one(attack):
    """DLG's loss through torch.compile is the eager loss to float64 rounding: same path.

    float64, as DLG runs on LeNet-sized victims, with float64 L-BFGS pairs: float32
    pairs round last-bit differences of the objective to float32 ones, which L-BFGS
    then amplifies (iDLG's third loss differed by 9e-6 relative with them).
    """
    data = load_samples(count=1)
    model = build_model("lenet", num_classes=20, generator=torch.Generator().manual_seed(0))
    obs, _ = observe(model, data.images, data.labels)
    kw = dict(steps=2, restarts=1, max_iter=10, dtype="float64", history_dtype="float64")
    eager = ATTACKS.build(attack, compile=False, **kw).reconstruct(obs)
    fast = ATTACKS.build(attack, compile=True, **kw).reconstruct(obs)
    assert fast.evaluations == eager.evaluations
    assert fast.history == pytest.approx(eager.history, rel=1e-9)
    torch.testing.assert_close(fast.images, eager.images, atol=1e-6, rtol=0)


def test_gradient_matching_runs_eager_where_compilation_fails(monkeypatch):
    """A victim torch.compile cannot take: one warning, then exactly the eager attack."""

    def broken(fn, **_):
        def call(*args):
            raise RuntimeError("unsupported operator\nmore detail")

        return call

    data = load_samples(count=1)
    model = build_model("mlp", num_classes=20, generator=torch.Generator().manual_seed(0))
    obs, _ = observe(model, data.images, data.labels)
    kw = dict(steps=2, restarts=1, max_iter=10)
    eager = ATTACKS.build("dlg", compile=False, **kw).reconstruct(obs)
    monkeypatch.setattr(torch, "compile", broken)
    expected = r"RuntimeError: unsupported operator\); DLG runs eager"
    with pytest.warns(RuntimeWarning, match=expected):
        fast = ATTACKS.build("dlg", compile=True, **kw).reconstruct(obs)
    assert fast.history == eager.history
    assert torch.equal(fast.images, eager.images)
