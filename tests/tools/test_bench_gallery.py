"""tools.bench_gallery: benchmark galleries of trained models' embeddings of rendered images,
and the IVF recall curve that compares them with the real test split's."""
from __future__ import annotations

import numpy as np
import pytest

from backfill_utils import config as C
from backfill_utils.tools import bench_gallery as G
from backfill_utils.tools.bench_serve_summary import _params, fidelity_table

SETTING = "extended"
# smoke models (measured): one shared nprobe of 2 gives recall@10 0.94, 4 gives 0.99; the weak old
# model's items barely enter the merged top-10, so the tuned pair probes one old list and, whichever
# of 2 or 4 the new side needs, scans at most 0.75x the vectors of the shared value
TUNE_TARGET = 0.95


def _clustered(n, d=16, centres=20, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    return (c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def test_ivf_recall_against_brute_force():
    x, q = _clustered(2000), _clustered(200, seed=1)
    curve = G.ivf_recall(x, q, nlist=16, nprobes=(1, 4, 16), seeds=(0,))
    assert curve[16] == 1.0  # every list probed: exact
    assert curve[1] <= curve[4] <= curve[16] and curve[1] < 1.0
    # an independent count at nprobe 1: the exact top-10 by brute force, then the share
    # of it in the one list nearest the query (IVF,Flat at nprobe 1 finds exactly those)
    import faiss
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 16)
    ivf.cp.seed = 0
    ivf.train(x)
    assign = ivf.quantizer.search(x, 1)[1][:, 0]
    q_list = ivf.quantizer.search(q, 1)[1][:, 0]
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    top = np.argsort(d2, axis=1, kind="stable")[:, :10]
    expected = np.mean([(assign[t] == ql).mean() for t, ql in zip(top, q_list)])
    assert abs(curve[1] - expected) < 0.01


def test_fidelity_table_and_parameter_labels():
    rows = [{"source": s, "pair": "old->old", "nprobe": p, "recall_at_10": r}
            for s, p, r in (("real", 1, 0.8), ("benchmark", 1, 0.85), ("real", 2, 0.9), ("benchmark", 2, 0.9))]
    table = fidelity_table(rows)
    assert table.loc[("old->old", 1), "difference"] == pytest.approx(0.05)
    assert _params({"old": {"nprobe": 1}, "new": {"nprobe": 8}}) == "old nprobe=1 / new nprobe=8"
    assert _params({"old": {"nprobe": 8}, "new": {"nprobe": 8}}) == "nprobe=8"
    assert _params({"new": {"nprobe": 4}}) == "nprobe=4"
    assert _params({}) == _params({"old": {}, "new": {}}) == "exact"


def test_errors_name_the_input():
    cfg = C.load_profile("smoke")
    with pytest.raises(ValueError, match="dataset is 'cifar100'"):
        G.chunk_embeddings({**cfg, "dataset": "cifar100"}, SETTING, 0)
    with pytest.raises(ValueError, match="per_class must be an integer >= 1"):
        G.chunk_embeddings(cfg, SETTING, 0, per_class=0)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        G.gallery_embeddings(cfg, SETTING, 0)
    with pytest.raises(ValueError, match="which must be one of"):
        G.query_embeddings(cfg, SETTING, "train", 10)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        G.query_embeddings(cfg, SETTING, "val", 0)
    with pytest.raises(ValueError, match="more than n_queries"):
        G.ivf_curves({"old": np.zeros((5, 4), np.float32), "new": np.zeros((5, 4), np.float32)}, {}, None,
                     n_queries=5)


@pytest.mark.slow
def test_galleries_extend_each_other_and_queries_are_new_images(smoke_extended):
    cfg = smoke_extended
    small = G.gallery_embeddings(cfg, SETTING, 30, per_class=2, progress=False)
    large = G.gallery_embeddings(cfg, SETTING, 70, per_class=2, progress=False)
    for key in ("old", "new", "labels"):
        np.testing.assert_array_equal(large[key][:30], small[key])
    assert large["old"].shape[0] == 70 and large["old"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(large["new"], axis=1), 1.0, atol=1e-5)
    from backfill_utils import train as TR
    classes = set(map(int, TR.setting_classes(cfg, SETTING)["test_classes"]))
    assert set(large["labels"].tolist()) <= classes
    q = G.query_embeddings(cfg, SETTING, "test", 20, progress=False)
    v = G.query_embeddings(cfg, SETTING, "val", 20, progress=False)
    for a, b in ((q["new"], v["new"]), (q["new"], large["new"]), (v["new"], large["new"])):
        nearest = ((a[:, None, :] - b[None]) ** 2).sum(-1).min(axis=1)
        assert nearest.min() > 1e-8  # no image shared between streams
    # a chunk is read back from the cache, and another chunk size is another entry
    again = G.chunk_embeddings(cfg, SETTING, 0, per_class=2, progress=False)
    np.testing.assert_array_equal(again["old"], large["old"][:len(again["old"])])
    other = G.chunk_embeddings(cfg, SETTING, 0, per_class=3, progress=False)
    assert len(other["old"]) == 3 * len(classes)


@pytest.mark.slow
def test_model_inputs_serve_psi_and_rho_and_refuse_two_pass_methods(smoke_extended):
    inp = G.model_inputs(smoke_extended, SETTING, "Ours", 40, 10, 10, progress=False)
    assert inp["old"].shape[0] == 40 and inp["q_new"].shape[0] == 10 and inp["q_val"].shape[0] == 10
    assert inp["query_transform"] is not None and inp["new_transform"] is not None
    with pytest.raises(ValueError, match="two passes"):
        G.model_inputs(smoke_extended, SETTING, "RM", 40, 10, 10, progress=False)


@pytest.mark.slow
def test_on_trained_models_embeddings_per_side_nprobe_scans_less_than_one_nprobe(smoke_extended):
    """The smoke profile's trained models over rendered images, half backfilled, IVF per
    side: the nprobe pair tune_search picks reaches the target while scanning fewer vectors
    than the smallest nprobe shared by both sides that reaches it (both read from the same
    table of measured recalls, so the comparison is exact)."""
    from backfill_utils.serve.index import OnlineBackfillIndex

    inp = G.model_inputs(smoke_extended, SETTING, "Ours", 4000, 10, 1000, progress=False)
    n = len(inp["old"])
    index = OnlineBackfillIndex(inp["old"].shape[1], inp["new"].shape[1], query_transform=inp["query_transform"],
                                new_transform=inp["new_transform"], factory="IVF32,Flat")
    index.train(old=inp["old"], new=inp["new"])
    index.add_old(np.arange(n), inp["old"])
    half = np.random.default_rng(0).permutation(n)[: n // 2]
    index.backfill(half, inp["new"][half])
    res = index.tune_search(inp["q_val"], target=TUNE_TARGET, grid=(1, 2, 4, 8, 16, 32))
    equal = [row for row in res["table"] if row["old"] == row["new"] and row["recall"] >= TUNE_TARGET]
    assert res["recall"] >= TUNE_TARGET and equal
    assert res["cost"] <= 0.8 * min(row["cost"] for row in equal)


def test_bench_serve_arguments_are_checked_before_anything_runs(tmp_path, capsys):
    from backfill_utils.tools import bench_serve

    with pytest.raises(SystemExit):
        bench_serve.parse_args(["--render-only", "--out", str(tmp_path / "absent.json")])
    assert "absent.json, which does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_serve.parse_args(["--nprobe-sweep", "0", "8"])
    assert "positive integers" in capsys.readouterr().err
    args = bench_serve.parse_args(["--nprobe-sweep", "4096"])
    with pytest.raises(ValueError, match="no value <= nlist 128"):
        bench_serve.factory_spec("IVF", 1500, args)
