"""The profile key ``normalize_embeddings``: L2-normalised embeddings (the default) or raw ones.

The key reaches the backbones' embeddings (``EmbeddingNet.embed``), the cache keys of
what depends on them (``embed.embedding_spec``), the recipes (``normalize``) and the
compatibility modules they build (``normalize_input`` / ``normalize_output``); the
evaluation engine and the serving index rank raw embeddings of realistic norms.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from backfill_utils import config as C
from backfill_utils import embed as E
from backfill_utils import models as M
from backfill_utils import train as TR
from backfill_utils.backfill import registry as MM
from backfill_utils.compat import fit as FIT
from backfill_utils.compat import modules as K
from backfill_utils.compat.recipes import FastFillRecipe, FCTRecipe
from backfill_utils.retrieval import metrics as MT
from backfill_utils.serve.index import OnlineBackfillIndex

MODULES = [
    K.ReverseTransform(d_new=8, d_old=6),
    K.LearnableEmbedding(d=8),
    K.ForwardTransform(d_old=6, d_new=8),
    K.FastFillTransform(d_old=6, d_new=8),
]


def _norms(module: torch.nn.Module, scale: float = 20.0) -> np.ndarray:
    z = scale * torch.randn(16, module.d_in, generator=torch.Generator().manual_seed(0))
    return np.linalg.norm(K.apply(module, z), axis=1)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: type(m).__name__)
def test_normalize_output_round_trips_through_config_and_decides_unit_norm(module):
    assert module.config["normalize_output"] is True
    np.testing.assert_allclose(_norms(module), 1.0, rtol=1e-5)
    raw = K.build_module({**module.config, "normalize_input": False, "normalize_output": False})
    assert raw.config["normalize_output"] is False and K.build_module(raw.config).config == raw.config
    assert K.build_module(raw.config).normalize_output is False
    if isinstance(raw, K.LearnableEmbedding):  # starts as the identity: the input's norms (about 20 sqrt(8))
        assert _norms(raw).min() > 10
    else:
        assert np.abs(_norms(raw) - 1.0).max() > 0.1


def test_a_config_without_normalize_output_rebuilds_a_normalising_module():
    config = {k: v for k, v in K.ForwardTransform(6, 8).config.items() if k != "normalize_output"}
    assert K.build_module(config).normalize_output is True


def test_embedding_net_embeds_raw_or_normalised():
    net = M.EmbeddingNet("resnet18", num_classes=3, embedding_dim=8, width=4, small_stem=False).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unit, raw = net.embed(x), net.embed(x, normalize=False)
    np.testing.assert_allclose(unit.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1))


def test_profile_key_is_checked_and_reaches_recipes_and_cache_keys():
    cfg = C.load_profile("smoke")
    raw = C.load_profile("smoke", overrides={"normalize_embeddings": False})
    assert C.normalize_embeddings(cfg) is True and C.normalize_embeddings(raw) is False
    with pytest.raises(ValueError, match="normalize_embeddings must be true or false"):
        C.load_profile("smoke", overrides={"normalize_embeddings": "no"})
    # the backbones are the same; what is computed from their embeddings is keyed apart
    assert TR.model_spec(cfg, "extended", "old") == TR.model_spec(raw, "extended", "old")
    assert E.embedding_spec(cfg, "extended", "old") == TR.model_spec(cfg, "extended", "old")
    assert E.embedding_spec(raw, "extended", "old") != E.embedding_spec(cfg, "extended", "old")
    for name in ("FCT", "Ours"):
        assert MM.get(name).default_recipe(cfg).normalize is True
        assert MM.get(name).default_recipe(raw).normalize is False


@pytest.mark.slow
def test_get_embeddings_key_differs_by_the_flag(tmp_cache, monkeypatch):
    keys = []
    monkeypatch.setattr(E, "cached_arrays", lambda kind, key, compute, what: keys.append(key))
    for flag in (True, False):
        cfg = C.load_profile("smoke", overrides={"normalize_embeddings": flag})
        E.get_embeddings(cfg, "extended", "new", "test", progress=False)
    assert keys[0] != keys[1] and keys[0]["model"] == TR.model_spec(cfg, "extended", "new")


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [True, False])
def test_recipes_build_modules_with_their_normalisation(normalize):
    g = torch.Generator().manual_seed(0)
    old, new = 5 * torch.randn(64, 6, generator=g), 5 * torch.randn(64, 8, generator=g)
    short = dict(epochs=2, warmup_epochs=1, batch_size=16, hidden=24, normalize=normalize)
    h, _ = FIT.fit_fct(FCTRecipe(**short), old, new, disable=True)
    ff, _ = FIT.fit_fastfill(FastFillRecipe(mu=0.0, **short), old, new, disable=True)
    small, _ = FIT.fit_fct(FCTRecipe(**short, arch="mlp"), old, new, disable=True)
    for m in (h, ff, small):
        assert m.normalize_input is normalize and m.normalize_output is normalize
        assert bool(np.abs(_norms(m) - 1.0).max() < 1e-4) == normalize


def test_engine_and_index_rank_raw_embeddings_of_realistic_norms():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 8)
    emb = (rng.standard_normal((5, 16))[labels] + 0.5 * rng.standard_normal((40, 16))).astype(np.float32)
    emb *= 64  # norms of a few hundred; times a power of two, so every distance scales exactly
    unit = emb / np.float32(64)
    big = MT.evaluate_retrieval(emb, labels, emb, labels, exclude_self=True)
    small = MT.evaluate_retrieval(unit, labels, unit, labels, exclude_self=True)
    assert big["mAP"] == small["mAP"] and big["top1"] == small["top1"]
    index = OnlineBackfillIndex(16, 16)
    index.add_old(np.arange(40), emb)
    _, ids = index.search(emb[:3], k=1)
    assert ids[:, 0].tolist() == [0, 1, 2]
