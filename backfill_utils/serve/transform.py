"""Transforms of the index: psi, rho or h as a torch module (eval mode, no gradients, in
batches) or a plain callable on float32 numpy arrays (:class:`Transform`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch



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
    """

    def __init__(self, fn: Callable, name: str, d_in: int, batch_size: int = 4096) -> None:
        if not callable(fn):
            raise TypeError(f"{name} must be a torch module or a callable on numpy arrays, got {type(fn).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.fn, self.name, self.d_in, self.batch_size = fn, name, int(d_in), int(batch_size)
        self.is_module = isinstance(fn, torch.nn.Module)
        self._device, self._dtype = torch.device("cpu"), torch.float32
        if self.is_module:
            fn.eval()
            p = next(iter(fn.parameters()), None)
            if p is not None and p.is_floating_point():
                self._device, self._dtype = p.device, p.dtype
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

    def _run(self, x: np.ndarray) -> np.ndarray:
        if not self.is_module:
            out = self.fn(x)
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().float().numpy()
            return np.asarray(out)
        module = self.fn
        if module.training:
            module.eval()
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
