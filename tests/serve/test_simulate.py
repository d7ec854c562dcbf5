"""serve_sim: AP@k against a brute-force loop and the engine, the schedule, the query stream,
the offline service, and a simulation's determinism (quality) and bookkeeping (latency)."""
from __future__ import annotations

import numpy as np
import pytest

from backfill_utils.retrieval import metrics as MT
from backfill_utils.serve import simulate as SIM

pytestmark = pytest.mark.slow  # every test here trains or runs end to end


def brute_ap_at_k(hits, n_rel):
    out = []
    for h, r in zip(hits, n_rel):
        found, total = 0, 0.0
        for i, hit in enumerate(h):
            if hit:
                found += 1
                total += found / (i + 1)
        out.append(total / min(len(h), r) if r else 0.0)
    return np.array(out)


def test_ap_at_k_is_the_brute_force_sum():
    rng = np.random.default_rng(0)
    hits = rng.random((50, 7)) < 0.4
    n_rel = rng.integers(0, 12, 50)
    n_rel = np.maximum(n_rel, hits.sum(1))
    np.testing.assert_allclose(SIM.ap_at_k(hits, n_rel), brute_ap_at_k(hits, n_rel), rtol=0, atol=1e-12)


def gallery(n=60, d=5, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    old = rng.standard_normal((n, d)).astype(np.float32) + 0.8 * rng.standard_normal((classes, d)).astype(np.float32)[y]
    new = rng.standard_normal((n, d + 2)).astype(np.float32) + 2 * rng.standard_normal((classes, d + 2)).astype(np.float32)[y]
    return old, new, y, rng.permutation(n)


def test_served_quality_with_the_whole_ranking_is_the_engines():
    old, new, y, order = gallery()
    n = len(y)
    svc = SIM.OfflineService(old, new, y, order)
    top1, ap, sec = SIM._serve_tick(svc, np.arange(n), n - 1)  # k = every other item: AP@k = AP
    ref = MT.evaluate_retrieval(old, y, old, y, exclude_self=True, return_per_query=True)
    np.testing.assert_allclose(ap, ref["ap"], rtol=0, atol=1e-9)
    assert np.array_equal(top1, ref["correct_at_1"]) and (sec > 0).all()
    svc.backfill_to(n)
    assert svc.switched
    top1, ap, _ = SIM._serve_tick(svc, np.arange(n), n - 1)
    ref = MT.evaluate_retrieval(new, y, new, y, exclude_self=True, return_per_query=True)
    np.testing.assert_allclose(ap, ref["ap"], rtol=0, atol=1e-9)


def test_schedule_and_stream():
    plan = SIM.LoadPlan(throughput=7, tick_s=2, queries_per_tick=25, settle_ticks=1)
    assert SIM.backfill_schedule(30, plan).tolist() == [0, 14, 28, 30, 30]
    assert SIM.backfill_schedule(5, SIM.LoadPlan(throughput=100, settle_ticks=0)).tolist() == [0, 5]
    stream = SIM.query_stream(30, plan, 4)
    assert [len(s) for s in stream] == [25] * 4 and len(set(stream[0].tolist())) == 25
    assert all(np.array_equal(s, stream[0]) for s in stream) and stream[0].max() < 30
    assert np.array_equal(stream[0], SIM.query_stream(30, plan, 2)[1])
    assert not np.array_equal(stream[0], SIM.query_stream(30, SIM.LoadPlan(throughput=7, queries_per_tick=25, seed=1), 1)[0])
    assert len(SIM.query_stream(10, plan, 1)[0]) == 10  # at most the gallery
    assert SIM.LoadPlan.for_gallery(200).throughput == 10 and SIM.LoadPlan.for_gallery(50).queries_per_tick == 50
    with pytest.raises(ValueError, match="throughput and tick_s must be positive"):
        SIM.LoadPlan(throughput=0)
    with pytest.raises(TypeError, match="k must be an integer, got 2.5"):
        SIM.LoadPlan(throughput=1, k=2.5)
    with pytest.raises(ValueError, match="queries_per_tick must be >= 1, got 0"):
        SIM.LoadPlan(throughput=1, queries_per_tick=0)


def test_simulation_quality_is_deterministic_and_latency_is_measured():
    old, new, y, order = gallery()
    plan = SIM.LoadPlan(throughput=20, queries_per_tick=30, k=5, settle_ticks=1)
    runs = [SIM.simulate(SIM.OfflineService(old, new, y, order), plan, forward_ms={False: 1.5, True: 2.5},
                       progress=False) for _ in range(2)]
    (q1, l1), (q2, _) = runs
    assert q1.equals(q2)
    assert q1["backfilled"].tolist() == [0, 20, 40, 60, 60] and q1["fraction"].iloc[-1] == 1
    assert (l1["search_p99_ms"] >= l1["search_p50_ms"]).all() and (l1["search_p50_ms"] > 0).all()
    assert l1["forward_ms"].tolist() == [1.5, 1.5, 1.5, 2.5, 2.5]
    np.testing.assert_allclose(l1["total_p50_ms"] - l1["search_p50_ms"], l1["forward_ms"], rtol=0, atol=1e-9)
    # offline: old/old until the backfill completes, then new/new, on the tick's queries
    rows = SIM.query_stream(len(y), plan, 5)
    for t in (0, 4):
        e = old if t == 0 else new
        ref = MT.evaluate_retrieval(e, y, e, y, exclude_self=True, return_per_query=True)
        assert q1["top1"].iloc[t] == pytest.approx(100 * ref["correct_at_1"][rows[t]].mean(), abs=1e-9)


def test_load_figure_is_two_by_two_with_plain_latency_ticks():
    import matplotlib.pyplot as plt
    import pandas as pd

    from backfill_utils.figures import style as ST
    from backfill_utils.serve import simulate as SIM

    ST.style()
    plan = SIM.LoadPlan(throughput=5, settle_ticks=1)
    t = np.arange(4)
    quality = pd.concat([pd.DataFrame({"method": m, "elapsed_s": t, "top1": 10.0 + t, "map_at_k": 5.0 + t})
                         for m in ("RM", "Ours")])
    latency = pd.concat([pd.DataFrame({"method": m, "elapsed_s": t, "total_p50_ms": 0.3 + 0.1 * t,
                                       "total_p99_ms": [0.4, 0.9, 3.0, 6.0]}) for m in ("RM", "Ours")])
    fig = SIM.load_figure(quality, latency, plan, 15)
    try:
        assert len(fig.axes) == 4 and fig.get_size_inches()[1] >= 6
        fig.canvas.draw()
        p99 = fig.axes[3]
        labels = [x.get_text() for x in p99.get_yticklabels() if x.get_text()]
        assert labels and all(x.replace(".", "").isdigit() for x in labels), labels
        assert "batch 1" in p99.get_ylabel() and any("Table 2" in x.get_text() for x in fig.texts)
        assert [x.get_text() for x in fig.legends[0].get_texts()] == ["RM", "Ours"]
    finally:
        plt.close(fig)
