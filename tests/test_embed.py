"""The artifact cache: hit, miss after a parameter change, interrupted write."""
import numpy as np
import pytest

from backfill_utils import embed as E
from backfill_utils import train as T
from conftest import tiny_profile


def test_cache_hit_and_miss(tmp_cache):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5)}

    key = {"model": "x", "seed": 0}
    assert E.cached_arrays("unit", key, compute)["a"].tolist() == [0, 1, 2, 3, 4]
    assert E.cached_arrays("unit", dict(key), compute)["a"].tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 1, "second call must be a cache hit"
    E.cached_arrays("unit", dict(key, seed=1), compute)
    assert len(calls) == 2, "a changed parameter must be a cache miss"


def test_interrupted_write_leaves_nothing(tmp_cache, monkeypatch):
    def broken_savez(path, **arrays):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(E.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        E.cached_arrays("unit", {"k": 1}, lambda: {"a": np.zeros(3)})
    assert not [p for p in tmp_cache.rglob("*") if p.is_file()], "half-written file left"
    monkeypatch.undo()
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_cache))
    out = E.cached_arrays("unit", {"k": 1}, lambda: {"a": np.ones(3)})
    assert out["a"].tolist() == [1, 1, 1]


def test_embeddings_are_cached_and_invalidated(tmp_cache, monkeypatch):
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16})
    test = E.get_embeddings(cfg, "extended", "new", "test", progress=False)
    assert test["emb"].shape == (16, 8) and test["emb"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(test["emb"], axis=1), 1, atol=1e-5)
    assert sorted(set(test["labels"].tolist())) == [0, 1, 2, 3]
    train = E.get_embeddings(cfg, "extended", "old", "train", passes=2, progress=False)
    assert train["emb"].shape == (2, 48, 8)
    assert not np.allclose(train["emb"][0], train["emb"][1]), "pass 1 is augmented"

    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("recomputed on a hit"))
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


def test_object_arrays_are_refused_before_writing(tmp_cache):
    with pytest.raises(TypeError, match="dtype object"):
        E.cached_arrays("unit", {"k": 2}, lambda: {"a": np.array(["x", None], dtype=object)})
    assert not [p for p in tmp_cache.rglob("*") if p.is_file()]
