"""Independent jobs in worker processes (parallel.py): job order, start order, workers from the
environment, and the same numbers as serial runs."""
import operator

import numpy as np
import pandas as pd
import pytest
import torch

from backfill_utils import config as C
from backfill_utils import embed as E
from backfill_utils import parallel
from backfill_utils import train as TR

from conftest import tiny_profile


@pytest.mark.slow
def test_run_jobs_returns_results_in_job_order_with_workers():
    jobs = [(2, k) for k in range(6)]
    assert parallel.run_jobs(operator.pow, jobs, n_workers=2, progress=False) == [2 ** k for k in range(6)]


def test_start_order_puts_dependencies_and_unblockers_first():
    # job 2 depends on 0; job 0 unblocks a job, so it starts before the costlier job 1
    assert parallel._order(3, {2: {0}}, [1.0, 5.0, 1.0]) == [0, 1, 2]
    assert parallel._order(3, {}, [1.0, 5.0, 2.0]) == [1, 2, 0]
    with pytest.raises(ValueError, match="cycle"):
        parallel._order(2, {0: {1}, 1: {0}}, [1.0, 1.0])


def test_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.WORKERS_ENV, "3")
    assert parallel.workers() == 3 and parallel.workers(1) == 1
    monkeypatch.setenv(parallel.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="BACKFILL_WORKERS"):
        parallel.workers()


@pytest.mark.slow
def test_parallel_backbones_equal_serial_ones(tmp_path, monkeypatch):
    """Two worker processes train the same weights, bit for bit, as one process after the other."""
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"])
    specs = [TR.model_spec(cfg, "extended", r) for r in TR.ROLES]
    weights = {}
    for n in (1, 2):
        monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / f"cache{n}"))
        TR.train_many(specs, progress=False, n_workers=n)
        weights[n] = [torch.load(TR.model_dir(s) / "model.pt") for s in specs]
    for a, b in zip(weights[1], weights[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_prefetched_embeddings_curves_and_convergence_equal_serial_ones(tmp_path, monkeypatch):
    """Embeddings, curves and FCT's convergence history computed in two worker processes
    equal those computed in this process, bit for bit, and a second prefetch finds them cached."""
    from backfill_utils.studies import convergence as CV
    from backfill_utils.backfill import experiments as X
    from backfill_utils.studies import seeds as SD

    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"], compat_seeds=2,
                       val_fraction=0.25, compat={"epochs": 2, "batch_size": 16})
    names = ["old", "RM", "Ours"]
    out = {}
    # the same torch threads here as in the workers (the thread count changes the last bits of training)
    monkeypatch.setenv(C.THREADS_ENV, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (1, 2):
            monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / f"cache{n}"))
            TR.train_many([TR.model_spec(cfg, "extended", r) for r in TR.ROLES], progress=False)
            if n == 2:
                assert X.prefetch_embeddings(cfg, progress=False) == 3 + len(X.train_roles())
                assert X.prefetch_embeddings(cfg, progress=False) == 0
                jobs = [("extended", m, None, sd) for sd in SD.seeds_of(cfg, "extended") for m in ("Ours",)]
                SD.train_jobs(cfg, jobs, progress=False, n_workers=2, also=CV.pool_job(cfg, "extended"))
                assert CV.pool_job(cfg, "extended") == []
                # a curve per method without training, one per seed of Ours
                assert SD.prefetch_curves(cfg, names, progress=False, n_workers=2) == 2 + 2
                assert SD.prefetch_curves(cfg, names, progress=False, n_workers=2) == 0
            emb = [E.get_embeddings(cfg, "extended", r, "test", progress=False)["emb"] for r in TR.ROLES]
            _, summary = SD.evaluate_seeds(cfg, names, progress=False)
            out[n] = emb, summary, CV.fct_convergence(cfg, "extended", progress=False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out[1][0], out[2][0]):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(out[1][1], out[2][1])
    pd.testing.assert_frame_equal(out[1][2].drop(columns="seconds", errors="ignore"),
                                  out[2][2].drop(columns="seconds", errors="ignore"))
