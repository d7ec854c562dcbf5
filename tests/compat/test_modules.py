"""Tests of backfill_utils.compat.modules: the modules (width, depth), checkpoints, apply and
FastFill's order. Training: tests/compat/test_fit.py and tests/compat/test_recipes.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from compat_problems import single_thread, synthetic  # noqa: F401 (fixture)

from backfill_utils.compat.fit import fit_fastfill, fit_reverse
from backfill_utils.compat.modules import (
    COMPAT_VERSION,
    FastFillTransform,
    ForwardTransform,
    LearnableEmbedding,
    ReverseTransform,
    apply,
    build_module,
    fastfill_order,
    load_module,
    save_module,
)
from backfill_utils.compat.recipes import CMCLPsiRhoRecipe, FastFillRecipe


@pytest.fixture(scope="module")
def data():
    new, old, y, _ = synthetic()
    return new, old, y


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def test_rho_is_identity_at_init():
    torch.manual_seed(0)
    rho = LearnableEmbedding(8)
    assert torch.equal(rho.mlp[-1].weight, torch.zeros(8, 16))
    assert torch.equal(rho.mlp[-1].bias, torch.zeros(8))
    z = F.normalize(torch.randn(10, 8), dim=1)
    for mode in (True, False):
        rho.train(mode)
        out = rho(z)
        assert torch.equal(out, F.normalize(F.normalize(z, dim=1), dim=1))
        assert torch.allclose(out, z, atol=1e-6)
    # raw (non-unit) inputs come out normalised
    assert torch.allclose(rho.eval()(3 * z), z, atol=1e-6)


def test_depth_and_width():
    torch.manual_seed(0)
    for depth in (1, 2, 3):
        psi = ReverseTransform(16, 8, hidden=10, depth=depth)
        linears = [m for m in psi.mlp if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == (
            [(16, 10)] + [(10, 10)] * (depth - 1) + [(10, 8)])
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in psi.mlp) == depth
        ff = FastFillTransform(8, 16, hidden=12, depth=depth)
        assert ff.sigma[0].in_features == 12 and ff(torch.randn(5, 8))[1].shape == (5,)
    # the default is the one-hidden-layer MLP of COMPAT_VERSION 1, parameter for parameter
    assert [k for k in ReverseTransform(16, 8).state_dict()] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.1.weight", "mlp.1.bias", "mlp.1.running_mean",
        "mlp.1.running_var", "mlp.1.num_batches_tracked", "mlp.3.weight", "mlp.3.bias"]
    assert COMPAT_VERSION == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="depth must be a positive integer"):
            ReverseTransform(16, 8, depth=bad)


@pytest.mark.parametrize("cls,args,d_in,d_out", [
    (ReverseTransform, (16, 8), 16, 8),
    (ForwardTransform, (8, 16), 8, 16),
    (FastFillTransform, (8, 16), 8, 16),
    (LearnableEmbedding, (12,), 12, 12),
])
def test_module_shapes_and_unit_outputs(cls, args, d_in, d_out):
    torch.manual_seed(0)
    m = cls(*args)
    assert m.config["hidden"] == 2 * d_in
    x = torch.randn(7, d_in)
    out = m.train()(x)
    emb = out[0] if isinstance(out, tuple) else out
    assert emb.shape == (7, d_out)
    assert torch.allclose(emb.norm(dim=1), torch.ones(7), atol=1e-5)
    if cls is FastFillTransform:
        assert out[1].shape == (7,)
    ev = apply(m, x.numpy(), batch_size=3)
    assert ev.dtype == np.float32 and ev.shape == (7, d_out)
    assert np.allclose(np.linalg.norm(ev, axis=1), 1, atol=1e-5)
    assert m.training  # mode restored by apply
    with pytest.raises(ValueError, match=f"expects {d_in}"):
        apply(m, np.zeros((3, d_in + 1)))


@pytest.mark.slow
def test_config_round_trip_and_checkpoint(tmp_path, data):
    new, old, y = data
    psi, rho, _ = fit_reverse(CMCLPsiRhoRecipe(epochs=2, batch_size=48, depth=2), new, old, y,
                              disable=True)
    ff, _ = fit_fastfill(FastFillRecipe(mu=0.0, epochs=2, batch_size=48, depth=3, arch="mlp", hidden=None,
                                        warmup_epochs=0), old, new, disable=True)
    sp, _ = fit_fastfill(FastFillRecipe(mu=0.0, epochs=2, batch_size=48, hidden=24, warmup_epochs=1), old, new,
                         disable=True)
    for module, x in ((psi, new), (rho, new), (ff, old), (sp, old)):
        rebuilt = build_module(module.config)
        assert type(rebuilt) is type(module) and rebuilt.config == module.config
        pt, js = save_module(module, tmp_path / type(module).__name__)
        assert pt.exists() and js.exists()
        torch.load(pt, weights_only=True)  # plain tensors only
        loaded = load_module(tmp_path / type(module).__name__)
        assert not loaded.training
        for a, b in zip(apply(loaded, x, return_all=True), apply(module, x, return_all=True)):
            np.testing.assert_array_equal(a, b)  # exact: same weights, same process
    with pytest.raises(ValueError, match="not one of"):
        build_module({"type": "Nope"})
    with pytest.raises(ValueError, match="bad arguments"):
        build_module({"type": "ReverseTransform", "d_new": 3})


# --------------------------------------------------------------------------- #
# FastFill's order
# --------------------------------------------------------------------------- #
def test_fastfill_order(data):
    new, old, y = data
    torch.manual_seed(0)
    model = FastFillTransform(8, 16)
    order = fastfill_order(model, old)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(len(old)))
    log_sigma = apply(model, old, return_all=True)[1]
    assert np.all(np.diff(log_sigma[order]) <= 0)
    # constant uncertainty: ties keep index order (stable sort)
    with torch.no_grad():
        model.sigma[-1].weight.zero_()
        model.sigma[-1].bias.fill_(0.5)
    assert np.array_equal(fastfill_order(model, old), np.arange(len(old)))
    with pytest.raises(ValueError, match="no uncertainty"):
        fastfill_order(ForwardTransform(8, 16), old)


