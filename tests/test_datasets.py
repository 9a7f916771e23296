"""Data sources: the built-in Shapes set, and CIFAR read from fakes in the real on-disk format."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision

from fedclip.data import CIFAR10, CIFAR100, DataError, IndexedSubset, Shapes
from fedclip.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Shapes


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def test_shapes_deterministic():
    a = Shapes(seed=0).dataset("train", None)
    b = Shapes(seed=0).dataset("train", None)
    other = Shapes(seed=1).dataset("train", None)
    for i in (0, 5, 99):
        img, label = a[i]
        assert np.array_equal(pixels(img), pixels(a[i][0])), "same item twice, same pixels"
        assert np.array_equal(pixels(img), pixels(b[i][0])), "same args, same pixels"
        assert not np.array_equal(pixels(img), pixels(other[i][0])), "other seed, other image"
        assert label == b[i][1] == other[i][1]


def test_shapes_layout():
    src = Shapes(num_classes=7, train_per_class=5, test_per_class=3, image_size=40)
    assert src.num_classes == 7
    for split, per_class in (("train", 5), ("test", 3)):
        labels = src.labels(split)
        assert labels.dtype == np.int64 and labels.shape == (7 * per_class,)
        assert np.array_equal(np.bincount(labels), [per_class] * 7)
        ds = src.dataset(split, None)
        assert len(ds) == len(labels)
        for i in range(len(ds)):
            img, label = ds[i]
            assert label == labels[i]
            assert img.mode == "RGB" and img.size == (40, 40)
    with pytest.raises(IndexError):
        src.dataset("test", None)[21]
    with pytest.raises(ValueError, match="split"):
        src.labels("val")
    src.check()


def test_shapes_train_differs_from_test():
    src = Shapes(num_classes=3, train_per_class=4, test_per_class=4)
    train, test = src.dataset("train", None), src.dataset("test", None)
    for i in range(12):
        assert not np.array_equal(pixels(train[i][0]), pixels(test[i][0]))
    assert src.key("train") != src.key("test")
    assert src.key("train") != Shapes(num_classes=3, train_per_class=4, seed=1).key("train")
    assert src.key("train") == Shapes(num_classes=3, train_per_class=4).key("train")


def test_shapes_transform():
    ds = Shapes(num_classes=2, image_size=16).dataset("train", lambda im: pixels(im).shape)
    assert ds[0] == ((16, 16, 3), 0)


def test_shapes_classnames():
    names = Shapes(num_classes=56).classnames
    assert len(set(names)) == 56
    assert names[:4] == ["red circle", "green square", "blue triangle", "yellow star"]
    first = [n.split() for n in names[:10]]
    assert len({c for c, _ in first}) >= 6 and len({s for _, s in first}) >= 5
    assert all(len(n.split()) == 2 and "_" not in n for n in names)


def test_shapes_classes_look_different():
    # The shape's colour dominates the non-background pixels: a cheap check that class c is drawn
    # in the colour its name says.
    src = Shapes(num_classes=8, train_per_class=1, image_size=64)
    ds = src.dataset("train", None)
    expected = {"red": 0, "green": 1, "blue": 2}
    for i, name in enumerate(src.classnames):
        colour = name.split()[0]
        if colour not in expected:
            continue
        img = pixels(ds[i][0]).astype(int)
        spread = img.max(axis=2) - img.min(axis=2)
        shape_pixels = img[spread > 80]  # the grey background has little spread
        assert len(shape_pixels) > 20
        assert np.argmax(shape_pixels.mean(axis=0)) == expected[colour]


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 57}, "num_classes"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"test_per_class": 0}, "test_per_class"),
        ({"image_size": 0}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"num_classes": "3"}, "num_classes"),
        ({"image_size": 31.5}, "image_size"),
        ({"style": "night"}, "style"),
        ({"style": None}, "style"),
    ],
)
def test_shapes_bad_args(kwargs, arg):
    with pytest.raises(ConfigError, match=arg):
        Shapes(**kwargs)


def test_shapes_tungsten_style_is_plain_under_a_warm_cast():
    plain = Shapes(num_classes=4, train_per_class=2).dataset("train", None)
    warm_src = Shapes(num_classes=4, train_per_class=2, style="tungsten")
    warm = warm_src.dataset("train", None)
    for i in range(8):
        p, w = pixels(plain[i][0]).astype(float), pixels(warm[i][0]).astype(float)
        assert plain[i][1] == warm[i][1]
        np.testing.assert_allclose(w, 0.7 * p + 0.3 * np.array([255, 150, 40]), atol=0.51)
    assert warm_src.key("train") != Shapes(num_classes=4, train_per_class=2).key("train")
    assert "tungsten" in warm_src.key("test")
    assert Shapes(style="plain").key("train") == "shapes-c10-n32-px64-seed0/train"


def test_indexed_subset():
    base = Shapes(num_classes=3, train_per_class=4).dataset("train", None)
    sub = IndexedSubset(base, np.array([7, 2, 11]))
    assert len(sub) == 3
    img, label, index = sub[1]
    assert index == 2 and isinstance(index, int)
    assert label == base[2][1]
    assert np.array_equal(pixels(img), pixels(base[2][0]))
    assert [sub[j][2] for j in range(3)] == [7, 2, 11]


# ---------------------------------------------------------------------------------------------
# CIFAR: tiny trees in the real python-pickle format


def rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # (N, 3 * 32 * 32), planar RGB


def dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
CIFAR100_FINE = ["apple", "aquarium_fish", "maple_tree", "sweet_pepper", "whale"]
CIFAR100_COARSE = ["fruit_and_vegetables", "fish", "trees", "aquatic_mammals"]
FINE_TO_COARSE = [0, 1, 2, 0, 3]


def write_cifar10(root: Path) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for name, split, n in [(f"data_batch_{b}", "train", 3) for b in range(1, 6)] + [
        ("test_batch", "test", 4)
    ]:
        data, labels = rows(rng, n), rng.integers(0, 10, n).tolist()
        dump(
            folder / name,
            {
                "batch_label": name,
                "labels": labels,
                "data": data,
                "filenames": [f"{name}_{i}.png" for i in range(n)],
            },
        )
        out[split][0].append(data)
        out[split][1].extend(labels)
    dump(
        folder / "batches.meta",
        {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 3, "num_vis": 3072},
    )
    return {split: (np.concatenate(d), lab) for split, (d, lab) in out.items()}


def write_cifar100(root: Path) -> dict[str, tuple[np.ndarray, list[int], list[int]]]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", 12), ("test", 6)):
        data, fine = rows(rng, n), rng.integers(0, 5, n).tolist()
        coarse = [FINE_TO_COARSE[f] for f in fine]
        dump(
            folder / split,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "batch_label": split,
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": data,
            },
        )
        out[split] = (data, fine, coarse)
    dump(
        folder / "meta", {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE}
    )
    return out


def check_image(image, row: np.ndarray) -> None:
    assert image.mode == "RGB" and image.size == (32, 32)
    planes = row.reshape(3, 32, 32)  # (C, H, W)
    np.testing.assert_array_equal(np.asarray(image), planes.transpose(1, 2, 0))


def test_cifar10(tmp_path, skip_md5):
    truth = write_cifar10(tmp_path)
    src = CIFAR10(root=str(tmp_path))
    src.check()
    assert src.classnames == CIFAR10_NAMES and src.num_classes == 10
    for split in ("train", "test"):
        data, labels = truth[split]
        got = src.labels(split)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, labels)
        ds = src.dataset(split, None)
        assert len(ds) == len(labels)
        for i in (0, len(labels) - 1):
            image, label = ds[i]
            assert label == labels[i] and isinstance(label, int)
            check_image(image, data[i])
    assert src.key("train") == "cifar10/train" != src.key("test")


def test_cifar100(tmp_path, skip_md5):
    truth = write_cifar100(tmp_path)
    src = CIFAR100(root=str(tmp_path))
    assert src.classnames == ["apple", "aquarium fish", "maple tree", "sweet pepper", "whale"]
    assert src.coarse_classnames == ["fruit and vegetables", "fish", "trees", "aquatic mammals"]
    for split in ("train", "test"):
        data, fine, coarse = truth[split]
        np.testing.assert_array_equal(src.labels(split), fine)
        np.testing.assert_array_equal(src.coarse_labels(split), coarse)
        assert src.coarse_labels(split).dtype == np.int64
        ds = src.dataset(split, lambda im: np.asarray(im))
        for i in range(len(fine)):
            image, label = ds[i]
            assert label == fine[i]
            np.testing.assert_array_equal(image, data[i].reshape(3, 32, 32).transpose(1, 2, 0))
    present = set(truth["train"][1]) | set(truth["test"][1])
    assert src.class_groups == [FINE_TO_COARSE[c] if c in present else -1 for c in range(5)]
    sub = IndexedSubset(src.dataset("test", None), [4, 1])
    assert [sub[j][1:] for j in range(2)] == [(truth["test"][1][4], 4), (truth["test"][1][1], 1)]


def test_cifar100_without_coarse_labels_is_one_line(tmp_path, skip_md5):
    write_cifar100(tmp_path)
    folder = tmp_path / "cifar-100-python"
    with open(folder / "train", "rb") as f:
        batch = pickle.load(f)
    del batch["coarse_labels"]
    dump(folder / "train", batch)
    dump(folder / "meta", {"fine_label_names": CIFAR100_FINE})
    src = CIFAR100(root=str(tmp_path))
    with pytest.raises(DataError, match="no coarse_labels") as info:
        src.coarse_labels("train")
    assert "\n" not in str(info.value) and str(folder / "train") in str(info.value)
    with pytest.raises(DataError, match="no coarse_label_names"):
        _ = src.coarse_classnames


@pytest.mark.parametrize(
    "cls,folder", [(CIFAR10, "cifar-10-batches-py"), (CIFAR100, "cifar-100-python")]
)
def test_cifar_missing(cls, folder, tmp_path):
    root = tmp_path / "nowhere"
    src = cls(root=str(root))  # constructing reads nothing
    with pytest.raises(DataError) as info:
        src.check()
    message = str(info.value)
    assert "\n" not in message
    assert os.path.abspath(root) in message and folder in message
    assert "download=true" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert info.value.__suppress_context__, "no chained torchvision traceback"
    assert isinstance(info.value, ValueError)
    with pytest.raises(DataError):
        src.labels("test")
    with pytest.raises(DataError):
        _ = src.classnames


def test_cifar_download_without_network(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    src = CIFAR100(root=str(tmp_path), download=True)
    with pytest.raises(DataError) as info:
        src.labels("train")
    message = str(info.value)
    assert "\n" not in message
    assert "CIFAR-100" in message and str(tmp_path) in message and "URLError" in message
    assert "internet" in message
