"""Tuned defaults of inverting gradients per victim family, chosen by the development sweep.

The sweep (``benchmarks/tuning.py``) ran on CIFAR-10 *training* images (Fashion-MNIST
for grayscale LeNets); its test-set numbers are in ``benchmarks/results/tuning/ig/``.
:func:`tuned_options` picks a victim's family and returns its setting.
"""

from __future__ import annotations

__all__ = ["FALLBACK", "RAW", "TUNED", "tuned_options"]

TUNED: dict[str, dict] = {
    # victim family -> the setting the development sweep chose for it
    # (benchmarks/tuning.py, 1,000 iterations, batch 1, CIFAR-10 victims with
    # input normalisation unless "-raw", Fashion-MNIST for "-gray"; results and
    # test-set numbers in benchmarks/results/tuning/ig/summary.md).
    "lenet-sigmoid": dict(
        coordinates="normalized", init="uniform", lr=0.3, tv=0.1, schedule="cosine", keep_best=False
    ),
    "lenet": dict(
        coordinates="normalized",
        init="uniform",
        lr=0.1,
        tv=0.03,
        schedule="constant",
        keep_best=True,
    ),
    "cnn": dict(
        coordinates="pixel", init="uniform", lr=0.3, tv=0.0, schedule="cosine", keep_best=False
    ),
    "resnet-train": dict(
        coordinates="normalized", init="randn", lr=0.03, tv=0.1, schedule="cosine", keep_best=False
    ),
    "resnet-eval": dict(
        coordinates="pixel", init="uniform", lr=0.3, tv=0.03, schedule="step", keep_best=True
    ),
    # Victims without input normalisation ([0, 1] pixels, as DLG's LeNet) and
    # grayscale ones (swept on Fashion-MNIST, 1x28x28) want their own settings:
    # the CIFAR-10-normalised ones carried to pixel units lost 16.7 dB on raw
    # Fashion-MNIST (privacy-utility sweep, ig-carried-settings/).
    "lenet-sigmoid-raw": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.03, schedule="step", keep_best=False
    ),
    "lenet-raw": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.1, schedule="cosine", keep_best=True
    ),
    "lenet-gray": dict(
        coordinates="pixel", init="uniform", lr=0.03, tv=0.0, schedule="step", keep_best=False
    ),
    "lenet-gray-raw": dict(
        coordinates="pixel", init="randn", lr=0.03, tv=0.001, schedule="step", keep_best=True
    ),
    # Not swept: sigmoid ResNets keep the lab's earlier pixel-space loop, which
    # the swept ReLU settings do not beat there (astronaut, ResNet-18, train
    # BatchNorm, 100 iterations: 17.1 dB against 11.4 with resnet-train's).
    "resnet-sigmoid": dict(
        coordinates="pixel", init="uniform", lr=0.1, tv=1e-4, schedule="step", keep_best=True
    ),
}
"""Tuned defaults per victim family (see :func:`tuned_options`)."""


FALLBACK = dict(
    coordinates="normalized", init="auto", lr=0.1, tv=0.05, schedule="step", keep_best=True
)
"""Defaults for victims the sweep did not cover (the MLP): the paper's loop
(normalised coordinates, step schedule, lr 0.1) with a moderate TV weight."""


RAW = dict(coordinates="pixel", init="uniform", lr=0.1, tv=1e-4, schedule="step", keep_best=False)
"""Defaults for victims without input normalisation whose family was tuned in
normalised coordinates only (the MLP, ReLU ResNets in train mode): the lab's
earlier pixel-space loop, not known to fail on raw victims. The raw LeNets have
their own swept settings."""


def tuned_options(spec, train_mode: bool) -> tuple[str, dict]:
    """``(family, options)``: the tuned IG defaults for a victim.

    Families: the sigmoid LeNet; any other LeNet (ReLU, tanh...); each of
    them without input normalisation (``-raw``); grayscale LeNets of any
    activation (``lenet-gray``, swept on the sigmoid one on Fashion-MNIST), with
    and without normalisation; the small CNN; the non-sigmoid ResNets
    (ResNet-20 was swept; ResNet-18 takes its setting) in train or eval
    BatchNorm mode, which change what the gradient shows enough to need
    different settings; the sigmoid ResNets; everything else gets
    :data:`FALLBACK`.

    The CNN and ResNet settings were tuned on CIFAR-10-normalised RGB victims;
    a victim of theirs without input normalisation gets :data:`RAW` (family
    ``"raw"``) unless its family's setting is already in pixel space (the CNN,
    the eval-mode and sigmoid ResNets), and a grayscale one takes the RGB
    setting (not swept).
    """
    activation = spec.activation or "sigmoid"
    raw = spec.normalize is None
    if spec.name == "lenet":
        if spec.in_shape[0] == 1:
            family = "lenet-gray"
        else:
            family = "lenet-sigmoid" if activation == "sigmoid" else "lenet"
        family += "-raw" if raw else ""
        return family, dict(TUNED[family])
    if spec.name == "cnn":
        family = "cnn"
    elif spec.name.startswith("resnet"):
        if activation == "sigmoid":
            family = "resnet-sigmoid"
        else:
            family = "resnet-train" if train_mode else "resnet-eval"
    else:
        family = "fallback"
    options = dict(TUNED.get(family, FALLBACK))
    if raw and options["coordinates"] == "normalized":
        return "raw", dict(RAW)
    return family, options
