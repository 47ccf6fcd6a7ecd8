"""Tests for fl_core.data: loaders, ImageData, partitions and the skew measure."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_core.data import (
    DATASETS,
    SAMPLE_NAMES,
    ImageData,
    load_dataset,
    load_image_files,
    load_image_folder,
    load_samples,
    load_torchvision,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
# Official CIFAR-10 label order (batches.meta of the CIFAR-10 python release).
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
# Luminance weight of green in ITU-R BT.709, as used by skimage.color.rgb2gray.
GREEN_LUMA = 0.7154


def shared_root() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared/datasets not present: {SHARED} (needs the project's offline copy)")
    return SHARED


def save_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def solid(rgb: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (*size, 3)).copy()


# ---------------------------------------------------------------- samples


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_samples_are_distinct_images_in_range(shape):
    ds = load_samples(shape=shape)
    assert len(ds) == len(SAMPLE_NAMES) >= 12
    assert ds.names == SAMPLE_NAMES and len(set(SAMPLE_NAMES)) == len(SAMPLE_NAMES)
    assert ds.images.shape == (len(SAMPLE_NAMES), *shape) and ds.shape == shape
    assert ds.images.dtype == torch.float32
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    flat = ds.images.flatten(1)
    gaps = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert gaps.min() > 0.1  # no two photographs alike
    assert (flat.std(dim=1) > 0.01).all()  # none blank


def test_samples_are_deterministic_and_safe_to_mutate():
    first = load_samples()
    expected = first.images.clone()
    first.images.zero_()
    second = load_samples()
    assert torch.equal(second.images, expected)
    assert torch.equal(second.labels, load_samples().labels)


def test_samples_labels_cycle_and_count():
    ds = load_samples(num_classes=5, count=12)
    assert ds.labels.tolist() == [i % 5 for i in range(12)]
    assert ds.num_classes == 5 and ds.names == SAMPLE_NAMES[:12]
    with pytest.raises(ValueError, match="count"):
        load_samples(count=len(SAMPLE_NAMES) + 1)
    with pytest.raises(ValueError, match="shape"):
        load_samples(shape=(2, 32, 32))


def test_samples_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ds = load_samples(shape=(3, 17, 19))  # a shape no other test caches
    assert ds.images.shape == (len(SAMPLE_NAMES), 3, 17, 19)


# ---------------------------------------------------------------- image files and folders


def test_image_files_crop_resize_and_channels(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)  # red | green | blue bands, 10/20/10 wide
    wide[:, :10, 0] = wide[:, 10:30, 1] = wide[:, 30:, 2] = 255
    path = save_png(tmp_path / "bands.png", wide)
    rgb = load_image_files([path], shape=(3, 8, 8))
    # The center square is the green band only.
    assert torch.allclose(rgb.images[0, 1], torch.ones(8, 8), atol=1e-5)
    assert torch.allclose(rgb.images[0, [0, 2]], torch.zeros(2, 8, 8), atol=1e-5)
    gray = load_image_files([path], shape=(1, 8, 8))
    assert torch.allclose(gray.images, torch.full((1, 1, 8, 8), GREEN_LUMA), atol=1e-3)
    save_png(tmp_path / "g.png", np.full((9, 9), 128))
    replicated = load_image_files([tmp_path / "g.png"]).images[0]
    assert torch.equal(replicated[0], replicated[2])
    assert abs(replicated.mean().item() - 128 / 255) < 1e-3


def test_image_files_labels(tmp_path):
    paths = [save_png(tmp_path / f"{i}.png", solid((40 * i, 0, 0))) for i in range(3)]
    default = load_image_files(paths, num_classes=2)
    assert default.labels.tolist() == [0, 1, 0]
    assert default.names == ("0.png", "1.png", "2.png")
    given = load_image_files(paths, labels=[2, 0, 1], num_classes=3, shape=(3, 4, 4))
    assert given.labels.tolist() == [2, 0, 1] and given.images.shape == (3, 3, 4, 4)
    red = given.images[:, 0, 0, 0]
    assert torch.allclose(red, torch.tensor([0.0, 40.0, 80.0]) / 255, atol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        load_image_files(paths, labels=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        load_image_files(paths, labels=[0, 1, 3], num_classes=3)


def test_image_files_missing_and_corrupt(tmp_path):
    good = save_png(tmp_path / "ok.png", solid((1, 2, 3)))
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="image file not found") as err:
        load_image_files([good, missing])
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(b"this is not an image \x00\x01\x02")
    with pytest.raises(ValueError, match="cannot read image file") as err:
        load_image_files([corrupt])
    assert str(corrupt) in str(err.value) and "\n" not in str(err.value)


def make_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    colours = {"b_dog": (0, 255, 0), "a_cat": (255, 0, 0), "c_emu": (0, 0, 255)}
    counts = {"b_dog": 3, "a_cat": 2, "c_emu": 1}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for j in range(counts[name]):
            save_png(root / name / f"{j}.png", solid(rgb))
    (root / "a_cat" / "notes.txt").write_text("not an image")
    return colours


def test_image_folder_labels_follow_sorted_folders(tmp_path):
    colours = make_folder(tmp_path)
    ds = load_image_folder(tmp_path)
    assert ds.num_classes == 3 and len(ds) == 6 and ds.shape == (3, 12, 12)
    classes = sorted(colours)
    for (image, label), name in zip(ds, ds.names, strict=True):
        folder = name.split("/")[0]
        assert label.item() == classes.index(folder)
        expected = torch.tensor(colours[folder], dtype=torch.float32) / 255
        assert torch.allclose(image[:, 5, 5], expected)
    small = load_image_folder(tmp_path, shape=(1, 4, 4), limit=4, seed=3)
    assert small.images.shape == (4, 1, 4, 4)
    assert list(small.names) == [n for n in ds.names if n in small.names]  # file order kept
    assert small.names == load_image_folder(tmp_path, limit=4, seed=3).names


def test_image_folder_errors(tmp_path):
    make_folder(tmp_path)
    save_png(tmp_path / "a_cat" / "big.png", solid((9, 9, 9), size=(20, 20)))
    with pytest.raises(ValueError, match="shape"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, shape=(3, 8, 8)).images.shape == (7, 3, 8, 8)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="class sub-folders"):
        load_image_folder(tmp_path / "a_cat")


# ---------------------------------------------------------------- load_dataset


def test_load_dataset_names_and_dispatch(tmp_path):
    assert {"samples", "cifar10", "cifar100", "mnist", "fashion-mnist"} <= set(DATASETS)
    with pytest.raises(ValueError, match="unknown dataset 'foo'") as err:
        load_dataset("foo")
    assert all(name in str(err.value) for name in DATASETS)
    ds = load_dataset("samples", num_classes=4, limit=6, shape=(1, 28, 28))
    assert ds.images.shape == (6, 1, 28, 28) and ds.labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert load_dataset("samples").shape == (3, 32, 32)
    make_folder(tmp_path)
    assert load_dataset(str(tmp_path)).num_classes == 3


def test_torchvision_missing_data_says_how_to_fix(tmp_path):
    with pytest.raises(ValueError, match="not found under .*download=True"):
        load_torchvision("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="not found"):
        load_dataset("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="valid names"):
        load_torchvision("svhn", root=tmp_path)


def test_fashion_mnist_from_shared_copy():
    root = shared_root()
    ds = load_torchvision("fashion-mnist", root=root, limit=200)
    assert ds.images.shape == (200, 1, 28, 28) and ds.num_classes == 10
    assert ds.labels.min() >= 0 and ds.labels.max() < 10 and len(ds.labels.unique()) > 5
    assert ds.images.min() >= 0 and ds.images.max() <= 1 and ds.images.max() > 0.9
    assert len(set(ds.names)) == 200
    assert ds.names == load_dataset("fashion-mnist", root=root, limit=200).names
    assert ds.names != load_torchvision("fashion-mnist", root=root, limit=200, seed=1).names


def test_mnist_resized_to_rgb_from_shared_copy():
    ds = load_torchvision("mnist", root=shared_root(), limit=64, shape=(3, 32, 32))
    assert ds.images.shape == (64, 3, 32, 32)
    assert torch.equal(ds.images[:, 0], ds.images[:, 1])
    assert ds.labels.min() >= 0 and ds.labels.max() < 10


def test_cifar10_folder_fallback_from_shared_copy():
    ds = load_torchvision("cifar10", root=shared_root(), limit=50)
    assert ds.images.shape == (50, 3, 32, 32) and ds.num_classes == 10
    for name, label in zip(ds.names, ds.labels.tolist(), strict=True):
        assert CIFAR10_CLASSES[label] == name.split("/")[-2]


# ---------------------------------------------------------------- ImageData


def test_image_data_validation_and_subset():
    x = torch.rand(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 1])
    ds = ImageData(x, y, 3, ["a", "b", "c", "d"])
    assert ds.names == ("a", "b", "c", "d")
    sub = ds.subset(np.array([3, 1]))
    assert sub.names == ("d", "b") and torch.equal(sub.images, x[[3, 1]])
    assert sub.labels.tolist() == [1, 1] and len(sub) == 2
    image, label = ds[2]
    assert image.shape == (3, 2, 2) and label.shape == () and label.item() == 2
    with pytest.raises(ValueError, match="labels must lie"):
        ImageData(x, y, 2, list("abcd"))
    with pytest.raises(ValueError, match="names"):
        ImageData(x, y, 3, ["a"])
    with pytest.raises(ValueError, match="int64"):
        ImageData(x, y.int(), 3, list("abcd"))
    with pytest.raises(ValueError, match="float"):
        ImageData(x[0], y, 3, list("abcd"))
    with pytest.raises(ValueError, match="indices"):
        ds.subset([0, 4])


def test_dataset_normalization_published_converted_and_computed():
    """CIFAR-10's statistics as breaching's CIFAR10.yaml gives them; photographs take
    ImageNet's (torchvision); gray targets take the BT.709 mean; folders their own."""
    from fl_core.data import NORMALIZATION, dataset_normalization, image_statistics

    rgb = load_samples(count=2)
    gray = load_samples(count=2, shape=(1, 32, 32))
    assert dataset_normalization("cifar10", rgb)[0][0] == pytest.approx(0.4914672374725342)
    assert dataset_normalization("samples", rgb) == NORMALIZATION["imagenet"]
    assert dataset_normalization(None, rgb) == NORMALIZATION["imagenet"]
    mean, std = dataset_normalization("samples", gray)
    assert mean[0] == pytest.approx(0.2125 * 0.485 + 0.7154 * 0.456 + 0.0721 * 0.406)
    assert dataset_normalization("mnist", rgb) == ((0.1307,) * 3, (0.3081,) * 3)
    x = torch.zeros(2, 3, 2, 2)
    x[:, 0] = 1.0
    x[0, 1] = 1.0
    m, s = image_statistics(x)
    assert m == pytest.approx((1.0, 0.5, 0.0)) and s[1] == pytest.approx(0.5)
    assert dataset_normalization(
        "some/folder", ImageData(x, torch.zeros(2, dtype=torch.int64), 1, ("a", "b"))
    )[0] == pytest.approx((1.0, 0.5, 0.0))
