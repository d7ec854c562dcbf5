"""The validation split: one rule (splits.validation_mask) carving validation images out of the
training split, used by backbone training, train-split embeddings and the validation gallery."""
import numpy as np
import pytest

from backfill_utils import embed as E
from backfill_utils import train as TR
from backfill_utils.data import api as D
from backfill_utils.data.splits import training_part, validation_mask
from conftest import tiny_profile


def _labels(counts, seed=0):
    y = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(y)


def test_counts_per_class_follow_the_rule():
    y = _labels([10, 20, 7, 2, 1])
    m = validation_mask(y, 0.1, seed=3)
    # floor(0.1 n), at least 1 for classes of >= 2 items, never all of a class
    assert np.bincount(y[m], minlength=5).tolist() == [1, 2, 1, 1, 0]
    m3 = validation_mask(y, 0.3, seed=3)
    assert np.bincount(y[m3], minlength=5).tolist() == [3, 6, 2, 1, 0]


def test_selection_depends_on_seed_and_class_only():
    y = _labels([30, 30, 30, 30])
    m = validation_mask(y, 0.2, seed=1)
    assert np.array_equal(m, validation_mask(y, 0.2, seed=1))  # deterministic
    assert not np.array_equal(m, validation_mask(y, 0.2, seed=2))  # the seed matters
    # the old model's classes alone (a subset of the items): the same items are held out
    sub = y < 2
    assert np.array_equal(validation_mask(y[sub], 0.2, seed=1), m[sub])


def test_fraction_zero_and_bad_fractions():
    y = _labels([5, 5])
    assert not validation_mask(y, 0.0, seed=0).any()
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="val_fraction"):
            validation_mask(y, bad, seed=0)


def test_parts_partition_the_training_classes():
    ds = D.get_dataset("synthetic", "train", num_classes=4, per_class=12, image_size=8)
    fit = training_part(ds, [0, 1, 2], "fit", fraction=0.25, seed=0)
    val = training_part(ds, [0, 1, 2], "val", fraction=0.25, seed=0)
    everything = D.subset_by_classes(ds, [0, 1, 2]).indices
    assert set(fit.indices).isdisjoint(val.indices)
    assert sorted(np.concatenate([fit.indices, val.indices]).tolist()) == sorted(everything.tolist())
    assert np.bincount(val.targets).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="val_fraction"):
        training_part(ds, [0, 1], "val", fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="part"):
        training_part(ds, [0, 1], "holdout", fraction=0.1, seed=0)


def test_backbones_never_see_the_validation_images():
    cfg = tiny_profile(val_fraction=0.25)
    for role in ("old", "new"):
        spec = TR.model_spec(cfg, "extended", role)
        assert spec["holdout"] == {"fraction": 0.25, "seed": cfg["seed"]}
        train_ds = TR.build_train_dataset(spec)
        val_ds = E._split_dataset(cfg, "val", list(range(spec["num_classes"])), augment=False)
        assert set(train_ds.indices).isdisjoint(val_ds.indices)
        assert len(train_ds) + len(val_ds) == 12 * spec["num_classes"]
    # the split is in every model's spec: another fraction is another model
    assert TR.model_dir(TR.model_spec(cfg, "extended", "new")) != \
        TR.model_dir(TR.model_spec(tiny_profile(val_fraction=0.5), "extended", "new"))


@pytest.mark.slow
def test_validation_embeddings_are_the_held_out_images(tmp_cache):
    cfg = tiny_profile(val_fraction=0.25, train={"epochs": 1, "batch_size": 16})
    val = E.get_embeddings(cfg, "extended", "new", "val", progress=False)
    train = E.get_embeddings(cfg, "extended", "new", "train", passes=1, progress=False)
    assert val["emb"].ndim == 2 and np.bincount(val["labels"]).tolist() == [3, 3, 3, 3]
    assert len(train["labels"]) == 4 * 9
    with pytest.raises(ValueError, match="split"):
        E.get_embeddings(cfg, "extended", "new", "validation")


def test_old_backbone_and_old_train_keys():
    cfg = tiny_profile(old_backbone={"width": 2}, old_train={"epochs": 1})
    old, new = TR.model_spec(cfg, "extended", "old"), TR.model_spec(cfg, "extended", "new")
    assert old["model"]["width"] == 2 and old["recipe"]["epochs"] == 1
    assert new["model"]["width"] == cfg["backbone"]["width"] and new["recipe"] == cfg["train"]
    assert TR.model_spec(cfg, "extended", "bct")["bct"]["old"] == old
    with pytest.raises(ValueError, match="widht"):
        TR.model_spec(tiny_profile(old_backbone={"widht": 2}), "extended", "old")
