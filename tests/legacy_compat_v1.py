"""Frozen reference: the training code of ``backfill_utils.compat`` as of commit d801979
(COMPAT_VERSION 1), before the recipe objects of issue 9.

Used only by ``tests/test_recipes.py`` to check that training with a recipe equal to the
old defaults gives bit-identical modules. Do not edit: it is the yardstick, not a
library. Only the module registry, checkpoints, ``apply`` and ``fastfill_order`` were
left out; the rest is unchanged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from backfill_utils.losses import (
    CMCL_VARIANTS,
    DISTANCES,
    cmcl_loss,
    heteroscedastic_loss,
    reverse_loss,
)


# --------------------------------------------------------------------------- #
# modules
# --------------------------------------------------------------------------- #
def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=False),
        nn.Linear(hidden, d_out),
    )


def _check_dims(**dims: int | None) -> None:
    for name, value in dims.items():
        if value is None:
            continue
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _CompatModule(nn.Module):
    """Common parts: input/output dims, input normalisation, the JSON config."""

    d_in: int
    d_out: int

    def _prep(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.d_in:
            raise ValueError(
                f"{type(self).__name__} expects (n, {self.d_in}) inputs, got {tuple(z.shape)}"
            )
        return F.normalize(z, dim=1) if self.normalize_input else z

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments; ``build_module(m.config)`` rebuilds ``m``."""
        return {"type": type(self).__name__, **self._kwargs}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._kwargs.items())


class _MLPTransform(_CompatModule):
    """A 2-layer MLP from one embedding space to another, unit-length output.

    Subclasses name the two dimensions (``_dim_names``) as their constructors do,
    so that ``config`` rebuilds them through :func:`build_module`.
    """

    _dim_names: tuple[str, str] = ("d_in", "d_out")

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None,
                 normalize_input: bool = True) -> None:
        super().__init__()
        a, b = self._dim_names
        _check_dims(**{a: d_in, b: d_out, "hidden": hidden})
        hidden = int(hidden or 2 * d_in)
        self._kwargs = {a: int(d_in), b: int(d_out), "hidden": hidden,
                        "normalize_input": bool(normalize_input)}
        self.d_in, self.d_out, self.normalize_input = int(d_in), int(d_out), bool(normalize_input)
        self.mlp = _mlp(self.d_in, hidden, self.d_out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(self._prep(z)), dim=1)


class ReverseTransform(_MLPTransform):
    """psi: new embedding (``d_new``) -> old space (``d_old``), unit-length output."""

    _dim_names = ("d_new", "d_old")

    def __init__(self, d_new: int, d_old: int, hidden: int | None = None,
                 normalize_input: bool = True) -> None:
        super().__init__(d_new, d_old, hidden, normalize_input)


class LearnableEmbedding(_CompatModule):
    """rho: ``z -> normalize(z + MLP(z))``; the MLP's last Linear starts at zero, so
    at initialisation ``rho(z) == normalize(z)`` (``== z`` for unit ``z``)."""

    def __init__(self, d: int, hidden: int | None = None, normalize_input: bool = True) -> None:
        super().__init__()
        _check_dims(d=d, hidden=hidden)
        hidden = int(hidden or 2 * d)
        self._kwargs = dict(d=int(d), hidden=hidden, normalize_input=bool(normalize_input))
        self.d_in = self.d_out = int(d)
        self.normalize_input = bool(normalize_input)
        self.mlp = _mlp(self.d_in, hidden, self.d_out)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = self._prep(z)
        return F.normalize(z + self.mlp(z), dim=1)


class ForwardTransform(_MLPTransform):
    """FCT's h: old embedding (``d_old``) -> new space (``d_new``), unit-length output
    (normalised inside ``forward``, in training and at evaluation)."""

    _dim_names = ("d_old", "d_new")

    def __init__(self, d_old: int, d_new: int, hidden: int | None = None,
                 normalize_input: bool = True) -> None:
        super().__init__(d_old, d_new, hidden, normalize_input)


class FastFillTransform(ForwardTransform):
    """FastFill: h (old -> new, unit-length output) plus an uncertainty head on h's
    hidden features predicting one log-variance per sample.

    ``forward(z)`` returns ``(embedding (n, d_new), log_sigma (n,))``.
    """

    def __init__(self, d_old: int, d_new: int, hidden: int | None = None,
                 normalize_input: bool = True) -> None:
        super().__init__(d_old, d_new, hidden, normalize_input)
        hidden = self._kwargs["hidden"]
        half = max(1, hidden // 2)
        self.sigma = nn.Sequential(nn.Linear(hidden, half), nn.ReLU(), nn.Linear(half, 1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self._prep(z)
        feat = self.mlp[:3](z)
        emb = F.normalize(self.mlp[3](feat), dim=1)
        return emb, self.sigma(feat).squeeze(1)




# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _to_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float32)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a numeric array: {exc}") from None
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values; clean the cache first")
    return t


def _as_views(x: Any, name: str, normalize: bool) -> torch.Tensor:
    """``(N, d)`` or ``(P, N, d)`` -> float32 tensor ``(P, N, d)``."""
    t = _to_tensor(x, name)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(
            f"{name} must be (N, d) or (P, N, d) for P augmented passes, got shape {tuple(t.shape)}"
        )
    return F.normalize(t, dim=2) if normalize else t.contiguous()


def _pair_views(a: Any, b: Any, names: tuple[str, str], normalize: bool):
    va, vb = _as_views(a, names[0], normalize), _as_views(b, names[1], normalize)
    if va.shape[1] != vb.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold the same samples: got "
            f"{va.shape[1]} and {vb.shape[1]} rows"
        )
    if va.shape[0] != vb.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold the same number of augmented passes: "
            f"got {va.shape[0]} and {vb.shape[0]}"
        )
    if va.shape[1] < 2:
        raise ValueError(f"need at least 2 training samples, got {va.shape[1]}")
    return va, vb


def _as_labels(labels: Any, n: int) -> torch.Tensor:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a 1-D array of length {n} (one per sample), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return torch.as_tensor(y.astype(np.int64))


def _draw_passes(n_passes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented pass per sample for this epoch."""
    if n_passes == 1:
        return np.zeros(n, dtype=np.int64)
    return rng.integers(0, n_passes, size=n)


def _gather(views: torch.Tensor, passes: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of ``views``, each taken from the pass drawn for that sample."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    return views[torch.as_tensor(passes[idx], dtype=torch.long), idx_t]


def _output_dim(module: nn.Module, d_in: int, name: str) -> int:
    """Output dimension of ``module`` for ``d_in`` inputs, by a dry run in eval mode."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.ones(2, d_in))
    except Exception as exc:  # noqa: BLE001 - report which module rejected which input
        raise ValueError(f"{name} cannot take ({d_in})-dimensional inputs: {exc}") from None
    finally:
        module.train(was_training)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return int(out.shape[1])


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #
def class_balanced_batches(
    labels: np.ndarray | torch.Tensor,
    batch_size: int,
    samples_per_class: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """One epoch of class-balanced batches (indices into ``labels``).

    Each batch draws ``P = min(batch_size // samples_per_class, n_classes)`` distinct
    classes at random and ``K = samples_per_class`` samples of each without
    replacement (all of a class's samples when it has fewer than ``K``), so that
    every anchor has positives in both systems. ``max(1, N // batch_size)`` batches.
    """
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    classes, inverse = np.unique(y, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
    p = min(max(1, batch_size // samples_per_class), len(classes))
    if p < 2 and len(classes) >= 2:
        raise ValueError(
            f"batch_size={batch_size} with samples_per_class={samples_per_class} gives "
            f"fewer than 2 classes per batch, so no negatives: raise batch_size"
        )
    n_batches = max(1, len(y) // batch_size)
    batches = []
    for _ in range(n_batches):
        chosen = rng.choice(len(classes), size=p, replace=False)
        parts = []
        for c in chosen:
            m = members[c]
            k = min(samples_per_class, len(m))
            parts.append(rng.choice(m, size=k, replace=False))
        batches.append(np.concatenate(parts))
    return batches


def random_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled batches covering ``range(n)`` once; a trailing batch
    of a single sample joins the previous one (BatchNorm needs two)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (BatchNorm), got {batch_size}")
    perm = rng.permutation(n)
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        last = batches.pop()
        batches[-1] = np.concatenate([batches[-1], last])
    return batches


def _n_random_batches(n: int, batch_size: int) -> int:
    k = math.ceil(n / batch_size)
    return k - 1 if k > 1 and n - (k - 1) * batch_size < 2 else k


# --------------------------------------------------------------------------- #
# the training loop
# --------------------------------------------------------------------------- #
def _check_hparams(epochs: int, batch_size: int, lr: float, optimizer: str) -> None:
    if int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def _fit(
    modules: Sequence[nn.Module],
    make_batches: Callable[[np.random.Generator], list[np.ndarray]],
    steps_per_epoch: int,
    step_loss: Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]],
    n_passes: int,
    n: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    optimizer: str,
    rng: np.random.Generator,
    disable: bool,
    desc: str,
) -> pd.DataFrame:
    params = [p for m in modules for p in m.parameters()]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    rows = []
    bar = tqdm(range(epochs), desc=desc, disable=disable)
    for epoch in bar:
        for m in modules:
            m.train()
        passes = _draw_passes(n_passes, n, rng)
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        for idx in make_batches(rng):
            terms = step_loss(idx, passes)
            loss = terms["loss"]
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"{desc}: non-finite loss at epoch {epoch}; lower lr or check the inputs"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for key, value in terms.items():
                sums[key] += float(value.detach()) * len(idx)
            seen += len(idx)
        row = {"epoch": epoch, **{k: v / seen for k, v in sums.items()},
               "lr": opt.param_groups[0]["lr"]}
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    for m in modules:
        m.eval()
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- #
# public training functions
# --------------------------------------------------------------------------- #
def train_reverse(
    new_emb: Any,
    old_emb: Any,
    labels: Any = None,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    lambda_rev: float = 1.0,
    use_cmcl: bool = False,
    variant: str = "joint",
    hard_negatives: int | None = None,
    tau: float = 0.1,
    distance: str = "euclidean",
    learn_new: bool = False,
    samples_per_class: int = 4,
    hidden: int | None = None,
    psi: nn.Module | None = None,
    rho: nn.Module | None = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    normalize: bool = True,
    seed: int = 0,
    disable: bool = False,
) -> tuple[nn.Module, nn.Module | None, pd.DataFrame]:
    """Train psi (and optionally rho) on cached train-split embeddings.

    * ``use_cmcl=False``: psi with L_rev only (the RM+psi baseline); ``labels`` may
      be ``None`` and batches are plain shuffled batches.
    * ``use_cmcl=True``: ``L_CMCL + lambda_rev * L_rev`` (``lambda_rev=0`` ablates
      L_rev) on class-balanced batches of ``samples_per_class`` samples per class.
      System A is ``{psi(phi_new), phi_old}``; system B is ``{phi_new, phi_new}``
      (frozen), or ``{rho(phi_new), rho(phi_new)}`` with ``learn_new=True``, where rho
      is trained jointly with psi (the full method).

    ``new_emb``/``old_emb``: ``(N, d_new)``/``(N, d_old)`` or ``(P, N, d)`` arrays.
    ``psi``/``rho``: optional modules to start from (default: fresh
    :class:`ReverseTransform` / :class:`LearnableEmbedding` of width ``hidden``).

    Returns ``(psi, rho or None, history)``, modules in eval mode; ``history`` has
    columns ``epoch, loss, rev[, cmcl], lr``.
    """
    _check_hparams(epochs, batch_size, lr, optimizer)
    if variant not in CMCL_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {CMCL_VARIANTS}")
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not one of {DISTANCES}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not lambda_rev >= 0:
        raise ValueError(f"lambda_rev must be >= 0, got {lambda_rev!r}")
    if not use_cmcl and lambda_rev == 0:
        raise ValueError("use_cmcl=False and lambda_rev=0 leave nothing to train")
    if learn_new and not use_cmcl:
        raise ValueError("learn_new=True needs use_cmcl=True: rho is trained by L_CMCL only")
    if learn_new and variant == "single":
        raise ValueError("learn_new=True with variant='single': the single-system loss "
                         "does not involve the new system, so rho would not be trained")
    if rho is not None and not learn_new:
        raise ValueError("a rho module was given but learn_new=False; pass learn_new=True")

    new_v, old_v = _pair_views(new_emb, old_emb, ("new_emb", "old_emb"), normalize)
    n_passes, n, d_new = new_v.shape
    d_old = old_v.shape[2]
    if use_cmcl and labels is None:
        raise ValueError("use_cmcl=True needs labels")
    y = _as_labels(labels, n) if labels is not None else None

    if psi is not None:
        out = _output_dim(psi, d_new, "psi")
        if out != d_old:
            raise ValueError(
                f"psi maps new embeddings to {out} dimensions but old_emb has {d_old}; "
                f"build it as ReverseTransform(d_new={d_new}, d_old={d_old})"
            )
    if rho is not None and _output_dim(rho, d_new, "rho") != d_new:
        raise ValueError(f"rho must map {d_new}-dimensional new embeddings to {d_new} dimensions")

    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if psi is None:
            psi = ReverseTransform(d_new, d_old, hidden)
        if learn_new and rho is None:
            rho = LearnableEmbedding(d_new, hidden)
        modules = [psi] + ([rho] if learn_new else [])

        def step_loss(idx: np.ndarray, passes: np.ndarray) -> dict[str, torch.Tensor]:
            new_b, old_b = _gather(new_v, passes, idx), _gather(old_v, passes, idx)
            rev = psi(new_b)
            l_rev = reverse_loss(rev, old_b)
            if not use_cmcl:
                return {"loss": l_rev, "rev": l_rev}
            sys_b = rho(new_b) if learn_new else new_b
            l_cmcl = cmcl_loss(rev, old_b, sys_b, sys_b, y[torch.as_tensor(idx)], tau=tau,
                               variant=variant, hard_negatives=hard_negatives, distance=distance)
            return {"loss": l_cmcl + lambda_rev * l_rev, "cmcl": l_cmcl, "rev": l_rev}

        if use_cmcl:
            def make_batches(r):
                return class_balanced_batches(y.numpy(), batch_size, samples_per_class, r)
            steps = max(1, n // batch_size)
        else:
            def make_batches(r):
                return random_batches(n, batch_size, r)
            steps = _n_random_batches(n, batch_size)

        desc = "psi" + ("+rho" if learn_new else "") + (f" CMCL[{variant}]" if use_cmcl else " L_rev")
        history = _fit(modules, make_batches, steps, step_loss, n_passes, n, epochs=epochs, lr=lr,
                       weight_decay=weight_decay, optimizer=optimizer, rng=rng,
                       disable=disable, desc=desc)
    return psi, (rho if learn_new else None), history


def _train_forward(old_emb, new_emb, model, *, fastfill: bool, epochs, batch_size, lr, hidden,
                   weight_decay, optimizer, normalize, seed, disable):
    _check_hparams(epochs, batch_size, lr, optimizer)
    old_v, new_v = _pair_views(old_emb, new_emb, ("old_emb", "new_emb"), normalize)
    n_passes, n, d_old = old_v.shape
    d_new = new_v.shape[2]
    name = "FastFill model" if fastfill else "h"
    if model is not None:
        out = _output_dim(model, d_old, name)
        if out != d_new:
            raise ValueError(f"{name} maps old embeddings to {out} dimensions but new_emb has {d_new}")
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            model = (FastFillTransform if fastfill else ForwardTransform)(d_old, d_new, hidden)

        def step_loss(idx, passes):
            old_b, new_b = _gather(old_v, passes, idx), _gather(new_v, passes, idx)
            if not fastfill:
                l2 = reverse_loss(model(old_b), new_b)
                return {"loss": l2, "l2": l2}
            emb, log_sigma = model(old_b)
            per_sample = (emb - new_b).pow(2).sum(1)
            return {"loss": heteroscedastic_loss(per_sample, log_sigma),
                    "l2": per_sample.mean(), "log_sigma": log_sigma.mean()}

        history = _fit([model], lambda r: random_batches(n, batch_size, r),
                       _n_random_batches(n, batch_size), step_loss, n_passes, n,
                       epochs=epochs, lr=lr, weight_decay=weight_decay, optimizer=optimizer,
                       rng=rng, disable=disable, desc="FastFill" if fastfill else "FCT h")
    return model, history


def train_fct(
    old_emb: Any,
    new_emb: Any,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int | None = None,
    h: nn.Module | None = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    normalize: bool = True,
    seed: int = 0,
    disable: bool = False,
) -> tuple[nn.Module, pd.DataFrame]:
    """Train FCT's h (old -> new, no side information) with the squared error
    ``mean_i ||h(phi_old(x_i)) - phi_new(x_i)||^2``. Returns ``(h, history)``;
    history columns ``epoch, loss, l2, lr``."""
    return _train_forward(old_emb, new_emb, h, fastfill=False, epochs=epochs,
                          batch_size=batch_size, lr=lr, hidden=hidden,
                          weight_decay=weight_decay, optimizer=optimizer,
                          normalize=normalize, seed=seed, disable=disable)


def train_fastfill(
    old_emb: Any,
    new_emb: Any,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    hidden: int | None = None,
    model: nn.Module | None = None,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    normalize: bool = True,
    seed: int = 0,
    disable: bool = False,
) -> tuple[nn.Module, pd.DataFrame]:
    """Train a :class:`FastFillTransform`: the per-sample squared error
    ``||h(old) - new||^2`` weighted by :func:`heteroscedastic_loss` with the
    predicted log-variance. Returns ``(model, history)``; history columns
    ``epoch, loss, l2, log_sigma, lr``."""
    return _train_forward(old_emb, new_emb, model, fastfill=True, epochs=epochs,
                          batch_size=batch_size, lr=lr, hidden=hidden,
                          weight_decay=weight_decay, optimizer=optimizer,
                          normalize=normalize, seed=seed, disable=disable)


