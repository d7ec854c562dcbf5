"""Embeddings: extracted once, cached, invalidated by a changed recipe (the cache itself: test_io.py)."""
import numpy as np
import pytest

from backfill_utils import embed as E
from backfill_utils import train as TR
from conftest import tiny_profile

pytestmark = pytest.mark.slow  # every test here trains or runs end to end


def test_embeddings_are_cached_and_invalidated(tmp_cache, monkeypatch):
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16})
    test = E.get_embeddings(cfg, "extended", "new", "test", progress=False)
    assert test["emb"].shape == (16, 8) and test["emb"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(test["emb"], axis=1), 1, atol=1e-5)
    assert sorted(set(test["labels"].tolist())) == [0, 1, 2, 3]
    train = E.get_embeddings(cfg, "extended", "old", "train", passes=2, progress=False)
    # 4 classes x 12 training images, one per class held out as validation (val_fraction 0.1)
    assert train["emb"].shape == (2, 44, 8)
    assert not np.allclose(train["emb"][0], train["emb"][1]), "pass 1 is augmented"

    monkeypatch.setattr(TR, "train", lambda *a, **k: pytest.fail("recomputed on a hit"))
    again = E.get_embeddings(cfg, "extended", "new", "test", progress=False)
    np.testing.assert_array_equal(again["emb"], test["emb"])
    monkeypatch.undo()
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_cache))
    cfg2 = tiny_profile(train={"epochs": 1, "batch_size": 16, "lr": 0.05})
    other = E.get_embeddings(cfg2, "extended", "new", "test", progress=False)
    assert not np.array_equal(other["emb"], test["emb"]), "changed recipe must retrain"


def test_bad_split_and_passes():
    cfg = tiny_profile()
    with pytest.raises(ValueError, match="split"):
        E.get_embeddings(cfg, "extended", "new", "validation")
    with pytest.raises(ValueError, match="passes"):
        E.get_embeddings(cfg, "extended", "new", "train", passes=0)
