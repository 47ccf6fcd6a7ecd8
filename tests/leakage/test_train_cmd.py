"""The ``leakage train`` sub-command: parse, train, evaluate, save, reload."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from fl_core import load_checkpoint, load_samples
from leakage.app.train_cmd import add_train_parser, run_train

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="leakage")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    return parser.parse_args(["train", *argv])


def test_defaults_and_required_out(capsys):
    args = _parse(["--out", "v.pt"])
    assert (args.model, args.dataset, args.epochs, args.seed) == ("lenet", "samples", 1, 0)
    assert args.activation is None and args.num_classes is None and args.limit is None
    with pytest.raises(SystemExit):
        _parse([])
    assert "--out" in capsys.readouterr().err


def test_train_lenet_on_samples_and_reload(tmp_path, capsys):
    out = tmp_path / "ckpt" / "lenet.pt"
    args = _parse(["--out", str(out), "--epochs", "2", "--batch-size", "6", "--quiet"])
    assert run_train(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert line.startswith("train accuracy") and "no test split" in line and str(out) in line

    raw = torch.load(out, weights_only=True)  # PyTorch's safe loader reads the file
    assert raw["spec"]["name"] == "lenet" and raw["spec"]["activation"] == "sigmoid"
    model, meta = load_checkpoint(out)
    assert meta["dataset"] == "samples" and meta["epochs"] == 2 and meta["seed"] == 0
    assert meta["accuracy_split"] == "train" and 0 <= meta["accuracy"] <= 1
    assert len(meta["train_losses"]) == 2 and meta["num_train"] == 18

    for key, value in raw["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    again, _ = load_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_same_seed_same_weights(tmp_path):
    common = ["--model", "mlp", "--shape", "1", "16", "16", "--limit", "8", "--quiet"]
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        run_train(_parse([*common, "--seed", seed, "--out", str(tmp_path / f"{name}.pt")]))
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True)["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "vgg11"], "unknown model"),
        (["--activation", "gelu"], "unknown activation"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--lr", "0"], "lr"),
        (["--epochs", "0"], "epochs"),
        (["--num-classes", "1"], "num-classes"),
        (["--device", "tpu9"], "device"),
    ],
)
def test_bad_input_is_a_value_error(tmp_path, argv, fragment):
    with pytest.raises(ValueError, match=fragment):
        run_train(_parse([*argv, "--out", str(tmp_path / "v.pt"), "--quiet"]))
    assert not (tmp_path / "v.pt").exists()


def test_folder_dataset_and_too_few_classes(tmp_path, capsys):
    data = load_samples(count=3)
    for i, name in enumerate(("ant", "bee", "cat")):
        (tmp_path / "data" / name).mkdir(parents=True)
        pixels = (data.images[i].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "data" / name / "0.png")
    argv = ["--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "v.pt"), "--quiet"]
    with pytest.raises(ValueError, match="below the 3 classes"):
        run_train(_parse([*argv, "--num-classes", "2"]))
    assert run_train(_parse(argv)) == 0
    assert "no test split" in capsys.readouterr().out
    model, meta = load_checkpoint(tmp_path / "v.pt")
    assert model.spec.num_classes == 3 and meta["num_train"] == 3


def test_out_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        run_train(_parse(["--out", str(tmp_path), "--quiet"]))


def test_a_wrong_checkpoint_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not a leakage-lab checkpoint") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_cifar10_from_shared_folders(shared_datasets, tmp_path, capsys):
    """The real data path: CIFAR-10 class folders, evaluated on the test split."""
    if not (shared_datasets / "cifar10" / "test").is_dir():
        pytest.skip("no cifar10 folders under ../shared/datasets")
    out = tmp_path / "c.pt"
    argv = ["--dataset", "cifar10", "--data-root", str(shared_datasets), "--limit", "64"]
    assert run_train(_parse([*argv, "--out", str(out), "--quiet"])) == 0
    assert capsys.readouterr().out.startswith("test accuracy")
    _, meta = load_checkpoint(out)
    assert meta["accuracy_split"] == "test" and meta["num_eval"] == 10_000
    assert meta["num_train"] == 64
