"""Transform's numpy path for ReverseTransform, ForwardTransform and LearnableEmbedding:
the same output as torch's (up to float32 rounding), torch for every other module, and
the folded arrays following the module's weights when they change."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backfill_utils.compat import modules as K
from backfill_utils.serve.transform import Transform

# float32 rounding of a few products of width <= 256: the largest difference seen on unit
# inputs was 2.4e-7 (unit outputs) and 2.9e-6 on outputs of magnitude 5.6 (both
# normalisations off, Gaussian inputs); the tolerance scales with the output's magnitude.
TOL = 3e-6

KINDS = [(K.ReverseTransform, (24, 16)), (K.ForwardTransform, (16, 24)), (K.LearnableEmbedding, (24,))]


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    """``module`` with random Linear weights (LearnableEmbedding's last one too) and
    BatchNorm statistics and affine parameters away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / mod.in_features ** 0.5)
                if mod.bias is not None:
                    mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, nn.BatchNorm1d):
                n = mod.num_features
                mod.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                mod.running_var.copy_(0.2 + 1.8 * torch.rand(n, generator=g))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(0.2 * torch.randn(n, generator=g))
    return module


def _inputs(n: int, d: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def _close(fast: np.ndarray, ref: np.ndarray) -> None:
    assert fast.dtype == np.float32 and fast.flags.c_contiguous and fast.shape == ref.shape
    np.testing.assert_allclose(fast, ref, rtol=0, atol=TOL * max(1.0, float(np.abs(ref).max())))


def _pair(module: nn.Module, batch_size: int = 4096) -> tuple[Transform, Transform]:
    fast = Transform(module, "t", module.d_in, batch_size)
    slow = Transform(module, "t", module.d_in, batch_size, fast=False)
    assert fast.fast and not slow.fast
    return fast, slow


@pytest.mark.parametrize("cls,dims", KINDS, ids=[c.__name__ for c, _ in KINDS])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("norm_in", [True, False])
@pytest.mark.parametrize("norm_out", [True, False])
def test_numpy_path_equals_torch(cls, dims, depth, norm_in, norm_out, monkeypatch):
    monkeypatch.setattr(Transform, "FAST_MAX_ROWS", 10**9)  # every batch size in numpy
    module = _randomised(cls(*dims, depth=depth, normalize_input=norm_in, normalize_output=norm_out))
    module.train()  # Transform serves in eval mode: BatchNorm's running statistics
    fast, slow = _pair(module)
    assert not module.training
    xs = [_inputs(n, dims[0], seed=n) for n in (1, 7, 5000)]
    with torch.no_grad():
        refs = [slow(x) for x in xs] + [module(torch.from_numpy(xs[-1])).numpy()]

    def refuse(self, z):
        raise AssertionError("torch's forward ran")

    monkeypatch.setattr(cls, "forward", refuse)  # the numpy path does not call it
    for x, ref in zip(xs + xs[-1:], refs):
        _close(fast(x), ref)
    assert fast.fast


def test_numpy_path_in_batches_and_on_views(monkeypatch):
    monkeypatch.setattr(Transform, "FAST_MAX_ROWS", 10**9)
    module = _randomised(K.ReverseTransform(24, 16, depth=2))
    x = _inputs(1001, 24)
    fast, slow = _pair(module, batch_size=100)
    whole = Transform(module, "t", 24)
    _close(fast(x), slow(x))
    _close(fast(x), whole(x))
    view = x[::3, :]  # a strided, read-only view: not written, nor needed contiguous
    view.flags.writeable = False
    _close(fast(view), slow(view))
    assert fast(x[:0]).shape == (0, 16)


@pytest.mark.parametrize("make", [
    lambda: K.FastFillTransform(24, 16),
    lambda: nn.Sequential(nn.Linear(24, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16)),
    lambda: type("Sub", (K.ReverseTransform,), {})(24, 16),
    lambda: K.SideProjection(24, 16, inner_dim=32),
    lambda: K.ReverseTransform(24, 16).double(),
], ids=["FastFillTransform", "Sequential", "subclass", "SideProjection", "float64"])
def test_other_modules_run_in_torch(make):
    module = _randomised(make())
    t = Transform(module, "t", 24)
    assert not t.fast and t.d_out == 16
    x = _inputs(5, 24)
    with torch.no_grad():
        ref = module(torch.from_numpy(x).to(next(module.parameters()).dtype))
    ref = (ref[0] if isinstance(ref, tuple) else ref).float().numpy()
    np.testing.assert_array_equal(t(x), ref)


def test_unsupported_forms_run_in_torch():
    module = _randomised(K.ReverseTransform(24, 16))
    module.mlp[1] = nn.BatchNorm1d(48, track_running_stats=False)  # batch statistics in eval too
    t = Transform(module, "t", 24)
    assert not t.fast
    x = _inputs(6, 24)
    with torch.no_grad():
        np.testing.assert_array_equal(t(x), module.eval()(torch.from_numpy(x)).numpy())


def test_follows_in_place_changes():
    module = _randomised(K.LearnableEmbedding(24, depth=2))
    fast, slow = _pair(module)
    x = _inputs(3, 24)
    before = fast(x)
    with torch.no_grad():
        module.mlp[0].weight.add_(1.0)
    _close(fast(x), slow(x))
    assert np.abs(fast(x) - before).max() > 1e-2 and fast.fast
    with torch.no_grad():
        module.mlp[4].running_var.mul_(3.0)  # a buffer
    _close(fast(x), slow(x))
    module.normalize_output = False
    _close(fast(x), slow(x))
    module.mlp[1].eps = 0.5
    _close(fast(x), slow(x))


def test_follows_load_state_dict_and_training():
    module = _randomised(K.ReverseTransform(24, 16))
    fast, slow = _pair(module)
    x = _inputs(4, 24)
    fast(x)
    module.load_state_dict(_randomised(K.ReverseTransform(24, 16), seed=5).state_dict())
    _close(fast(x), slow(x))
    with torch.no_grad():
        _close(fast(x), module(torch.from_numpy(x)).numpy())
    # a training step moves weights and BatchNorm's running statistics in place
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    module(torch.from_numpy(_inputs(32, 24, seed=9))).sum().backward()
    opt.step()
    _close(fast(x), slow(x))
    assert not module.training and fast.fast


def test_follows_replaced_parameters_and_layers():
    module = _randomised(K.ForwardTransform(16, 24))
    fast, slow = _pair(module)
    x = _inputs(4, 16)
    fast(x)
    module.mlp[-1].weight = nn.Parameter(torch.randn(24, 32))
    _close(fast(x), slow(x))
    module.mlp[0].bias.data = torch.randn(32)
    _close(fast(x), slow(x))
    module.mlp[-1] = nn.Linear(32, 24)
    _close(fast(x), slow(x))
    assert fast.fast
    module.mlp[1].train()  # BatchNorm on batch statistics: torch's forward, from then on
    _close(fast(x), slow(x))
    assert not fast.fast


def test_follows_hooks_and_dtype_changes():
    module = _randomised(K.ReverseTransform(24, 16))
    fast, slow = _pair(module)
    x = _inputs(4, 24)
    handle = module.mlp[2].register_forward_hook(lambda mod, inp, out: out * 2)
    _close(fast(x), slow(x))
    assert not fast.fast
    handle.remove()
    fast = Transform(module, "t", 24)
    assert fast.fast
    module.double()  # torch serves in the dtype of construction: both paths refuse float64 weights
    for t in (fast, slow):
        with pytest.raises(RuntimeError, match="dtype"):
            t(x)
    assert not fast.fast


def test_wrong_dimension_is_named_by_the_module():
    module = K.ReverseTransform(24, 16)
    with pytest.raises(ValueError, match=r"expects \(n, 24\)"):
        Transform(module, "psi", 20)
    t = Transform(module, "psi", 24)
    with pytest.raises(ValueError, match=r"expects \(n, 24\)"):
        t._run(_inputs(2, 20))


def test_large_batches_run_in_torch(monkeypatch):
    module = _randomised(K.LearnableEmbedding(24))
    fast, slow = _pair(module)
    calls = []
    forward = K.LearnableEmbedding.forward
    monkeypatch.setattr(K.LearnableEmbedding, "forward", lambda self, z: calls.append(len(z)) or forward(self, z))
    small, large = _inputs(Transform.FAST_MAX_ROWS, 24), _inputs(Transform.FAST_MAX_ROWS + 1, 24)
    _close(fast(small), slow(small))
    assert calls == [Transform.FAST_MAX_ROWS]  # only the torch reference ran torch
    _close(fast(large), slow(large))
    assert calls[1:] == [Transform.FAST_MAX_ROWS + 1] * 2
