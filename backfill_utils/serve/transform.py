"""Transforms of the index: psi, rho or h as a torch module (eval mode, no gradients, in
batches) or a plain callable on float32 numpy arrays (:class:`Transform`).

The compatibility modules :class:`~backfill_utils.compat.modules.ReverseTransform`,
:class:`~backfill_utils.compat.modules.ForwardTransform` and
:class:`~backfill_utils.compat.modules.LearnableEmbedding` (float32, on the CPU) run as
numpy matrix products with each eval-mode BatchNorm folded into the Linear before it;
every other module runs in torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from ..compat.modules import ForwardTransform, LearnableEmbedding, ReverseTransform

# exact types (not subclasses) whose forward the numpy path reproduces
_FAST_TYPES = (ReverseTransform, ForwardTransform, LearnableEmbedding)


def _normalize(z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 ``z`` divided by ``max(norm, 1e-12)``, as ``torch.nn.functional.normalize``."""
    norm = np.sqrt(np.einsum("ij,ij->i", z, z))
    np.maximum(norm, 1e-12, out=norm)
    return np.divide(z, norm[:, None], out=out)


def _state_key(module: nn.Module) -> list:
    """What the folded arrays depend on, compared on every call: the normalisation flags,
    for the module, its ``mlp`` and each layer of it the identity, train flag, number of
    instance attributes (an assigned ``forward`` adds one), forward hooks and BatchNorm
    settings, and for each parameter and buffer its identity, version counter (in-place
    changes, ``load_state_dict``) and data pointer (``.data`` assignment)."""
    key = [module.normalize_input, module.normalize_output]
    add = key.append
    mlp = module._modules["mlp"]
    for mod in (module, mlp, *mlp._modules.values()):
        d = mod.__dict__
        add((id(mod), d["training"], len(d), len(d["_forward_hooks"]) + len(d["_forward_pre_hooks"]),
             d.get("eps"), d.get("track_running_stats")))
        for t in d["_parameters"].values():
            add(t if t is None else (id(t), t._version, t.data_ptr()))
        for t in d["_buffers"].values():
            add(t if t is None else (id(t), t._version, t.data_ptr()))
    return key


def _fold_layers(mods: list) -> list | None:
    """``(W, b, relu)`` per Linear of an ``mlp``'s layers ``mods`` (see :func:`_fold`), or
    None where they are not ``Linear -> BatchNorm1d -> ReLU`` blocks and a last ``Linear``;
    ValueError where a vector's shape does not match its Linear's output."""

    def arr(t: torch.Tensor | None, fill: float, n: int) -> np.ndarray:
        if t is None:
            return np.full(n, fill)
        if tuple(t.shape) != (n,):
            raise ValueError(f"shape {tuple(t.shape)}, not ({n},)")
        return t.detach().numpy().astype(np.float64)

    layers = []
    for i in range(0, len(mods), 3):
        lin = mods[i]
        if type(lin) is not nn.Linear:
            return None
        w = lin.weight.detach().numpy().astype(np.float64)
        n = w.shape[0]
        b = arr(lin.bias, 0.0, n)
        relu = i + 1 < len(mods)
        if relu:
            bn, act = mods[i + 1], mods[i + 2]
            if (type(bn) is not nn.BatchNorm1d or type(act) is not nn.ReLU or bn.training
                    or not bn.track_running_stats or bn.running_mean is None or bn.running_var is None):
                return None
            scale = arr(bn.weight, 1.0, n) / np.sqrt(arr(bn.running_var, 1.0, n) + bn.eps)
            w = w * scale[:, None]
            b = (b - arr(bn.running_mean, 0.0, n)) * scale + arr(bn.bias, 0.0, n)
        layers.append((np.ascontiguousarray(w.T, dtype=np.float32), b.astype(np.float32), relu))
    return layers


def _fold(module: nn.Module) -> tuple | None:
    """The numpy form of a supported module, or None (the module must run in torch).

    Returns ``(layers, normalize_input, normalize_output, residual, held)``: ``layers``
    is a tuple of ``(W, b, relu)`` with ``W`` float32 ``(in, out)`` (the Linear's weight,
    transposed, times the BatchNorm's ``weight / sqrt(running_var + eps)`` per output) and
    ``b`` float32 ``(out,)``; ``held`` keeps every module and tensor of ``module`` alive,
    so the identities in :func:`_state_key` stay unique while these arrays are in use.
    """
    if type(module) not in _FAST_TYPES:
        return None
    mlp = module._modules.get("mlp")
    if type(mlp) is not nn.Sequential:
        return None
    mods = list(mlp._modules.values())
    for mod in (module, mlp, *mods):
        if (mod._forward_hooks or mod._forward_pre_hooks
                or any(name in mod.__dict__ for name in ("forward", "_prep", "_finish"))):
            return None
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.device.type != "cpu" or t.is_inference() or (t.is_floating_point() and t.dtype != torch.float32)
           for t in tensors) or not all(p.is_floating_point() for p in module.parameters()):
        return None
    if len(mods) < 4 or (len(mods) - 1) % 3:
        return None
    try:
        layers = _fold_layers(mods)
    except ValueError:  # shapes that do not chain (torch raises on them too)
        return None
    if layers is None:
        return None
    dims = [module.d_in] + [w.shape[1] for w, _, _ in layers]
    if any(w.shape[0] != d for (w, _, _), d in zip(layers, dims)) or dims[-1] != module.d_out:
        return None
    residual = type(module) is LearnableEmbedding
    if residual and module.d_out != module.d_in:
        return None
    held = (module, mlp, *mods, *tensors)
    return tuple(layers), bool(module.normalize_input), bool(module.normalize_output), residual, held


def _forward(x: np.ndarray, layers: tuple, normalize_input: bool, normalize_output: bool,
             residual: bool) -> np.ndarray:
    """The module's forward on float32 ``x`` with folded ``layers``; a new float32 array."""
    z = _normalize(x) if normalize_input else x
    h = z
    for w, b, relu in layers:
        h = h @ w  # a new array: x is never written
        h += b
        if relu:
            np.maximum(h, 0, out=h)
    if residual:
        h += z
    return _normalize(h, out=h) if normalize_output else h


class Transform:
    """An embedding transform (psi, rho, h): a torch module or a numpy callable.

    A ``torch.nn.Module`` is put in eval mode and run without gradients
    (``torch.inference_mode``) in batches of ``batch_size`` rows, on the device
    and in the dtype its first parameter has at construction; a module returning a tuple (e.g.
    :class:`~backfill_utils.compat.modules.FastFillTransform`) gives its first output. Any
    other callable is called on the whole float32 ``(n, d_in)`` array and must
    return an ``(n, d_out)`` array or tensor. The output dimension is found by
    applying the transform to two fixed unit vectors at construction. The
    module is shared with the caller, not copied: do not train it while it serves.

    With ``fast=True`` (the default) a module whose type is exactly
    :class:`~backfill_utils.compat.modules.ReverseTransform`,
    :class:`~backfill_utils.compat.modules.ForwardTransform` or
    :class:`~backfill_utils.compat.modules.LearnableEmbedding`, with float32 parameters
    on the CPU, an ``mlp`` of ``Linear -> BatchNorm1d -> ReLU`` blocks and a last
    ``Linear``, BatchNorm with running statistics, no forward hooks, runs as numpy
    float32 matrix products on inputs of up to :attr:`FAST_MAX_ROWS` rows (in batches of
    ``batch_size`` rows; larger inputs run in torch), with each BatchNorm
    (eval mode: running statistics) folded into the Linear before it. Its output
    differs from torch's by float32 rounding only (a few 1e-7 on unit-length outputs). The folded
    arrays are rebuilt whenever a parameter or buffer of the module changed (in place,
    by ``load_state_dict``, or replaced), or its layers, flags or modes did; if the
    module no longer has the supported form it runs in torch from then on. ``fast``
    says whether the numpy path is in use; set it to False to run in torch.
    """

    #: The numpy path serves batches up to this many rows, where torch's per-call cost
    #: dominates; larger batches run in torch, whose own threads (``torch.set_num_threads``)
    #: are not contended by numpy's BLAS threads.
    FAST_MAX_ROWS = 64

    def __init__(self, fn: Callable, name: str, d_in: int, batch_size: int = 4096, fast: bool = True) -> None:
        if not callable(fn):
            raise TypeError(f"{name} must be a torch module or a callable on numpy arrays, got {type(fn).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fn, self.name, self.d_in, self.batch_size = fn, name, int(d_in), int(batch_size)
        self.is_module = isinstance(fn, torch.nn.Module)
        self._device, self._dtype = torch.device("cpu"), torch.float32
        self._folded: tuple | None = None  # (state key, _fold's result)
        if self.is_module:
            fn.eval()
            p = next(iter(fn.parameters()), None)
            if p is not None and p.is_floating_point():
                self._device, self._dtype = p.device, p.dtype
        self.fast = bool(fast) and self.is_module and type(fn) in _FAST_TYPES
        probe = np.random.default_rng(0).standard_normal((2, self.d_in)).astype(np.float32)
        probe /= np.linalg.norm(probe, axis=1, keepdims=True)
        try:
            out = self._run(probe)
        except Exception as exc:
            raise ValueError(
                f"{name} could not be applied to a (2, {self.d_in}) float32 input: {exc}; it must take "
                f"embeddings of dimension {self.d_in}") from exc
        if out.ndim != 2 or out.shape[0] != 2:
            raise ValueError(f"{name} must map (n, {self.d_in}) to (n, d_out); it returned shape {out.shape}")
        self.d_out = int(out.shape[1])

    def _run_fast(self, x: np.ndarray) -> np.ndarray | None:
        """The numpy path on ``x``, or None where the module must run in torch."""
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return None
        module = self.fn
        try:
            key = _state_key(module)
        except (AttributeError, KeyError, RuntimeError):  # no mlp, or tensors without a version
            self.fast = False
            return None
        state = self._folded
        if state is None or state[0] != key:
            folded = _fold(module)
            if folded is None:
                self.fast = False
                return None
            state = self._folded = (key, folded)
        layers, norm_in, norm_out, residual, _ = state[1]
        if x.shape[1] != layers[0][0].shape[0]:
            return None  # torch names the wrong dimension
        n, bs = len(x), self.batch_size
        if n <= bs:
            return _forward(x, layers, norm_in, norm_out, residual)
        out = np.empty((n, layers[-1][0].shape[1]), np.float32)
        for start in range(0, n, bs):
            out[start:start + bs] = _forward(x[start:start + bs], layers, norm_in, norm_out, residual)
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.is_module:
            out = self.fn(x)
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().float().numpy()
            return np.asarray(out)
        module = self.fn
        if module.training:
            module.eval()
        if self.fast and len(x) <= self.FAST_MAX_ROWS and x.dtype == np.float32 and x.ndim == 2:
            out = self._run_fast(x)
            if out is not None:
                return out
        plain = self._device.type == "cpu" and self._dtype == torch.float32  # no conversions (the usual case)
        parts = []
        with torch.inference_mode():
            for start in range(0, max(len(x), 1), self.batch_size):
                chunk = x[start:start + self.batch_size]
                t = torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy())
                out = module(t if plain else t.to(self._device, self._dtype))
                out = out[0] if isinstance(out, (tuple, list)) else out
                parts.append(out.numpy() if plain and out.dtype == torch.float32 and out.device.type == "cpu"
                             else out.detach().float().cpu().numpy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply to checked float32 ``(n, d_in)`` input; float32 C-contiguous output."""
        out = self._run(x)
        if out.shape != (len(x), self.d_out):
            raise ValueError(f"{self.name} returned shape {out.shape} for {len(x)} inputs; expected "
                             f"({len(x)}, {self.d_out})")
        out = np.ascontiguousarray(out, dtype=np.float32)
        if out.size and not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
            raise ValueError(f"{self.name} returned NaN or inf for {len(bad)} rows (first: {bad[:5].tolist()})")
        return out
