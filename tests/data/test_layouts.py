"""Every on-disk layout, offline: tiny datasets written in each real format (tests/data/layout_files.py),
read back through get_dataset / dataset_info, checked against the writer's record and,
where torchvision has a class for the layout, against torchvision's own reader."""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from backfill_utils.data import api as D
from backfill_utils.data.api import DatasetError, EmptyClassFolderWarning, dataset_info, get_dataset
from layout_files import (make_image, save_image, write_cifar100, write_imagefolder, write_imagenet,
                     write_places365, write_tinyimagenet)

SPLITS = ("train", "test")


def _check(w, split, size=None, **kwargs):
    """get_dataset(w) agrees with the writer: count, classes, per-class counts, every label
    (from the image's colour), and both transforms give float tensors of the requested size."""
    ds = get_dataset(w.name, split, root=w.root, **kwargs)
    counts = w.train_counts if split == "train" else w.test_counts
    assert len(ds) == sum(counts)
    assert ds.classes == w.classes
    assert ds.targets.dtype == np.int64
    assert np.bincount(ds.targets, minlength=len(w.classes)).tolist() == counts
    labels = [w.label_of(ds.raw_image(i)) for i in range(len(ds))]
    assert labels == ds.targets.tolist()
    info = dataset_info(w.name, root=w.root)
    assert info["num_classes"] == len(w.classes)
    size = size or info["image_size"]
    for make in (D.train_transform, D.test_transform):
        ds.transform = make(w.name, size)
        x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
        assert x.shape == (len(ds), 3, size, size) and x.dtype == torch.float32
        assert y.tolist() == ds.targets.tolist()
    return ds


# ----------------------------------------------------------------------------- each layout


@pytest.mark.parametrize("split", SPLITS)
def test_cifar100_archive(tmp_path, split, monkeypatch):
    w = write_cifar100(tmp_path, classes=4, per_class=6, test_per_class=3)
    ds = _check(w, split)
    # torchvision's own reader, with its md5 check of the official files reduced to presence
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    ref = tvd.CIFAR100(str(tmp_path), train=split == "train")
    assert np.array_equal(ds.data, ref.data) and ds.targets.tolist() == list(ref.targets)
    assert ds.classes == ref.classes


def test_cifar100_official_reader_refuses_other_copies(tmp_path):
    """Why the project reads the pickles itself: torchvision accepts only the official files."""
    w = write_cifar100(tmp_path, classes=2, per_class=2)
    with pytest.raises(RuntimeError, match="corrupted"):
        tvd.CIFAR100(str(w.root), train=True)
    assert len(get_dataset("cifar100", "train", root=w.root)) == 4


@pytest.mark.parametrize("split", SPLITS)
def test_tinyimagenet(tmp_path, split):
    w = write_tinyimagenet(tmp_path, classes=4, per_class=5, test_per_class=3, size=16)
    ds = _check(w, split, size=16)
    assert ds.folders == sorted(ds.folders) and len(set(ds.folders)) == 4  # wnids, sorted
    assert not any(os.sep + os.path.join("tiny-imagenet-200", "test") in p for p, _ in ds.samples)  # unlabelled


@pytest.mark.parametrize("split", SPLITS)
def test_imagenet_torchvision_layout(tmp_path, split):
    w = write_imagenet(tmp_path, classes=4, per_class=4, test_per_class=2, size=24)
    ds = _check(w, split, size=32)
    ref = tvd.ImageNet(str(w.root), split="train" if split == "train" else "val")
    assert [p for p, _ in ds.samples] == [p for p, _ in ref.samples]
    assert ds.targets.tolist() == ref.targets and ds.classes == [c[0] for c in ref.classes]


@pytest.mark.parametrize("split", SPLITS)
def test_places365_torchvision_layout(tmp_path, split, monkeypatch):
    w = write_places365(tmp_path, classes=4, per_class=4, test_per_class=2, size=24)
    ds = _check(w, split, size=32)
    # torchvision's reader checks the md5 of the official text files: reduce it to presence
    monkeypatch.setattr(tvd.Places365, "_check_integrity", lambda self, file, md5, download: os.path.isfile(file))
    ref = tvd.Places365(str(w.root), split="train-standard" if split == "train" else "val", small=True)
    assert ds.samples == [(p, t) for p, t in ref.imgs] and ds.classes == ref.classes


@pytest.mark.parametrize("name, test_dir", [("imagefolder", "val"), ("imagefolder", "test"),
                                            ("imagenet", "val"), ("places365", "val")])
def test_imagefolder_layouts(tmp_path, name, test_dir):
    w = write_imagefolder(tmp_path, classes=3, per_class=4, test_per_class=2, size=20, name=name,
                          test_dir=test_dir, ext=".jpg")
    for split in SPLITS:
        ds = _check(w, split, size=32)
        ref = tvd.ImageFolder(str(w.root / ("train" if split == "train" else test_dir)))
        assert [p for p, _ in ds.samples] == [p for p, _ in ref.samples] and ds.classes == ref.classes


# ----------------------------------------------------------------------------- image edge cases


@pytest.mark.parametrize("writer", [write_imagefolder, write_tinyimagenet, write_imagenet, write_places365])
def test_images_of_different_sizes_are_resized(tmp_path, writer):
    w = writer(tmp_path, classes=2, per_class=4, test_per_class=2, size=24, vary_size=True)
    ds = get_dataset(w.name, "train", root=w.root)
    assert len({ds.raw_image(i).shape for i in range(len(ds))}) > 1  # the sizes really differ
    for size in (16, 32, 80):  # small-image pipeline (<= 64) and the ImageNet-style one
        for split in SPLITS:
            _check(w, split, size=size)


def test_grey_palette_cmyk_and_alpha_images_become_rgb(tmp_path):
    w = write_imagefolder(tmp_path, classes=2, per_class=1, test_per_class=1, size=8)
    folder = w.root / "train" / "class_00"
    grey = np.full((8, 8, 3), 90, np.uint8)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    cases = {  # file name -> (mode saved, RGB expected at every pixel)
        "l.png": ("L", grey, (90, 90, 90)),
        "la.png": ("LA", grey, (90, 90, 90)),
        "p.png": ("P", red, (200, 0, 0)),
        "rgba.png": ("RGBA", red, (200, 0, 0)),
        "l.jpg": ("L", grey, (90, 90, 90)),
    }
    for name, (mode, rgb, _) in cases.items():
        save_image(folder / name, rgb, mode)
    # a palette image with a transparent index, and CMYK JPEGs (cyan, white; the conversion
    # R = 255 - C when K = 0 holds for both of PIL's CMYK formulas)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(folder / "p_transparent.png", transparency=0)
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(folder / "cyan.jpg", quality=100)
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(folder / "white_cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 8), 100 * 257, np.uint16)).save(folder / "grey16.png")
    expected = {**{n: e for n, (_, _, e) in cases.items()}, "p_transparent.png": (10, 20, 30),
                "cyan.jpg": (0, 255, 255), "white_cmyk.jpg": (255, 255, 255), "grey16.png": (100, 100, 100)}
    assert Image.open(folder / "grey16.png").mode.startswith("I;16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning either
        ds = get_dataset("imagefolder", "train", root=w.root)
        for path, _ in ds.samples:
            name = os.path.basename(path)
            if name not in expected:
                continue
            img = ds[ds.samples.index((path, 0))][0]
            assert img.mode == "RGB"
            arr = np.asarray(img).astype(int)
            assert np.abs(arr - np.array(expected[name])).max() <= 2, name  # JPEG: +-2 levels
    ds.transform = D.test_transform("imagefolder", 16)
    x, _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))
    assert x.shape == (len(ds), 3, 16, 16)


def test_empty_train_class_folder_is_skipped_with_a_warning(tmp_path):
    w = write_imagefolder(tmp_path, classes=3, per_class=2, test_per_class=1, size=8)
    for f in (w.root / "train" / "class_01").iterdir():
        f.unlink()
    (w.root / "val" / "class_01" / "00000.png").unlink()  # consistent: no images on either side
    (w.root / "train" / "class_03" / "nested").mkdir(parents=True)  # only a sub-folder, no image
    for split in SPLITS:
        with pytest.warns(EmptyClassFolderWarning) as rec:
            ds = get_dataset("imagefolder", split, root=w.root)
        messages = " ".join(str(r.message) for r in rec)
        assert str(w.root / "train" / "class_01") in messages or str(w.root / "val" / "class_01") in messages
        assert ds.classes == ["class_00", "class_02"] and sorted(set(ds.targets.tolist())) == [0, 1]
        assert all(os.path.basename(os.path.dirname(p)) == ds.classes[t] for p, t in ds.samples)
    assert dataset_info("imagefolder", root=w.root)["num_classes"] == 2


def test_empty_test_class_folder_keeps_the_training_indices(tmp_path):
    w = write_imagefolder(tmp_path, classes=3, per_class=2, test_per_class=1, size=8)
    (w.root / "val" / "class_00" / "00000.png").unlink()
    with pytest.warns(EmptyClassFolderWarning, match="class_00"):
        test = get_dataset("imagefolder", "test", root=w.root)
    assert test.classes == w.classes and test.targets.tolist() == [1, 2]


def test_class_empty_in_train_but_not_in_test_is_an_error(tmp_path):
    w = write_imagefolder(tmp_path, classes=3, per_class=2, test_per_class=1, size=8)
    for f in (w.root / "train" / "class_01").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=r"training split lacks.*class_01"), \
            pytest.warns(EmptyClassFolderWarning, match="train/class_01"):
        get_dataset("imagefolder", "test", root=w.root)
    t = write_tinyimagenet(tmp_path / "t", classes=3, per_class=2, test_per_class=1, size=8)
    wnid = sorted(os.listdir(t.root / "train"))[1]
    for f in (t.root / "train" / wnid / "images").iterdir():
        f.unlink()
    with pytest.warns(EmptyClassFolderWarning, match=wnid):
        assert len(get_dataset("tinyimagenet", "train", root=t.root).classes) == 2
    with pytest.raises(DatasetError, match=f"val_annotations.txt names classes .*{wnid}"), \
            pytest.warns(EmptyClassFolderWarning):
        get_dataset("tinyimagenet", "test", root=t.root)


def test_unreadable_image_is_an_error_naming_the_file(tmp_path):
    w = write_imagefolder(tmp_path, classes=2, per_class=3, test_per_class=1, size=32, ext=".jpg")
    folder = w.root / "train" / "class_01"
    truncated = folder / "00000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (folder / "notes.jpg").write_text("not an image")
    ds = get_dataset("imagefolder", "train", root=w.root)  # files are listed, not decoded
    for bad in (truncated, folder / "notes.jpg"):
        i = [p for p, _ in ds.samples].index(str(bad))
        with pytest.raises(DatasetError, match=f"cannot read image {bad}.*truncated, corrupt or not an image") as err:
            ds[i]
        assert err.value.__cause__ is None and err.value.__suppress_context__  # no PIL traceback attached
        with pytest.raises(DatasetError, match=str(bad)):
            ds.raw_image(i)
    gone = folder / "00001.jpg"
    gone.unlink()
    with pytest.raises(DatasetError, match=f"image {gone} does not exist"):
        ds[[p for p, _ in ds.samples].index(str(gone))]
    ds.transform = D.train_transform("imagefolder", 16)
    with pytest.raises(DatasetError, match="cannot read image"):
        list(torch.utils.data.DataLoader(ds, batch_size=2))


def test_hidden_files_and_folders_are_ignored(tmp_path):
    w = write_imagefolder(tmp_path, classes=2, per_class=2, test_per_class=1, size=8)
    (w.root / "train" / "class_00" / "._00000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    save_image(w.root / "train" / ".thumbnails" / "a.png", np.zeros((4, 4, 3), np.uint8))
    ds = _check(w, "train", size=8)
    assert len(ds) == 4


# ----------------------------------------------------------------------------- missing / malformed


def test_missing_datasets_name_the_path_and_how_to_get_them(tmp_path):
    absent = tmp_path / "absent"
    cases = [("cifar100", ["cifar-100-python", "download=True", "cifar-100-python.tar.gz"]),
             ("tinyimagenet", ["tiny-imagenet-200.zip", "val_annotations.txt"]),
             ("imagenet", ["ILSVRC2012", "meta.bin"]),
             ("places365", ["categories_places365.txt", "download=True"]),
             ("imagefolder", ["train/<class>"])]
    for name, words in cases:
        with pytest.raises(DatasetError) as err:
            get_dataset(name, "train", root=absent)
        for word in [str(absent), *words]:
            assert word in str(err.value), (name, word, str(err.value))
    assert not absent.exists()  # nothing written


def test_incomplete_layouts_name_the_missing_file(tmp_path):
    w = write_cifar100(tmp_path / "c", classes=2, per_class=2)
    (w.root / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetError, match=r"cifar-100-python/meta not found.*download=True"):
        get_dataset("cifar100", "test", root=w.root)
    p = write_places365(tmp_path / "p", classes=2, per_class=2, size=8)
    (p.root / "places365_val.txt").unlink()
    with pytest.raises(DatasetError, match="places365_val.txt not found"):
        get_dataset("places365", "test", root=p.root)
    (p.root / "data_256_standard").rename(p.root / "elsewhere")
    with pytest.raises(DatasetError, match="data_256_standard"):
        get_dataset("places365", "train", root=p.root)
    (p.root / "elsewhere").rename(p.root / "data_256")  # the name of the extracted archive
    assert len(get_dataset("places365", "train", root=p.root)) == 4
    t = write_tinyimagenet(tmp_path / "t", classes=2, per_class=2, size=8)
    (t.root / "val" / "images" / "val_1.JPEG").unlink()
    with pytest.raises(DatasetError, match="do not exist.*val_1.JPEG"):
        get_dataset("tinyimagenet", "val", root=t.root)


def test_malformed_cifar_archive(tmp_path):
    w = write_cifar100(tmp_path, classes=3, per_class=2)
    train = w.root / "cifar-100-python" / "train"
    with open(train, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # keys b"data", ...; rewritten as Python 3 bytes
    bad = {**batch, b"data": batch[b"data"][:, :100]}
    train.write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DatasetError, match=f"{train} holds data uint8 \\(6, 100\\).*expected uint8 \\(N, 3072\\)"):
        get_dataset("cifar100", "train", root=w.root)
    train.write_bytes(pickle.dumps({**batch, b"fine_labels": [0, 1, 2, 3, 4, 5]}, protocol=2))
    with pytest.raises(DatasetError, match="labels outside 0..2"):
        get_dataset("cifar100", "train", root=w.root)
    train.write_text("not a pickle")
    with pytest.raises(DatasetError, match=f"{train} is not a CIFAR pickle"):
        get_dataset("cifar100", "train", root=w.root)


# ----------------------------------------------------------------------------- the writers


def _tree_hash(root) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.mark.parametrize("writer", [write_cifar100, write_tinyimagenet, write_imagenet, write_places365,
                                    write_imagefolder])
def test_writers_are_deterministic(tmp_path, writer):
    a = writer(tmp_path / "a", classes=2, per_class=2, seed=5)
    b = writer(tmp_path / "b", classes=2, per_class=2, seed=5)
    c = writer(tmp_path / "c", classes=2, per_class=2, seed=6)
    assert _tree_hash(a.root) == _tree_hash(b.root) != _tree_hash(c.root)
    assert a.classes == b.classes and a.label_of(make_image(a.colours[1], 8, np.random.default_rng(0))) == 1


def test_two_copies_of_a_dataset_never_share_trained_models(tmp_path):
    """The model spec (and so every cache key downstream) tells two folders of one dataset
    name apart, and a copy with other classes; the same folder gives the same spec."""
    from backfill_utils import config as C, train as TR

    a = write_cifar100(tmp_path / "a", classes=4, per_class=6)
    b = write_cifar100(tmp_path / "b", classes=4, per_class=6)
    c = write_cifar100(tmp_path / "c", classes=6, per_class=6)

    def spec(w):
        cfg = C.load_profile("smoke", dataset="cifar100", data_root=str(w.root), dataset_options={})
        return TR.model_spec(cfg, "extended", "new")

    assert spec(a) == spec(a)
    assert C.config_hash(spec(a)) != C.config_hash(spec(b))
    assert spec(c)["dataset"]["identity"]["num_classes"] == 6
    assert D.dataset_identity("synthetic") == {}
