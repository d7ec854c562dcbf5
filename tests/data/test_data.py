"""Tests of backfill_utils.data.api: the synthetic set, the dataset registry, transforms, class splits."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from backfill_utils.data import api as D, synthetic, synthetic_objects, transforms
from backfill_utils.data.api import (
    DatasetError,
    class_splits,
    dataset_info,
    describe_splits,
    get_dataset,
    make_synthetic,
    sample_grid,
    subset_by_classes,
    tile_grid,
    train_transform,
)
from backfill_utils.data.api import test_transform as eval_transform  # 'test_*' would be collected

SMALL = dict(num_classes=10, per_class=6, seed=3)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_balance():
    x, y = make_synthetic("train", **SMALL)
    assert x.shape == (60, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (60,) and y.dtype == np.int64
    assert np.array_equal(np.bincount(y), np.full(10, 6))
    assert not x.flags.writeable and not y.flags.writeable  # the memoised arrays are protected
    xt, yt = make_synthetic("test", num_classes=10, seed=3)
    assert xt.shape == (500, 32, 32, 3) and np.array_equal(np.bincount(yt), np.full(10, 50))
    x16, _ = make_synthetic("train", num_classes=4, per_class=2, image_size=16)
    assert x16.shape == (8, 16, 16, 3)


def test_synthetic_default_sizes():
    d = D.synthetic_defaults()
    assert d["num_classes"] == 100 and d["image_size"] == 32 and d["per_class"] is None
    assert synthetic._DEFAULT_PER_CLASS == {"train": 100, "test": 50}


def test_synthetic_deterministic_and_seeded():
    knobs = {**D.synthetic_defaults()}
    for key in ("seed", "num_classes", "per_class", "image_size"):
        knobs.pop(key)
    # bypass the memo: two fresh generations must agree byte for byte
    a = synthetic._generate("train", 5, 8, 4, 32, knobs)
    b = synthetic._generate("train", 5, 8, 4, 32, knobs)
    assert a[0].tobytes() == b[0].tobytes() and np.array_equal(a[1], b[1])
    c = synthetic._generate("train", 6, 8, 4, 32, knobs)
    assert a[0].tobytes() != c[0].tobytes()
    # the memo returns the very same arrays
    assert make_synthetic("train", **SMALL)[0] is make_synthetic("train", **SMALL)[0]
    assert make_synthetic("train", **SMALL)[0].tobytes() == make_synthetic(
        "train", **{**SMALL, "seed": SMALL["seed"]})[0].tobytes()


def test_synthetic_train_test_share_identities_but_differ():
    x, y = make_synthetic("train", **SMALL)
    xt, yt = make_synthetic("test", **SMALL)
    assert x.tobytes() != xt.tobytes()
    # no test image is a copy of a train image
    flat, flat_t = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    assert not (flat_t[:, None, :] == flat[None]).all(-1).any()
    # identities depend on (seed, class) only: a prefix of classes keeps its identities
    i10 = synthetic_objects.class_identities(3, 10, 12)
    i4 = synthetic_objects.class_identities(3, 4, 12)
    for key in ("shape", "tex", "freq", "orient", "col1", "col2"):
        assert np.array_equal(i10[key][:4], i4[key])
    assert np.array_equal(i10["palette"], i4["palette"])


def test_synthetic_knobs_change_images_and_are_validated():
    base = make_synthetic("train", **SMALL)[0]
    for knob in (dict(noise=0.0), dict(clutter=0), dict(rotation=0.0), dict(background=0.0)):
        assert make_synthetic("train", **SMALL, **knob)[0].tobytes() != base.tobytes(), knob
    with pytest.raises(ValueError, match="noise"):
        make_synthetic("train", **SMALL, noise=-0.1)
    with pytest.raises(ValueError, match="occlusion"):
        make_synthetic("train", **SMALL, occlusion=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic("train", num_classes=0)
    with pytest.raises(DatasetError, match="split"):
        make_synthetic("validation")
    with pytest.raises(DatasetError, match=r"unknown dataset_options key\(s\) \['no_such_knob'\]"):
        get_dataset("synthetic", "train", no_such_knob=1)


@pytest.mark.slow
def test_synthetic_classes_distinguishable_but_not_trivially():
    """Nearest class mean on raw pixels: far above chance (1%), far below 100%."""
    x, y = make_synthetic("train")
    xt, yt = make_synthetic("test")
    assert len(x) == 10_000 and len(xt) == 5_000
    f = x.reshape(len(x), -1).astype(np.float32) / 255
    ft = xt.reshape(len(xt), -1).astype(np.float32) / 255
    means = np.stack([f[y == c].mean(0) for c in range(100)])
    d = (ft ** 2).sum(1)[:, None] - 2 * ft @ means.T + (means ** 2).sum(1)[None]
    acc = float((d.argmin(1) == yt).mean())
    print(f"raw-pixel nearest-class-mean accuracy on the synthetic test split: {acc:.2%}")
    assert 0.025 < acc < 0.6


# ----------------------------------------------------------------------------- dataset registry


def test_get_dataset_synthetic_items_and_info():
    ds = get_dataset("synthetic", "train", **SMALL)
    assert isinstance(ds, D.SyntheticDataset) and len(ds) == 60
    assert ds.targets.dtype == np.int64 and len(ds.classes) == 10
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and isinstance(label, int)
    assert np.array_equal(img.permute(1, 2, 0).numpy(), ds.data[0])
    info = dataset_info("synthetic", **SMALL)
    assert info["num_classes"] == 10 and info["image_size"] == 32
    assert len(info["mean"]) == 3 and all(0 < s < 1 for s in info["std"])
    assert np.allclose(info["mean"], ds.data.reshape(-1, 3).mean(0) / 255, atol=1e-3)
    assert len(get_dataset("synthetic", "val", **SMALL)) == 60  # val = test
    pickle.loads(pickle.dumps(get_dataset("synthetic", "train", transform=train_transform("synthetic"),
                                          **SMALL)))  # DataLoader workers can receive it


def test_dataset_info_known_sets():
    assert dataset_info("cifar100") == dict(num_classes=100, image_size=32, mean=(0.5071, 0.4865, 0.4409),
                                             std=(0.2673, 0.2564, 0.2762))
    assert dataset_info("tinyimagenet")["num_classes"] == 200
    assert dataset_info("Tiny-ImageNet")["num_classes"] == 200
    assert dataset_info("imagenet")["image_size"] == 224
    assert dataset_info("places365")["num_classes"] == 365
    assert dataset_info("cifar10")["num_classes"] == 10


def test_unknown_name_lists_known_names():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist100'.*synthetic.*cifar100"):
        get_dataset("mnist100", "train")
    with pytest.raises(DatasetError, match="known datasets"):
        dataset_info("nope")
    with pytest.raises(DatasetError, match="split"):
        get_dataset("synthetic", "holdout")


def test_cifar100_missing_without_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        get_dataset("cifar100", "train", root=tmp_path)
    msg = str(err.value)
    assert "download=True" in msg and str(tmp_path) in msg and "cifar-100-python" in msg
    with pytest.raises(DatasetError, match="download=True"):
        get_dataset("cifar10", "test", root=tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("svhn", "test", root=tmp_path / "absent")
    assert list(tmp_path.iterdir()) == []  # nothing written


def _png(path, colour, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _make_folder(root, split_dirs=("train", "val"), classes=("cat", "ant", "bee"), per_class=2):
    for split in split_dirs:
        for ci, c in enumerate(classes):
            for j in range(per_class):
                _png(root / split / c / f"{j}.png", (40 * ci, 10 * j, 200))
    return root


def test_imagefolder_loads(tmp_path):
    root = _make_folder(tmp_path / "folder")
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    ds = get_dataset("imagefolder", "train", root=root)
    assert ds.classes == ["ant", "bee", "cat"]  # sorted names -> labels 0, 1, 2
    assert ds.targets.dtype == np.int64 and ds.targets.tolist() == [0, 0, 1, 1, 2, 2]
    img, label = ds[4]
    assert isinstance(img, Image.Image) and img.size == (6, 5) and label == 2
    assert np.asarray(img)[0, 0].tolist() == [0, 0, 200]  # 'cat' was colour index 0
    test = get_dataset("imagefolder", "test", root=root, transform=eval_transform("imagefolder", 8))
    x, label = test[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 0
    assert dataset_info("imagefolder", root=root)["num_classes"] == 3
    # test/ instead of val/
    root2 = _make_folder(tmp_path / "folder2", split_dirs=("train", "test"))
    assert len(get_dataset("imagefolder", "val", root=root2)) == 6
    # imagenet in ImageFolder layout
    assert len(get_dataset("imagenet", "test", root=root)) == 6


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="needs root"):
        get_dataset("imagefolder", "train")
    missing = tmp_path / "missing"
    with pytest.raises(DatasetError, match=str(missing)):
        get_dataset("imagefolder", "train", root=missing)
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(DatasetError, match="train.*does not exist"):
        get_dataset("imagefolder", "train", root=empty_root)
    (empty_root / "train").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        get_dataset("imagefolder", "train", root=empty_root)
    (empty_root / "train" / "a").mkdir()
    (empty_root / "train" / "a" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images.*\['a'\]"):
        get_dataset("imagefolder", "train", root=empty_root)
    only_train = _make_folder(tmp_path / "only_train", split_dirs=("train",))
    with pytest.raises(DatasetError, match="no val/ or test/"):
        get_dataset("imagefolder", "test", root=only_train)
    _png(only_train / "val" / "zebra" / "0.png", (0, 0, 0))
    with pytest.raises(DatasetError, match="zebra"):
        get_dataset("imagefolder", "test", root=only_train)
    with pytest.raises(DatasetError, match="ILSVRC2012"):
        get_dataset("imagenet", "train", root=empty_root.parent / "no_imagenet")
    (tmp_path / "no_places").mkdir()
    with pytest.raises(DatasetError, match="places365: .*neither train/ and val/ nor categories_places365"):
        get_dataset("places365", "train", root=tmp_path / "no_places")


def test_tinyimagenet_layouts(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    for w in wnids:
        for j in range(2):
            _png(root / "train" / w / "images" / f"{w}_{j}.JPEG", (5, 5, 5), size=(8, 8))
    lines = []
    for k, w in enumerate(["n01", "n02", "n01"]):
        _png(root / "val" / "images" / f"val_{k}.JPEG", (9, 9, 9), size=(8, 8))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = get_dataset("tinyimagenet", "train", root=root)
    assert train.classes == ["n01", "n02"] and train.targets.tolist() == [0, 0, 1, 1]
    val = get_dataset("tinyimagenet", "test", root=root)
    assert val.targets.tolist() == [0, 1, 0] and len(val) == 3
    assert val[1][0].size == (8, 8)
    # an annotation pointing at a missing file
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DatasetError, match="do not exist.*val_2"):
        get_dataset("tinyimagenet", "test", root=root)
    # val/ already in ImageFolder layout
    (root / "val" / "val_annotations.txt").unlink()
    (root / "val" / "images" / "val_0.JPEG").unlink()
    (root / "val" / "images" / "val_1.JPEG").unlink()
    (root / "val" / "images").rmdir()
    _png(root / "val" / "n02" / "a.JPEG", (1, 1, 1), size=(8, 8))
    val = get_dataset("tinyimagenet", "val", root=root)
    assert val.targets.tolist() == [1]
    with pytest.raises(DatasetError, match="tiny-imagenet-200.zip"):
        get_dataset("tinyimagenet", "train", root=tmp_path / "nothing")


# ----------------------------------------------------------------------------- transforms


def test_transforms_normalise_tensors_and_pil():
    ds = get_dataset("synthetic", "train", transform=train_transform("synthetic", 32, **SMALL), **SMALL)
    batch = torch.stack([ds[i][0] for i in range(len(ds))])
    assert batch.shape == (60, 3, 32, 32) and batch.dtype == torch.float32
    # normalised with the dataset's own mean/std (the crop padding adds zeros)
    assert abs(batch.mean().item()) < 0.5 and 0.5 < batch.std().item() < 1.5
    test = get_dataset("synthetic", "test", transform=eval_transform("synthetic", **SMALL), **SMALL)
    tb = torch.stack([test[i][0] for i in range(len(test))])
    assert tb.shape == (60, 3, 32, 32)
    assert abs(tb.mean().item()) < 0.2 and 0.8 < tb.std().item() < 1.2
    assert torch.equal(test[0][0], test[0][0])  # test transform is deterministic
    up = eval_transform("synthetic", 64, **SMALL)(test.images[0])
    assert up.shape == (3, 64, 64)
    pil = Image.new("RGB", (300, 200), (10, 120, 250))
    for make in (train_transform, eval_transform):
        out = make("imagenet", 224)(pil)
        assert out.shape == (3, 224, 224) and out.dtype == torch.float32
        expected = (np.array([10, 120, 250]) / 255 - np.array(D.IMAGENET_MEAN)) / np.array(D.IMAGENET_STD)
        assert np.allclose(out.mean((1, 2)).numpy(), expected, atol=1e-4)
    assert train_transform("cifar100")(np.zeros((32, 32, 3), np.uint8)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="image_size"):
        train_transform("cifar100", 0)


# ----------------------------------------------------------------------------- class splits


def test_class_splits_extended():
    s = class_splits(100)
    assert s["setting"] == "extended"
    assert s["old_classes"].tolist() == list(range(50))
    assert s["new_classes"].tolist() == list(range(100))
    assert s["test_classes"].tolist() == list(range(100))
    assert s["old_classes"].dtype == np.int64
    assert class_splits(365)["old_classes"].size == 182  # floor(0.5 * 365)
    assert class_splits(10, old_fraction=0.3)["old_classes"].tolist() == [0, 1, 2]


def test_class_splits_open():
    s = class_splits(100, setting="open")
    old, new, test = (set(s[k].tolist()) for k in ("old_classes", "new_classes", "test_classes"))
    assert test == set(range(80, 100)) and new == set(range(80)) and old == set(range(40))
    assert not test & new and old <= new
    s = class_splits(200, setting="open", old_fraction=0.25, open_fraction=0.5)
    assert s["test_classes"].tolist() == list(range(100, 200)) and s["old_classes"].size == 25


@pytest.mark.parametrize("kwargs, match", [
    (dict(old_fraction=0), "old_fraction"),
    (dict(old_fraction=1), "old_fraction"),
    (dict(old_fraction=1.5), "old_fraction"),
    (dict(old_fraction=True), "old_fraction"),
    (dict(setting="open", open_fraction=0.0), "open_fraction"),
    (dict(setting="open", open_fraction=1.0), "open_fraction"),
    (dict(setting="homogeneous"), "extended"),
    (dict(old_fraction=0.01), "at least 1"),
])
def test_class_splits_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_splits(20, **kwargs)


def test_class_splits_num_classes_validation():
    for bad in (1, 0, 2.5, "100"):
        with pytest.raises(ValueError, match="num_classes"):
            class_splits(bad)
    with pytest.raises(ValueError, match="open"):
        class_splits(3, setting="open", open_fraction=0.2)  # 0 test classes


def test_subset_by_classes():
    ds = get_dataset("synthetic", "train", **SMALL)
    s = class_splits(10, setting="open")
    old = subset_by_classes(ds, s["old_classes"])
    assert set(old.targets.tolist()) == {0, 1, 2, 3} and len(old) == 24
    assert old.targets.dtype == np.int64
    img, label = old[5]
    j = old.indices[5]
    assert label == ds.targets[j] and torch.equal(img, ds[j][0])  # labels unchanged
    assert np.array_equal(old.raw_image(5), ds.data[j])
    with pytest.raises(ValueError, match="prefix"):
        subset_by_classes(ds, s["test_classes"])
    test = subset_by_classes(ds, s["test_classes"], require_prefix=False)
    assert set(test.targets.tolist()) == {8, 9}
    with pytest.raises(ValueError, match="prefix"):
        subset_by_classes(ds, [1, 0])
    with pytest.raises(ValueError, match="without any item"):
        subset_by_classes(ds, range(12))
    with pytest.raises(ValueError, match="duplicates"):
        subset_by_classes(ds, [0, 0])
    with pytest.raises(ValueError, match="non-empty"):
        subset_by_classes(ds, [])
    loader = torch.utils.data.DataLoader(old, batch_size=8)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2, 3}


def test_describe_splits():
    tr = get_dataset("synthetic", "train", **SMALL)
    te = get_dataset("synthetic", "test", **SMALL)
    df = describe_splits(class_splits(10, setting="open"), tr, te.targets)
    assert isinstance(df, pd.DataFrame) and list(df.index) == ["old", "new", "test"]
    assert df.loc["old", "classes"] == 4 and df.loc["new", "classes"] == 8 and df.loc["test", "classes"] == 2
    assert df.loc["new", "train_images"] == 48 and df.loc["test", "test_images"] == 12
    assert (df.loc["test", "first"], df.loc["test", "last"]) == (8, 9)
    print(df)


# ----------------------------------------------------------------------------- plotting helper


def test_sample_grid(tmp_path):
    ds = get_dataset("synthetic", "test", transform=eval_transform("synthetic", **SMALL), **SMALL)
    grid = sample_grid(ds, [3, 7], per_class=4, seed=1)
    assert grid.shape == (2, 4, 32, 32, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid, sample_grid(ds, [3, 7], per_class=4, seed=1))
    assert not np.array_equal(grid, sample_grid(ds, [3, 7], per_class=4, seed=2))
    raw = {ds.data[i].tobytes(): int(ds.targets[i]) for i in range(len(ds))}
    assert [raw[g.tobytes()] for g in grid[0]] == [3] * 4  # raw images, not normalised ones
    sub = subset_by_classes(ds, range(5))
    assert sample_grid(sub, [4], per_class=2, seed=0, size=16).shape == (1, 2, 16, 16, 3)
    assert tile_grid(grid, pad=2).shape == (2 * 34 - 2, 4 * 34 - 2, 3)
    with pytest.raises(ValueError, match="fewer than per_class"):
        sample_grid(ds, [0], per_class=7, seed=0)
    root = _make_folder(tmp_path / "f")
    assert sample_grid(get_dataset("imagefolder", "train", root=root), [0, 2], 2, 0).shape == (2, 2, 5, 6, 3)


def test_synthetic_batched_augmentation_path():
    """The synthetic fast path (TensorAugment + __getitems__) matches per-image semantics."""
    train_tf = train_transform("synthetic", **SMALL)
    assert isinstance(train_tf, D.TensorAugment) and train_tf.padding == 4
    test = get_dataset("synthetic", "test", transform=eval_transform("synthetic", **SMALL), **SMALL)
    info = dataset_info("synthetic", **SMALL)
    mean = torch.tensor(info["mean"]).view(3, 1, 1)
    std = torch.tensor(info["std"]).view(3, 1, 1)
    for (x, y), i in zip(test.__getitems__([3, 1, 4]), [3, 1, 4]):
        assert y == test.targets[i]
        assert torch.allclose(x, (test.images[i].float() / 255 - mean) / std, atol=1e-6)
        assert torch.allclose(x, test[i][0])
    train = get_dataset("synthetic", "train", transform=train_tf, **SMALL)
    sub = subset_by_classes(train, range(5))
    loader = torch.utils.data.DataLoader(sub, batch_size=16, shuffle=False)
    torch.manual_seed(0)
    xb, yb = next(iter(loader))
    torch.manual_seed(0)
    assert torch.equal(xb, next(iter(loader))[0])  # seeded by the global torch generator
    assert xb.shape == (16, 3, 32, 32) and yb.tolist() == sub.targets[:16].tolist()
    # every augmented image is a flip and/or a padded crop of its source image
    p = 4
    for k in range(4):
        src = torch.nn.functional.pad(train.images[sub.indices[k]], (p, p, p, p))
        u8 = ((xb[k] * std + mean) * 255).round().to(torch.uint8)
        found = any(torch.equal(u8, cand) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                    for cand in (src[:, dy:dy + 32, dx:dx + 32], src[:, dy:dy + 32, dx:dx + 32].flip(-1)))
        assert found, k
    with pytest.raises(ValueError, match="uint8"):
        train_tf.batch(torch.zeros(2, 3, 32, 32))
    # another size: resized first, still batched
    up = train_transform("synthetic", 48, **SMALL)
    assert isinstance(up, D.TensorAugment) and up.batch(train.images[:5]).shape == (5, 3, 48, 48)
    # explicit mean/std: nothing is generated (train.py passes them)
    transforms._synthetic_stats.cache_clear()
    eval_transform("synthetic", 32, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert transforms._synthetic_stats.cache_info().misses == 0


def test_misspelt_dataset_option_is_an_error_before_any_notebook_runs(tmp_path):
    from backfill_utils.tools import run as R
    from backfill_utils.data.api import check_dataset_options

    with pytest.raises(DatasetError, match=r"unknown dataset_options key\(s\) \['test_per_clas'\].*test_per_class"):
        R.prepare("smoke", {"overrides": "{dataset_options: {test_per_clas: 5}}"})
    with pytest.raises(DatasetError, match="cifar100: unexpected dataset_options"):
        check_dataset_options("cifar100", {"small": True})
    check_dataset_options("synthetic", {"num_classes": 3, "train_per_class": 4, "test_per_class": 2})
    check_dataset_options("places365", {"small": True})  # torchvision checks its own options
