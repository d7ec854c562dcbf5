"""The benchmark and the GPU check run end to end on tiny sizes (CPU) and report consistent numbers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from backfill_utils import config as C
from backfill_utils.tools import bench, gpu_check


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_bench_tiny_run_writes_consistent_json(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    res = bench.main(["--n", "240", "--classes", "8", "--large", "2000", "--torch-sample", "50",
                      "--threads", "1", "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"] == res["config"] and saved["environment"]["torch_threads"] == 1
    sbs = saved["side_by_side"]
    # the engine and the straightforward method agree (exact engine; sklearn's float sums)
    assert sbs["max_abs_diff_pct_points"] < 1e-9 and sbs["speedup"] > 0
    assert [c["classes"] for c in saved["large"]] == [100, 1000]
    first = saved["large"][0]
    assert first["n"] == 2000 and first["per_class"] == 20 and first["peak_rss_mb"] > 0
    assert 0 < first["matrix_products_alone_seconds"] and first["seconds"] > 0
    phases = first["phases_seconds"]
    assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"))
    assert "bin search (searchsorted)" in first["torch_path"]["seconds_scaled_to_all_queries"]
    assert set(saved["targets"]) >= {"side_by_side_seconds", "speedup"}
    assert all(isinstance(t["met"], bool) for t in saved["targets"].values())
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    # the BENCH block of a page is rewritten from the JSON alone; the rest of the page byte for byte
    page = tmp_path / "protocol.md"
    page.write_text("# head\n<!-- BENCH:START -->\nold\n<!-- BENCH:END -->\ntail\n")
    monkeypatch.setattr(bench, "DOC", page)
    bench.main(["--render-only", "--out", str(out)])
    assert page.read_text() == ("# head\n<!-- BENCH:START -->\n" + bench.render_markdown(saved)
                                + "<!-- BENCH:END -->\ntail\n")
    page.write_text("# no block\n")
    with pytest.raises(ValueError, match=r"protocol\.md needs exactly one <!-- BENCH:START -->"):
        bench.write_doc_block(saved, page)


def test_make_data_is_balanced_and_seeded():
    a, b = bench.make_data(90, 6, 9, seed=3), bench.make_data(90, 6, 9, seed=3)
    assert np.bincount(a["labels"]).tolist() == [10] * 9
    assert all(np.array_equal(a[k], b[k]) for k in a)
    np.testing.assert_allclose(np.linalg.norm(a["new"], axis=1), 1, rtol=1e-5)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_tiny_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "project_cache"))
    out = tmp_path / "gpu_check.json"
    res = gpu_check.main(["--epochs", "2", "--n-train", "300", "--classes", "10", "--width", "4",
                          "--workers", "0", "--batch-size", "32", "--no-progress", "--out", str(out)])
    assert res["ok"] and json.loads(out.read_text())["ok"]
    assert res["train"]["epochs"] == 2 and len(res["train"]["images_per_s_per_epoch"]) == 2
    assert res["train"]["images_per_s"] > 0 and res["train"]["images_per_epoch"] == 9 * 32
    exact = res["engine"]["exact"]
    assert exact["ranks_identical"] and exact["max_abs_diff_ap"] <= gpu_check.EXACT_AP_TOL
    assert res["engine"]["gallery"] == 300 and res["environment"]["device"] == "cpu"
    # the training cache was temporary: the project's cache is untouched, the variable restored
    assert not (tmp_path / "project_cache").exists()
    assert os.environ[C.CACHE_ENV] == str(tmp_path / "project_cache")


def test_gpu_check_flag_errors():
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--epochs", "0"])
