"""Cached-embedding inputs of the compatibility trainers: validation, augmented passes,
batches, and the checks of given modules and frozen classifiers.

Every trainer of :mod:`backfill_utils.compat.fit` takes cached embeddings of the train
split as numpy arrays or tensors, either ``(N, d)`` or ``(P, N, d)`` for ``P`` augmented
passes of the frozen backbones: each epoch draws, per sample, one of the ``P`` passes
(:func:`draw_passes`), and the embeddings of one sample in the two spaces always come
from the same pass (:func:`gather`).

Batches: :func:`class_balanced_batches` for CMCL (``P = batch_size // samples_per_class``
distinct classes, ``K = samples_per_class`` samples of each, ``max(1, N // batch_size)``
batches per epoch, so every sample is seen once per epoch in expectation, not exactly),
:func:`random_batches` (a shuffled pass over all samples) for everything else.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "to_tensor",
    "as_views",
    "pair_views",
    "as_labels",
    "draw_passes",
    "gather",
    "output_dim",
    "check_classifier",
    "frozen",
    "class_balanced_batches",
    "random_batches",
    "n_random_batches",
]


def to_tensor(x: Any, name: str) -> torch.Tensor:
    """``x`` as a float32 CPU tensor (a copy detached from any graph); NaN or infinite
    values are an error that names ``name``."""
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


def as_views(x: Any, name: str, normalize: bool) -> torch.Tensor:
    """``(N, d)`` or ``(P, N, d)`` -> float32 tensor ``(P, N, d)``."""
    t = to_tensor(x, name)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3 or t.shape[1] == 0 or t.shape[2] == 0:
        raise ValueError(
            f"{name} must be (N, d) or (P, N, d) for P augmented passes, got shape {tuple(t.shape)}"
        )
    return F.normalize(t, dim=2) if normalize else t.contiguous()


def pair_views(a: Any, b: Any, names: tuple[str, str],
               normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two embedding arrays of the same samples in two spaces as ``(P, N, d_a)`` and
    ``(P, N, d_b)`` views; the sample and pass counts must agree."""
    va, vb = as_views(a, names[0], normalize), as_views(b, names[1], normalize)
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


def as_labels(labels: Any, n: int) -> torch.Tensor:
    """``labels`` as an int64 tensor of length ``n`` (one integer label per sample)."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"labels must be a 1-D array of length {n} (one per sample), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    return torch.as_tensor(y.astype(np.int64))


def draw_passes(n_passes: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """One augmented pass per sample for this epoch."""
    if n_passes == 1:
        return np.zeros(n, dtype=np.int64)
    return rng.integers(0, n_passes, size=n)


def gather(views: torch.Tensor, passes: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of ``views``, each taken from the pass drawn for that sample."""
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    return views[torch.as_tensor(passes[idx], dtype=torch.long), idx_t]


def output_dim(module: nn.Module, d_in: int, name: str) -> int:
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


def check_classifier(classifier: Any, d: int, labels: torch.Tensor) -> int:
    """Check a frozen ``classifier`` (a module mapping ``(n, d)`` new-space embeddings to
    ``(n, C)`` logits) against ``labels``; returns ``C``.

    The labels must lie in ``[0, C)``: pass the new model's training-class labels that
    come with the cached train embeddings.
    """
    if not callable(classifier):
        raise TypeError(f"classifier must be a module mapping (n, {d}) embeddings to logits, "
                        f"got {type(classifier).__name__}")
    module = classifier if isinstance(classifier, nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            logits = classifier(torch.ones(2, d))
    except Exception as exc:  # noqa: BLE001 - name the input that was rejected
        raise ValueError(
            f"classifier cannot take ({d})-dimensional new-space embeddings: {exc}"
        ) from None
    finally:
        if module is not None:
            module.train(was_training)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"classifier must map (n, {d}) embeddings to (n, n_classes) logits, "
                         f"got {shape} for n=2")
    n_classes = int(logits.shape[1])
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"labels span [{lo}, {hi}] but the classifier has {n_classes} classes: pass the "
            f"labels of the new model's training classes, in [0, {n_classes})"
        )
    return n_classes


@contextlib.contextmanager
def frozen(module: Any) -> Iterator[Any]:
    """Use ``module`` frozen inside the block: eval mode and ``requires_grad=False`` on its
    parameters (gradients still flow through it to its inputs); both restored on exit."""
    if not isinstance(module, nn.Module):
        yield module
        return
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    was_training = module.training
    module.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        module.train(was_training)


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


def n_random_batches(n: int, batch_size: int) -> int:
    """How many batches :func:`random_batches` makes per epoch (for the lr schedule)."""
    k = math.ceil(n / batch_size)
    return k - 1 if k > 1 and n - (k - 1) * batch_size < 2 else k

