"""Compatibility modules: psi, rho, FCT's / BiCT's h, FastFill; checkpoints; inference.

Modules (small MLPs: ``depth`` hidden layers ``Linear -> BatchNorm1d -> ReLU`` of width
``hidden``, default one layer of width ``2 * d_in``, then a ``Linear``):

* :class:`ReverseTransform` -- psi, new -> old (PAPER.md 2.2); ``phi_rev = psi(phi_new)``.
* :class:`LearnableEmbedding` -- rho, ``rho(z) = z + MLP(z)`` with the last layer
  zero-initialised, so rho starts as the identity (PAPER.md 2.4).
* :class:`ForwardTransform` -- h, old -> new: FCT's transformation (trained towards the
  independent new model) and BiCT's (trained towards the backward-compatible one).
* :class:`FastFillTransform` -- h plus an uncertainty head predicting one
  log-variance per sample; ``forward`` returns ``(embedding, log_sigma)``.
* :class:`SideProjection` -- h as FCT's authors build it (apple/ml-fct
  ``MLP_BN_SIDE_PROJECTION``): two branches, one on the old embedding and one on the side
  information, each ``Linear -> BatchNorm -> ReLU`` twice, concatenated and mixed by
  ``depth`` blocks of width ``inner_dim`` (2048 in their configs) and a final ``Linear``.
  Without a side-information model their code feeds the old embedding itself as side
  information, and so does this module. The 1x1 convolutions of their code act on
  ``(n, d, 1, 1)`` tensors, so they are ``Linear`` layers here (no bias before a
  BatchNorm, as theirs). :class:`FastFillSideProjection` adds FastFill's uncertainty head.

By default every module L2-normalises its input (``normalize_input=True``, a no-op on
the already normalised cached embeddings) and L2-normalises its output inside
``forward`` (``normalize_output=True``), in training as at evaluation: the distance used
at query time is Euclidean on unit vectors, and the losses see exactly what retrieval
will see. With the profile key ``normalize_embeddings: false`` the recipes build modules
with both flags off (raw embeddings in, raw embeddings out).

Each module exposes ``module.config``, a JSON-able dict from which
:func:`build_module` rebuilds it; :func:`save_module` / :func:`load_module` store a
``state_dict`` (``.pt``, loadable with ``torch.load(weights_only=True)``) next to
that config (``.json``). :func:`apply` runs a module on embeddings (numpy out);
:func:`fastfill_order` is FastFill's backfill order.

Training: one recipe object per way of training (:mod:`backfill_utils.compat.recipes`) and
the ``fit_*`` functions of :mod:`backfill_utils.compat.fit`. (The flag interface
``train_reverse`` / ``train_fct`` / ``train_fastfill`` of ``COMPAT_VERSION`` 1 is gone;
that the recipes train bit-identical modules to it was checked against a frozen copy
of the old code when the recipes were introduced, commit 8a7b616.)

A module type of your own (a method that is not in the paper) joins the types that
:func:`build_module` rebuilds with :func:`register_module`; the method registry caches
trained modules through their ``config`` and ``state_dict``.

``COMPAT_VERSION`` goes into cache keys; it is 3 since FCT and FastFill use their
authors' transformation (:class:`SideProjection`) and the recipes gained a warm-up and
the BatchNorm switch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import atomic_write
from .inputs import class_balanced_batches, random_batches, to_tensor

__all__ = [
    "COMPAT_VERSION",
    "ReverseTransform",
    "LearnableEmbedding",
    "ForwardTransform",
    "FastFillTransform",
    "SideProjection",
    "FastFillSideProjection",
    "build_module",
    "register_module",
    "save_module",
    "load_module",
    "apply",
    "fastfill_order",
    "class_balanced_batches",
    "random_batches",
]

COMPAT_VERSION = 3


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def _mlp(d_in: int, hidden: int, d_out: int, depth: int = 1) -> nn.Sequential:
    """``depth`` x (Linear -> BatchNorm1d -> ReLU) of width ``hidden``, then a Linear."""
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=False)]
        width = hidden
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def _check_dims(**dims: int | None) -> None:
    for name, value in dims.items():
        if value is None:
            continue
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _CompatModule(nn.Module):
    """Common parts: input/output dims, input and output normalisation, the JSON config."""

    d_in: int
    d_out: int

    def _prep(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(
                f"{type(self).__name__} expects (n, {self.d_in}) inputs, got {tuple(z.shape)}"
            )
        return F.normalize(z, dim=1) if self.normalize_input else z

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.normalize_output else z

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``build_module(m.config)`` rebuilds ``m``."""
        return {"type": type(self).__name__, **self._kwargs}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._kwargs.items())


class _MLPTransform(_CompatModule):
    """An MLP from one embedding space to another, unit-length output unless
    ``normalize_output=False``.

    Subclasses name the two dimensions (``_dim_names``) as their constructors do,
    so that ``config`` rebuilds them through :func:`build_module`.
    """

    _dim_names: tuple[str, str] = ("d_in", "d_out")

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None,
                 normalize_input: bool = True, depth: int = 1, normalize_output: bool = True) -> None:
        super().__init__()
        a, b = self._dim_names
        _check_dims(**{a: d_in, b: d_out, "hidden": hidden, "depth": depth})
        hidden = int(hidden or 2 * d_in)
        self._kwargs = {a: int(d_in), b: int(d_out), "hidden": hidden,
                        "normalize_input": bool(normalize_input), "depth": int(depth),
                        "normalize_output": bool(normalize_output)}
        self.d_in, self.d_out, self.normalize_input = int(d_in), int(d_out), bool(normalize_input)
        self.normalize_output = bool(normalize_output)
        self.mlp = _mlp(self.d_in, hidden, self.d_out, int(depth))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._finish(self.mlp(self._prep(z)))


class ReverseTransform(_MLPTransform):
    """psi: new embedding (``d_new``) -> old space (``d_old``), unit-length output."""

    _dim_names = ("d_new", "d_old")

    def __init__(self, d_new: int, d_old: int, hidden: int | None = None,
                 normalize_input: bool = True, depth: int = 1, normalize_output: bool = True) -> None:
        super().__init__(d_new, d_old, hidden, normalize_input, depth, normalize_output)


class LearnableEmbedding(_CompatModule):
    """rho: ``z -> normalize(z + MLP(z))`` (``z + MLP(z)`` with ``normalize_output=False``);
    the MLP's last Linear starts at zero, so at initialisation ``rho(z) == normalize(z)``
    (``== z`` for unit ``z``, or with both normalisations off)."""

    def __init__(self, d: int, hidden: int | None = None, normalize_input: bool = True,
                 depth: int = 1, normalize_output: bool = True) -> None:
        super().__init__()
        _check_dims(d=d, hidden=hidden, depth=depth)
        hidden = int(hidden or 2 * d)
        self._kwargs = dict(d=int(d), hidden=hidden, normalize_input=bool(normalize_input),
                            depth=int(depth), normalize_output=bool(normalize_output))
        self.d_in = self.d_out = int(d)
        self.normalize_input, self.normalize_output = bool(normalize_input), bool(normalize_output)
        self.mlp = _mlp(self.d_in, hidden, self.d_out, int(depth))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self._prep(z)
        return self._finish(z + self.mlp(z))


class ForwardTransform(_MLPTransform):
    """h: old embedding (``d_old``) -> new space (``d_new``), unit-length output
    (normalised inside ``forward``, in training and at evaluation, unless
    ``normalize_output=False``). FCT's transformation, and BiCT's when the new space is
    the backward-compatible model's."""

    _dim_names = ("d_old", "d_new")

    def __init__(self, d_old: int, d_new: int, hidden: int | None = None,
                 normalize_input: bool = True, depth: int = 1, normalize_output: bool = True) -> None:
        super().__init__(d_old, d_new, hidden, normalize_input, depth, normalize_output)


class FastFillTransform(ForwardTransform):
    """FastFill: h (old -> new, unit-length output unless ``normalize_output=False``)
    plus an uncertainty head on h's last hidden features predicting one log-variance per
    sample (``Linear(hidden, hidden // 2) -> ReLU -> Linear(., 1)``).

    ``forward(z)`` returns ``(embedding (n, d_new), log_sigma (n,))``.
    """

    def __init__(self, d_old: int, d_new: int, hidden: int | None = None,
                 normalize_input: bool = True, depth: int = 1, normalize_output: bool = True) -> None:
        super().__init__(d_old, d_new, hidden, normalize_input, depth, normalize_output)
        hidden = self._kwargs["hidden"]
        half = max(1, hidden // 2)
        self.sigma = nn.Sequential(nn.Linear(hidden, half), nn.ReLU(), nn.Linear(half, 1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._prep(z)
        feat = self.mlp[:-1](z)
        emb = self._finish(self.mlp[-1](feat))
        return emb, self.sigma(feat).squeeze(1)


def _block(d_in: int, d_out: int) -> list[nn.Module]:
    """ml-fct's ``ConvBlock`` on a 1x1 map: ``Linear (no bias) -> BatchNorm -> ReLU``."""
    return [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=False)]


class SideProjection(_CompatModule):
    """FCT's transformation as its authors build it, old (``d_old``) -> new (``d_new``),
    unit-length output (unless ``normalize_output=False``); the side information is the old
    embedding itself.

    ``p1`` and ``p2``: ``d -> 2 d -> 2 d_new`` (``d`` = ``d_old``), concatenated to
    ``4 d_new``; ``mixer``: ``depth`` blocks of width ``inner_dim``, then
    ``Linear(inner_dim, d_new)``. With the authors' values (``inner_dim=2048``,
    ``depth=2``) at 128 dimensions it has 5,712,000 parameters.

    >>> sum(p.numel() for p in SideProjection(128, 128).parameters())
    5712000
    """

    def __init__(self, d_old: int, d_new: int, inner_dim: int = 2048, normalize_input: bool = True,
                 depth: int = 2, normalize_output: bool = True) -> None:
        super().__init__()
        _check_dims(d_old=d_old, d_new=d_new, inner_dim=inner_dim, depth=depth)
        self._kwargs = {"d_old": int(d_old), "d_new": int(d_new), "inner_dim": int(inner_dim),
                        "normalize_input": bool(normalize_input), "depth": int(depth),
                        "normalize_output": bool(normalize_output)}
        self.d_in, self.d_out, self.normalize_input = int(d_old), int(d_new), bool(normalize_input)
        self.normalize_output = bool(normalize_output)
        d, e, w = self.d_in, self.d_out, int(inner_dim)
        self.p1 = nn.Sequential(*_block(d, 2 * d), *_block(2 * d, 2 * e))
        self.p2 = nn.Sequential(*_block(d, 2 * d), *_block(2 * d, 2 * e))
        layers, width = [], 4 * e
        for _ in range(int(depth)):
            layers += _block(width, w)
            width = w
        self.mixer = nn.Sequential(*layers, nn.Linear(width, e))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """The mixer's last hidden features (width ``inner_dim``)."""
        z = self._prep(z)
        return self.mixer[:-1](torch.cat([self.p1(z), self.p2(z)], dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._finish(self.mixer[-1](self.features(z)))


class FastFillSideProjection(SideProjection):
    """:class:`SideProjection` plus FastFill's uncertainty head as its authors build it
    (ml-fct ``MLP_BN_SIDE_PROJECTION_SIGMA``): one ``Linear(d_new, 1)`` on the transformed
    feature (the mixer's output, before the normalisation). ``forward(z)`` returns
    ``(embedding, log_sigma)``."""

    def __init__(self, d_old: int, d_new: int, inner_dim: int = 2048, normalize_input: bool = True,
                 depth: int = 2, normalize_output: bool = True) -> None:
        super().__init__(d_old, d_new, inner_dim, normalize_input, depth, normalize_output)
        self.sigma = nn.Linear(int(d_new), 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mixer[-1](self.features(z))
        return self._finish(out), self.sigma(out).squeeze(1)


_REGISTRY: dict[str, type[_CompatModule]] = {
    cls.__name__: cls
    for cls in (ReverseTransform, LearnableEmbedding, ForwardTransform, FastFillTransform,
                SideProjection, FastFillSideProjection)
}


def register_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Let :func:`build_module` rebuild modules of type ``cls`` (usable as a decorator).

    ``cls`` must be a ``torch.nn.Module`` whose instances have a ``config`` dict
    ``{"type": cls.__name__, **constructor keyword arguments}``. A class defined again
    (a notebook cell run twice) replaces itself; another class under a name already
    taken is an error.

    >>> class Scale(nn.Module):
    ...     def __init__(self, d: int):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.ones(d))
    ...         self.config = {"type": "Scale", "d": d}
    ...     def forward(self, z):
    ...         return z * self.w
    >>> _ = register_module(Scale)
    >>> type(build_module({"type": "Scale", "d": 3})).__name__
    'Scale'
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_module takes a torch.nn.Module subclass, got {cls!r}")
    name = cls.__name__
    known = _REGISTRY.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a module type named {name!r} is already registered ({known}); rename {cls}")
    _REGISTRY[name] = cls
    return cls


def build_module(config: dict[str, Any]) -> nn.Module:
    """Rebuild a (freshly initialised) module from its ``module.config`` dict.

    >>> m = build_module({"type": "ReverseTransform", "d_new": 8, "d_old": 4, "depth": 2})
    >>> build_module(m.config).config == m.config
    True
    """
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in _REGISTRY:
        raise ValueError(f"config type {kind!r} is not one of {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[kind](**config)
    except TypeError as exc:
        raise ValueError(f"bad arguments for {kind} in config {config}: {exc}") from None


def save_module(module: nn.Module, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``module.state_dict()`` to ``<path>.pt`` and ``module.config`` to
    ``<path>.json`` (each atomically); returns the two paths."""
    path = Path(path)
    pt, js = path.with_suffix(".pt"), path.with_suffix(".json")
    pt.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(js, lambda p: p.write_text(json.dumps(module.config, indent=2, sort_keys=True)))
    atomic_write(pt, lambda p: torch.save(module.state_dict(), p))
    return pt, js


def load_module(path: str | os.PathLike) -> nn.Module:
    """Inverse of :func:`save_module`; the module is returned in eval mode."""
    path = Path(path)
    module = build_module(json.loads(path.with_suffix(".json").read_text()))
    module.load_state_dict(torch.load(path.with_suffix(".pt"), weights_only=True))
    return module.eval()


# --------------------------------------------------------------------------- #
# inference
# --------------------------------------------------------------------------- #
def apply(
    module: nn.Module,
    emb: Any,
    batch_size: int = 4096,
    return_all: bool = False,
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Run ``module`` on ``(n, d)`` embeddings in eval mode without gradients and
    return a float32 numpy array.

    For a module returning a tuple (:class:`FastFillTransform`) the first output (the
    embedding) is returned, or every output as a tuple of arrays with
    ``return_all=True``. The module's train/eval mode is restored afterwards.
    """
    x = to_tensor(emb, "emb")
    if x.ndim != 2:
        raise ValueError(f"emb must be (n, d), got shape {tuple(x.shape)}")
    d_in = getattr(module, "d_in", None)
    if d_in is not None and x.shape[1] != d_in:
        raise ValueError(
            f"emb has {x.shape[1]} dimensions but {type(module).__name__} expects {d_in}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = module.training
    module.eval()
    outs: list[list[np.ndarray]] = []
    try:
        with torch.no_grad():
            for start in range(0, max(x.shape[0], 1), batch_size):
                out = module(x[start:start + batch_size])
                out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
                outs.append([o.detach().cpu().numpy().astype(np.float32, copy=False) for o in out])
    finally:
        module.train(was_training)
    arrays = tuple(np.concatenate(parts, axis=0) for parts in zip(*outs))
    return arrays if return_all else arrays[0]


def fastfill_order(model: nn.Module, old_gallery_emb: Any, batch_size: int = 4096) -> np.ndarray:
    """Backfill order of FastFill: gallery indices by descending predicted
    uncertainty (log-variance); a stable sort, so ties keep ascending index."""
    out = apply(model, old_gallery_emb, batch_size=batch_size, return_all=True)
    if len(out) < 2:
        raise ValueError(f"{type(model).__name__} has no uncertainty output; use a FastFillTransform")
    log_sigma = out[1].reshape(-1)
    return np.argsort(-log_sigma, kind="stable").astype(np.int64)
