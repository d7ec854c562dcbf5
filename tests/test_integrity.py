"""Corrupted cache entries: a flipped bit or a truncated file is detected by the entry's
checksum, named with its path, and rebuilt (compute) or named with the notebook to rerun
(render); long target names; short errors of a missing input."""
import numpy as np
import pytest
import torch

from backfill_utils import cache, io
from backfill_utils import train as TR
from conftest import tiny_profile


def _flip_bit(path, frac=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * frac)] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage", [_flip_bit, _truncate])
@pytest.mark.parametrize("kind", ["embeddings", "compat", "curves", "experiments"])
def test_a_damaged_npz_entry_is_named_and_rebuilt(tmp_cache, kind, damage):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(2000, dtype=np.float32), "b": np.ones((3, 4))}

    key = {"x": 1}
    first = cache.cached_arrays(kind, key, compute)
    path = cache.cache_path(kind, key)
    assert io.checksum_path(path).is_file()
    damage(path)
    with pytest.warns(cache.CorruptArtifactWarning, match=str(path.name)):
        again = cache.cached_arrays(kind, key, compute)
    assert len(calls) == 2, "the damaged entry must be rebuilt"
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert cache.verify_entry(kind, "x", path) == "ok"


def test_a_damaged_npz_entry_in_render_mode_names_the_notebook(tmp_cache):
    key = {"x": 2}
    cache.cached_arrays("curves", key, lambda: {"a": np.arange(1000)})
    _flip_bit(cache.cache_path("curves", key))
    with cache.mode("render"), pytest.raises(cache.CorruptArtifactError, match=r"31_backfill.*rebuild"):
        cache.cached_arrays("curves", key, lambda: pytest.fail("render mode computed"))


def test_an_entry_without_checksum_is_checked_by_reading_and_then_recorded(tmp_cache):
    key = {"x": 3}
    cache.cached_arrays("embeddings", key, lambda: {"a": np.arange(10)})
    path = cache.cache_path("embeddings", key)
    io.checksum_path(path).unlink()  # as written before checksums existed
    assert cache.cached_arrays("embeddings", key, lambda: pytest.fail("recomputed"))["a"].tolist() == list(range(10))
    assert io.checksum_path(path).is_file()
    io.checksum_path(path).unlink()
    _truncate(path)
    with pytest.warns(cache.CorruptArtifactWarning, match="cannot be read"):
        cache.cached_arrays("embeddings", key, lambda: {"a": np.arange(10)})


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cached_backbone_is_named_and_retrained(tmp_cache, damage):
    spec = TR.model_spec(tiny_profile(train={"epochs": 1, "batch_size": 16}), "extended", "old")
    first = _state(TR.train(spec, progress=False))
    pt = TR.model_dir(spec) / "model.pt"
    assert io.checksum_path(pt).is_file()
    if damage == "flip":  # one exponent bit of the head's weights (the attack)
        sd = torch.load(pt, weights_only=True)
        raw = pt.read_bytes()
        needle = sd["head.weight"].flatten()[:4].numpy().tobytes()
        at = raw.find(needle)
        assert at > 0
        data = bytearray(raw)
        data[at + 3] ^= 0x10
        pt.write_bytes(bytes(data))
        assert not torch.equal(torch.load(pt, weights_only=True)["head.weight"], sd["head.weight"])
    else:
        _truncate(pt)
    with cache.mode("render"), pytest.raises(cache.CorruptArtifactError, match=r"model.pt.*10_train"):
        TR.load_model(spec)
    if damage == "truncate":  # found before any training starts: the model is to be trained again
        with pytest.warns(cache.CorruptArtifactWarning, match="model.pt"):
            assert not TR.is_trained(spec)
        assert not pt.exists()
        return
    with pytest.warns(cache.CorruptArtifactWarning, match="model.pt"):
        again = _state(TR.train(spec, progress=False))
    assert all(torch.equal(first[k], again[k]) for k in first), "the retrained model equals the first"
    assert cache.verify_entry("models", "x", pt) == "ok"


def test_long_target_names_stay_writable(tmp_path):
    name = "m" * 240 + ".npz"  # valid (< 255 bytes); the temporary name must be valid too
    io.atomic_write(tmp_path / name, lambda p: np.savez(p, a=np.zeros(2)))
    io.atomic_write_text(tmp_path / ("t" * 250), "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "t" * 250])


def test_missing_input_shows_its_message_not_a_traceback():
    err = cache.missing("curves", "the curves", cache.cache_path("curves", {"x": 1}))
    lines = err._render_traceback_()
    assert len(lines) == 1 and "run notebooks/31_backfill.ipynb first" in lines[0]
