"""Every method end to end on a tiny run; invariants of the systems."""
import numpy as np
import pytest

from backfill_utils import backfill as B
from backfill_utils import methods as MM
from backfill_utils import metrics as MT
from conftest import tiny_profile


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BACKFILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"],
                       compat={"epochs": 2, "batch_size": 16})
    curves, summary = MM.evaluate_setting(cfg, "extended", progress=False)
    systems, refs = MM.build_systems(cfg, "extended", progress=False)
    yield cfg, curves, summary, systems, refs
    mp.undo()


def test_every_method_has_a_full_curve(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    assert list(summary["method"]) == MM.ALL_METHODS
    for m in MM.ALL_METHODS:
        c = curves[curves["method"] == m]
        assert len(c) == cfg["eval"]["num_ratios"], m
        assert c[["mAP", "top1", "top5"]].notna().all().all(), m
    assert summary.set_index("method").loc["RM", "query_passes"] == 2
    assert (summary[summary["method"] != "RM"]["query_passes"] == 1).all()


def test_endpoints_are_the_pure_systems(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    y = refs["labels"]
    for m, s in systems.items():
        c = curves[curves["method"] == m].sort_values("ratio")
        start = MT.evaluate_retrieval(s.query_old, y, s.gallery_old, y, exclude_self=True)
        end = MT.evaluate_retrieval(s.query_new, y, s.gallery_new, y, exclude_self=True)
        for k in ("mAP", "top1", "top5"):
            assert c[k].iloc[0] == pytest.approx(start[k], abs=1e-9), (m, k)
            assert c[k].iloc[-1] == pytest.approx(end[k], abs=1e-9), (m, k)
    # methods whose new side is phi_new end exactly at new/new; RM starts at old/old
    s = summary.set_index("method")
    for m in ("naive", "FCT", "FastFill", "RM", "RM+psi", "RM+psi+CMCL"):
        assert s.loc[m, "final_map"] == pytest.approx(s.loc["new", "final_map"]), m
    rm = curves[curves["method"] == "RM"].sort_values("ratio")
    assert rm["mAP"].iloc[0] == pytest.approx(s.loc["old", "final_map"])


def test_evaluation_is_cached_and_reloads_identically(tiny_run, monkeypatch):
    cfg, curves, summary, systems, refs = tiny_run
    monkeypatch.setattr(MM, "build_systems", lambda *a, **k: pytest.fail("recomputed on a hit"))
    curves2, summary2 = MM.evaluate_setting(cfg, "extended", progress=False)
    assert curves2.equals(curves.astype(curves2.dtypes.to_dict())) or curves2.round(12).equals(curves.round(12))
    assert list(summary2["method"]) == list(summary["method"])
    np.testing.assert_array_equal(summary2["auc_map"].to_numpy(), summary["auc_map"].to_numpy())


def test_system_shapes(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    n, d = refs["old"].shape
    assert systems["RM"].query_old is refs["old"] or np.array_equal(systems["RM"].query_old, refs["old"])
    assert systems["Ours"].query_new.shape == (n, d)
    order = np.asarray(systems["FastFill"].order)
    assert sorted(order.tolist()) == list(range(n))
    assert refs["extra_params"]["Ours"] > refs["extra_params"]["RM+psi"] > 0
    assert refs["extra_params"]["RM"] == 0


def test_reverse_transform_dimension_mismatch_is_a_clear_error():
    rng = np.random.default_rng(0)
    q_rev = rng.normal(size=(6, 5)).astype(np.float32)      # psi output: 5 dims
    old = rng.normal(size=(6, 4)).astype(np.float32)        # old gallery: 4 dims
    new = rng.normal(size=(6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"5.*4|4.*5"):
        B.BackfillSystem.merge("bad psi", q_rev, old, new, new)


def test_claims_table_reads_the_summary(tiny_run):
    cfg, curves, summary, systems, refs = tiny_run
    cl = MM.claims(curves, summary)
    assert {"claim", "checked", "value", "reference", "holds"} <= set(cl.columns)
    row = cl[cl["claim"].str.startswith("RM endpoints")].iloc[0]
    assert bool(row["holds"]), "RM endpoints are an exact invariant"


def test_unknown_method_is_an_error(tiny_run):
    cfg = tiny_run[0]
    with pytest.raises(ValueError, match="no compatibility module"):
        MM.compat_outputs(cfg, "extended", "RM")
