"""The arithmetic of backfill_utils.tools.scale_cost against hand computations (the measurement is faked)."""
from __future__ import annotations

import json
import shutil
import tempfile

import pytest

from backfill_utils.backfill import registry as MM
from backfill_utils.tools import scale_cost as SC

# fake per-image CPU costs: (training step, embedding pass) by architecture; per-item costs of the methods
COST = {"resnet18": (0.01, 0.002), "resnet50": (0.03, 0.005)}
COMPAT = 1e-5
BENCH = {"large": [{"name": "A", "n": 50_000, "per_class": 500, "cpu_seconds": 90.0},
                   {"name": "B", "n": 50_000, "per_class": 50, "cpu_seconds": 40.0}]}
GPU = {"environment": {"device": "cuda:0", "card": "Fake GPU", "torch": "x", "cuda": "y"},
       "train": {"images_per_s": 1000.0, "batch_size": 256},
       "engine": {"gallery": 50_000, "classes": 100, "as_is": {"device_seconds": 4.0}}}


def fake_measure(plans, cfg):
    need = {(j["model"], p["image_size"]) for p in plans.values() for j in p["backbones"]} | {("resnet18@cifar", 32)}
    back = {f"{m}/{size}": {"train_cpu_s": COST[m.split("@")[0]][0], "embed_cpu_s": COST[m.split("@")[0]][1],
                            "train_wall_s": 1.0, "embed_wall_s": 1.0} for m, size in need}
    return {"backbone": back, "compat": {n: {"cpu_s": COMPAT, "wall_s": 1.0} for n in MM.names()
                                         if MM.get(n).fit is not None}}


@pytest.fixture(scope="module")
def cifar_plan():
    with tempfile.TemporaryDirectory() as empty:
        return SC.plan(SC.profile_for("CIFAR-100", empty), 50_000, 10_000)


def test_plan_counts_the_paper_profiles_jobs(cifar_plan):
    p = cifar_plan
    # 3 settings x 3 roles, the heterogeneous setting's old model = the extended one: 8 backbones,
    # ResNet-50 for the heterogeneous new and BCT models; 500 images per class, 50 held out of each
    assert len(p["backbones"]) == 8
    assert sorted(j["model"] for j in p["backbones"]).count("resnet50@cifar") == 2
    # classes: extended old 50, new 100, bct 100; heterogeneous new/bct 100; open old 40, new/bct 80
    assert sorted(j["images"] for j in p["backbones"]) == sorted(
        450.0 * c for c in (50, 100, 100, 100, 100, 40, 80, 80))
    assert {j["epochs"] for j in p["backbones"]} == {200}
    # trainable methods x 3 settings x 3 compat seeds (the paper profile seeds every setting)
    trainable = sum(MM.get(n).fit is not None for n in MM.names())
    assert trainable == 11 and len(p["compatibility"]) == trainable * 3 * 3
    assert {(j["setting"], j["items"]) for j in p["compatibility"]} == {
        ("extended", 45_000.0), ("heterogeneous", 45_000.0), ("open", 36_000.0)}
    # naive, BCT and RM once per setting, the trainable ones per seed; the open gallery: 20 test-only classes
    assert p["evaluation"] == [{"setting": "extended", "gallery": 10_000.0, "curves": 3 + 33},
                               {"setting": "heterogeneous", "gallery": 10_000.0, "curves": 36},
                               {"setting": "open", "gallery": 2_000.0, "curves": 36}]
    # embeddings: 8 backbones x (train, test); 5 passes of the fit part of the new classes
    assert len(p["embedding"]) == 16
    assert sum(j["images"] for j in p["embedding"]) == 5 * (5 * 45_000 + 3 * 36_000) + 5 * 10_000 + 3 * 2_000


def test_fit_images_matches_the_validation_split_count():
    assert SC.fit_images(50_000, 100, 100, 0.1) == 45_000
    assert SC.fit_images(1_281_167, 1000, 500, 0.1) == pytest.approx(500 * (1281.167 - 128))
    assert SC.fit_images(1000, 10, 10, 0.0) == 1000


def test_estimate_against_a_hand_computation(cifar_plan):
    meas = fake_measure({"c": cifar_plan}, None)
    est = SC.estimate(cifar_plan, meas, BENCH, GPU)
    r18, r50 = 450.0 * (50 + 100 + 100 + 40 + 80 + 80), 450.0 * 200  # images of each architecture
    train_cpu = (r18 * 0.01 + r50 * 0.03) * 200
    assert est["backbones"]["cpu_s"] == pytest.approx(train_cpu / 2)
    assert est["backbones"]["gpu_s"] == pytest.approx(train_cpu / 0.01 / 1000)  # relative to ResNet-18 at 32 px
    emb_r18 = 5 * (3 * 45_000 + 3 * 36_000) + 3 * 10_000 + 3 * 2_000
    emb_r50 = 2 * (5 * 45_000 + 10_000)
    fwd = emb_r18 * 0.002 + emb_r50 * 0.005
    assert est["embedding"]["cpu_s"] == pytest.approx(fwd / 2)
    assert est["embedding"]["gpu_s"] == pytest.approx(fwd / 0.01 / 1000)
    # 9 modules on the shared 30 epochs, FCT and FastFill on their authors' 80
    assert est["compatibility"]["cpu_s"] == pytest.approx(3 * (45_000 * 2 + 36_000) * (9 * 30 + 2 * 80) * COMPAT / 2)
    assert est["compatibility"]["gpu_s"] is None
    # 100 test images per class: case B (50 relevant) is nearer than A (500) on a log scale
    assert est["evaluation"]["bench_case"] == "B"
    assert est["evaluation"]["cpu_s"] == pytest.approx(36 * 40.0 * (0.2 ** 2 * 2 + 0.04 ** 2) / 2)
    assert est["evaluation"]["gpu_s"] == pytest.approx(36 * 4.0 * (0.2 ** 2 * 2 + 0.04 ** 2))
    assert SC.estimate(cifar_plan, meas, BENCH)["backbones"]["gpu_s"] is None


@pytest.fixture
def page(tmp_path, monkeypatch):
    path = tmp_path / "reproducibility.md"
    shutil.copy(SC.DOC, path)
    monkeypatch.setattr(SC, "DOC", path)
    monkeypatch.setattr(SC, "measure", fake_measure)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    monkeypatch.setattr(SC, "BENCH_JSON", bench)
    return path


def _outside(text):
    head, rest = text.split("<!-- SCALE:START -->", 1)
    return head, rest.split("<!-- SCALE:END -->", 1)[1]


def test_doc_block_rewrite_is_idempotent_and_touches_only_the_block(page, tmp_path):
    before = page.read_text()
    out = tmp_path / "scale.json"
    result = SC.main(["--docs", "--out", str(out)])
    once = page.read_text()
    SC.write_doc_block(result, page)
    assert page.read_text() == once  # the same result renders the same block
    assert _outside(once) == _outside(before)  # the rest of the page byte for byte
    block = once.split("<!-- SCALE:START -->", 1)[1].split("<!-- SCALE:END -->", 1)[0]
    assert "run `make gpu-check`" in block and "no GPU was available here" in block
    assert json.loads(out.read_text())["datasets"].keys() == SC.DATASETS.keys()
    assert not list(tmp_path.glob(".*.tmp*"))


def test_gpu_json_fills_the_gpu_column(page, tmp_path):
    gpu = tmp_path / "gpu_check.json"
    gpu.write_text(json.dumps(GPU))
    result = SC.main(["--readme", "--gpu-json", str(gpu), "--out", str(tmp_path / "scale.json")])
    block = page.read_text().split("<!-- SCALE:START -->", 1)[1].split("<!-- SCALE:END -->", 1)[0]
    assert "run `make gpu-check`" not in block and "Fake GPU" in block
    for d in result["datasets"].values():
        assert all(d["estimate"][s]["gpu_s"] > 0 for s in ("backbones", "embedding", "evaluation"))
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["gpu"]["environment"]["card"] == "Fake GPU"


def test_bad_inputs_name_the_file(tmp_path, page):
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({**GPU, "environment": {"device": "cpu"}}))
    with pytest.raises(ValueError, match="cpu.json was measured on 'cpu', not a GPU"):
        SC.load_gpu(cpu)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"environment": {"device": "cuda"}}))
    with pytest.raises(ValueError, match="other.json is not a gpu_check JSON"):
        SC.load_gpu(other)
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps({**GPU, "config": {"width": 8}}))
    with pytest.raises(ValueError, match="narrow.json was measured with --width 8"):
        SC.load_gpu(narrow)
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="plain.md needs exactly one <!-- SCALE:START -->"):
        SC.write_doc_block({}, no_markers)
    assert no_markers.read_text() == "# nothing here\n"
