"""Training: resume after an interruption, DDP on CPU, models."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from backfill_utils import models as M
from backfill_utils import train as TR
from conftest import tiny_profile


class Interrupted(RuntimeError):
    pass


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    spec = TR.model_spec(tiny_profile(), "extended", "new")
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "a"))
    reference = _state(TR.train(spec, progress=False))

    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "b"))
    seen = []

    def stop_after_first_epoch(epoch, row):
        seen.append(epoch)
        if epoch == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        TR.train(spec, progress=False, callback=stop_after_first_epoch)
    folder = TR.model_dir(spec)
    assert (folder / "checkpoint.pt").is_file() and not (folder / "model.pt").exists()
    assert not list(folder.glob("*.tmp*")), "a temporary file was left behind"

    resumed = _state(TR.train(spec, progress=False, callback=stop_after_first_epoch))
    assert seen == [0, 1, 2], "the re-run must start at epoch 1, not from scratch"
    assert not (folder / "checkpoint.pt").exists()
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    hist = TR.load_history(spec)
    assert list(hist["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_differs(tmp_path, monkeypatch):
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16})
    spec = TR.model_spec(cfg, "extended", "old")
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "a"))
    a = _state(TR.train(spec, progress=False))
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "b"))
    b = _state(TR.train(spec, progress=False))
    c = _state(TR.train(dict(spec, seed=spec["seed"] + 10), progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_finished_model_is_loaded_not_retrained(tmp_cache, monkeypatch):
    spec = TR.model_spec(tiny_profile(train={"epochs": 1, "batch_size": 16}), "extended", "old")
    first = _state(TR.train(spec, progress=False))
    monkeypatch.setattr(TR, "build_train_dataset", lambda *a, **k: pytest.fail("retrained"))
    second = _state(TR.train(spec, progress=False))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_specs_follow_the_protocol():
    cfg = tiny_profile()
    old = TR.model_spec(cfg, "extended", "old")
    new = TR.model_spec(cfg, "extended", "new")
    het = TR.model_spec(cfg, "heterogeneous", "new")
    bct = TR.model_spec(cfg, "extended", "bct")
    assert old["num_classes"] == 2 and new["num_classes"] == 4
    assert het["model"]["width"] == 8 and new["model"]["width"] == 4
    assert TR.model_spec(cfg, "heterogeneous", "old") == old
    assert bct["bct"]["old"] == old
    opn = TR.model_spec(tiny_profile(open_fraction=0.25), "open", "new")
    assert opn["num_classes"] < new["num_classes"]
    with pytest.raises(ValueError, match="role"):
        TR.model_spec(cfg, "extended", "newest")
    with pytest.raises(ValueError, match="setting"):
        TR.model_spec(cfg, "closed", "new")


@pytest.mark.slow
def test_bct_trains_through_the_frozen_old_classifier(tmp_cache):
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16})
    old = TR.train(TR.model_spec(cfg, "extended", "old"), progress=False)
    before = _state(old)
    bct = TR.train(TR.model_spec(cfg, "extended", "bct"), progress=False)
    after = _state(TR.load_model(TR.model_spec(cfg, "extended", "old")))
    assert all(torch.equal(before[k], after[k]) for k in before), "old model must stay frozen"
    assert isinstance(bct, M.EmbeddingNet)


@pytest.mark.slow
def test_two_process_ddp_training_on_cpu(tmp_path):
    spec = TR.model_spec(tiny_profile(train={"epochs": 2, "batch_size": 16}), "extended", "new")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, BACKFILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "backfill_utils.train", "--spec", str(spec_file), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "cache" / "models" / os.path.basename(str(TR.model_dir(spec)))
    assert (folder / "model.pt").is_file()
    hist = pd.read_csv(folder / "history.csv")
    assert list(hist["epoch"]) == [1, 2]
    # 2 processes x 8 samples per step = the global batch of 16
    assert "gloo" not in proc.stderr.lower() or "error" not in proc.stderr.lower()


def test_model_shapes_and_normalisation():
    m = M.EmbeddingNet("resnet18", num_classes=5, embedding_dim=12, width=4, small_stem=True).eval()
    with torch.no_grad():
        z, logits = m(torch.randn(3, 3, 32, 32))
    assert z.shape == (3, 12) and logits.shape == (3, 5)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    rebuilt = M.build_model(m.config)
    assert M.count_parameters(rebuilt) == M.count_parameters(m)
    with pytest.raises(ValueError, match="arch"):
        M.EmbeddingNet("vgg", num_classes=5)


def test_full_width_trunk_matches_torchvision():
    from torchvision.models import resnet18, resnet50

    for ours, theirs in [("resnet18", resnet18), ("resnet50", resnet50)]:
        trunk = M.ResNetTrunk(ours, width=64, small_stem=False)
        ref = theirs()
        ref_params = M.count_parameters(ref) - M.count_parameters(ref.fc)
        assert M.count_parameters(trunk) == ref_params
