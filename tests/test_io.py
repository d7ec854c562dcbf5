"""Atomic writes, the artifact cache (hit, miss, versions, interrupted write) and render mode."""
import time

import numpy as np
import pytest

from backfill_utils import cache, io
from backfill_utils import embed as E
from backfill_utils import session
from backfill_utils import train as TR
from backfill_utils.backfill import experiments as X
from backfill_utils.compat import modules as K
from backfill_utils.data import api as D
from backfill_utils.studies import order_study as OS
from backfill_utils.studies import query_cost as QC
from conftest import tiny_profile


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "t.txt"
    io.atomic_write_text(target, "old")

    def broken(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_cache_hit_and_miss(tmp_cache):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5)}

    key = {"model": "x", "seed": 0}
    assert cache.cached_arrays("embeddings", key, compute)["a"].tolist() == [0, 1, 2, 3, 4]
    assert cache.cached_arrays("embeddings", dict(key), compute)["a"].tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 1, "second call must be a cache hit"
    cache.cached_arrays("embeddings", dict(key, seed=1), compute)
    assert len(calls) == 2, "a changed parameter must be a cache miss"
    assert E.cached_arrays is cache.cached_arrays  # re-exported for older callers
    with pytest.raises(ValueError, match="unknown artifact kind 'nope'.*curves"):
        cache.cached_arrays("nope", key, compute)


@pytest.mark.parametrize("kind, module, constant", [
    ("embeddings", TR, "TRAIN_VERSION"), ("embeddings", E, "EMBED_VERSION"),
    ("compat", K, "COMPAT_VERSION"), ("curves", X, "CURVES_VERSION"),
    ("experiments", X, "EXPERIMENTS_VERSION"), ("experiments", E, "EMBED_VERSION"),
])
def test_a_version_bump_is_a_cache_miss(tmp_cache, monkeypatch, kind, module, constant):
    calls = []
    compute = lambda: calls.append(1) or {"a": np.zeros(2)}  # noqa: E731
    key = {"k": 1}
    before = cache.cache_path(kind, key)
    cache.cached_arrays(kind, key, compute)
    monkeypatch.setattr(module, constant, getattr(module, constant) + 1)
    assert cache.cache_path(kind, key) != before
    cache.cached_arrays(kind, key, compute)
    assert len(calls) == 2, f"a bump of {constant} must invalidate {kind}"


def test_model_folders_carry_the_training_and_generator_versions(monkeypatch):
    cfg = tiny_profile()
    spec = TR.model_spec(cfg, "extended", "new")
    folder = TR.model_dir(spec)
    monkeypatch.setattr(TR, "TRAIN_VERSION", TR.TRAIN_VERSION + 1)
    assert TR.model_dir(spec) != folder
    monkeypatch.undo()
    monkeypatch.setattr(D, "SYNTHETIC_VERSION", D.SYNTHETIC_VERSION + 1)
    assert TR.model_spec(cfg, "extended", "new") != spec
    assert TR.model_dir(TR.model_spec(cfg, "extended", "new")) != folder


def test_interrupted_write_leaves_nothing(tmp_cache, monkeypatch):
    def broken_savez(path, **arrays):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(io.np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        cache.cached_arrays("embeddings", {"k": 1}, lambda: {"a": np.zeros(3)})
    assert not [p for p in tmp_cache.rglob("*") if p.is_file()], "half-written file left"
    monkeypatch.undo()
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_cache))
    out = cache.cached_arrays("embeddings", {"k": 1}, lambda: {"a": np.ones(3)})
    assert out["a"].tolist() == [1, 1, 1]


def test_object_arrays_are_refused_before_writing(tmp_cache):
    with pytest.raises(TypeError, match="dtype object"):
        cache.cached_arrays("embeddings", {"k": 2}, lambda: {"a": np.array(["x", None], dtype=object)})
    assert not [p for p in tmp_cache.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_render_mode_names_the_producer_and_computes_nothing(tmp_cache):
    with cache.mode("render", hint="with the same parameters (profile='smoke')"):
        with pytest.raises(cache.MissingArtifactError, match=r"notebooks/30_compat\.ipynb first with the same"):
            cache.cached_arrays("compat", {"k": 3}, lambda: pytest.fail("computed in render mode"))
        spec = TR.model_spec(tiny_profile(), "extended", "old")
        with pytest.raises(cache.MissingArtifactError, match=r"10_train") as err:
            TR.train(spec, progress=False)
        assert isinstance(err.value, FileNotFoundError)
        assert "make reproduce" in str(err.value)
    assert cache.get_mode() == "compute"
    assert not [p for p in tmp_cache.rglob("*") if p.is_file()]
    with pytest.raises(ValueError, match="mode must be"):
        cache.set_mode("draw")


@pytest.mark.slow
def test_render_notebook_on_an_empty_cache_stops_at_once(tmp_cache, monkeypatch, capsys):
    """What notebooks 40-51 do first: evaluate_all / build_systems / trained modules / the cached studies."""
    for name in ("build_train_dataset", "load_model"):
        monkeypatch.setattr(TR, name, lambda *a, **k: pytest.fail("a render notebook trained or loaded a model"))
    monkeypatch.setattr(E, "extract", lambda *a, **k: pytest.fail("a render notebook embedded"))
    run = session.setup("smoke", kind="render", style=False)
    try:
        t0 = time.perf_counter()
        for call, producer in ((lambda: X.evaluate_all(run.cfg), "31_backfill"),
                               (lambda: X.build_systems(run.cfg, "extended", ["RM"]), "20_galleries"),
                               (lambda: X.train_method(run.cfg, "extended", "Ours"), "30_compat"),
                               (lambda: OS.order_comparison(run.cfg, "extended"), "32_experiments"),
                               (lambda: QC.query_cost(run.cfg, "extended"), "32_experiments")):
            with pytest.raises(cache.MissingArtifactError, match=f"notebooks/{producer}.ipynb"):
                call()
        assert time.perf_counter() - t0 < 60  # seconds, not a training run (measured: well under 10)
    finally:
        cache.set_mode("compute")
    assert "profile=smoke" in capsys.readouterr().out
