"""Losses for compatible training: CMCL and its variants, L_rev, BCT, FastFill, BiCT.

Small composable functions in the spirit of pytorch-metric-learning: a distance
(:func:`~backfill_utils.retrieval.distances.pairwise_distance`, from
:mod:`backfill_utils.retrieval.distances`), a loss over a batch of two retrieval systems
(:func:`cmcl_loss`, also wrapped as the module :class:`CMCLLoss`) and the plain
regression / classification terms the baselines need (:func:`feature_regression`,
:func:`classification_loss`), composed into FastFill's uncertainty-weighted loss
(:func:`fastfill_loss`) and BiCT's forward-compatibility loss (:func:`bict_loss`).

Notation (PAPER.md 2.3). A batch holds ``n`` images with labels ``y``. The
*backward system* A compares ``rev_q = psi(phi_new(x))`` queries with the
``old_g = phi_old(x)`` gallery; the *new system* B compares ``new_q`` with
``new_g`` (both ``phi_new(x)`` or ``rho(phi_new(x))``; usually the same tensor)::

    s_A(i, j) = -d(rev_q_i, old_g_j) / tau
    s_B(i, j) = -d(new_q_i, new_g_j) / tau
    P_A(i) = {j : y_j = y_i}            (own old embedding counts)
    P_B(i) = {j != i : y_j = y_i}
    N(i)   = {k : y_k != y_i}

Where this module departs from, or adds to, the paper's text:

* ``d`` is the distance used at query time: Euclidean on L2-normalised embeddings
  (raw ones with the profile key ``normalize_embeddings: false``). The loss computes it
  on the tensors it is given; normalising them is the job of the modules in
  :mod:`backfill_utils.compat.modules` (their outputs are unit length unless built with
  ``normalize_output=False``).
  The Euclidean distance is ``sqrt(max(|a|^2 + |b|^2 - 2 a.b, 0) + eps)`` with
  ``eps = 1e-8``: a bias of at most 1e-4 at distance 0, and finite gradients there.
* An anchor whose class has no other member in the batch has ``P_B(i)`` empty; it is
  left out of the mean of the L_B term (``P_A(i)`` always holds ``i`` itself). The
  loss is therefore ``mean_i L_A(i) + mean_{i: P_B(i) nonempty} L_B(i)``, which is
  the paper's ``mean_i [L_A(i) + L_B(i)]`` whenever every class has two members.
  Class-balanced batches (:func:`backfill_utils.compat.modules.class_balanced_batches`)
  make that the normal case.
* An anchor with no negatives at all (a single-class batch) has loss 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..retrieval.distances import DISTANCES, pairwise_distance

__all__ = [
    "DISTANCES",
    "CMCL_VARIANTS",
    "pairwise_distance",
    "cmcl_loss",
    "CMCLLoss",
    "reverse_loss",
    "bct_influence_loss",
    "heteroscedastic_loss",
    "REGRESSIONS",
    "feature_regression",
    "classification_loss",
    "fastfill_loss",
    "bict_loss",
]

CMCL_VARIANTS = ("joint", "separate", "single")
REGRESSIONS = ("sum", "mean")


# --------------------------------------------------------------------------- #
# CMCL
# --------------------------------------------------------------------------- #
def _fill_value(dtype: torch.dtype) -> float:
    # a large but finite "minus infinity": exp() of it is 0, and differences of it
    # with ordinary numbers neither overflow nor produce NaN gradients.
    return torch.finfo(dtype).min / 4


def _masked_logsumexp(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log sum_{j: mask[i, j]} exp(s[i, j])``; a row with an empty mask
    gives a huge negative number (exp of it is 0) instead of ``-inf``."""
    filled = torch.where(mask, s, torch.full_like(s, _fill_value(s.dtype)))
    return torch.logsumexp(filled, dim=1)


def _hardest(s: torch.Tensor, mask: torch.Tensor, m: int | None) -> torch.Tensor:
    """Restrict ``mask`` to the ``m`` entries per row with the highest ``s``
    (the hardest negatives: the closest ones)."""
    if m is None or m >= s.shape[1]:
        return mask
    scores = torch.where(mask, s.detach(), torch.full_like(s, float("-inf")))
    idx = scores.topk(m, dim=1).indices
    keep = torch.zeros_like(mask).scatter(1, idx, True)
    return keep & mask


def _anchor_loss(
    s: torch.Tensor, pos: torch.Tensor, neg_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-anchor ``-1/|P(i)| sum_p log e^{s_ip} / (e^{s_ip} + e^{neg_lse_i})``
    and the mask of anchors with at least one positive."""
    log_prob = s - torch.logaddexp(s, neg_lse[:, None])
    n_pos = pos.sum(1)
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    return per_anchor, n_pos > 0


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if bool(valid.any()):
        return values[valid].mean()
    return (values * 0.0).sum()  # 0, still attached to the graph


def _check_system(q: torch.Tensor, g: torch.Tensor, names: str, n: int) -> None:
    if not (isinstance(q, torch.Tensor) and isinstance(g, torch.Tensor)):
        raise TypeError(f"{names} must be torch tensors")
    if q.ndim != 2 or g.ndim != 2:
        raise ValueError(f"{names} must be 2-D (n, d), got {tuple(q.shape)} and {tuple(g.shape)}")
    if q.shape[0] != n or g.shape[0] != n:
        raise ValueError(
            f"{names} must have one row per label ({n}), got {q.shape[0]} and {g.shape[0]}"
        )
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"{names} must share their embedding dimension, got {q.shape[1]} and {g.shape[1]}"
        )


def cmcl_loss(
    rev_q: torch.Tensor,
    old_g: torch.Tensor,
    new_q: torch.Tensor | None,
    new_g: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    tau: float = 0.1,
    variant: str = "joint",
    hard_negatives: int | None = None,
    distance: str = "euclidean",
) -> torch.Tensor:
    """Metric-compatible contrastive loss L_CMCL (PAPER.md 2.3), a scalar tensor.

    Parameters
    ----------
    rev_q, old_g : (n, d_old) tensors
        Backward system A: reverse-transformed new queries ``psi(phi_new(x))`` and old
        gallery embeddings ``phi_old(x)`` of the same batch.
    new_q, new_g : (n, d_new) tensors
        New system B (``phi_new(x)`` or ``rho(phi_new(x))`` for both; may be the same
        tensor). May be ``None`` for ``variant="single"``.
    labels : (n,) integer tensor
    tau : temperature (> 0).
    variant : ``"joint"`` (each system's denominator holds the negatives of *both*
        systems; the paper's loss), ``"separate"`` (each system's own negatives only)
        or ``"single"`` (system A only, own negatives).
    hard_negatives : keep only the ``m`` hardest negatives (highest similarity, i.e.
        smallest distance) per system and anchor; ``None`` keeps all.
    distance : ``"euclidean"`` or ``"squared"``; see :func:`pairwise_distance`.

    Anchors with an empty ``P_B(i)`` are left out of the mean of the L_B term (see the
    module docstring).
    """
    if variant not in CMCL_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {CMCL_VARIANTS}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if hard_negatives is not None and (int(hard_negatives) != hard_negatives or hard_negatives < 1):
        raise ValueError(f"hard_negatives must be a positive integer or None, got {hard_negatives!r}")
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    n = labels.shape[0]
    _check_system(rev_q, old_g, "rev_q and old_g", n)
    use_b = variant != "single"
    if use_b:
        if new_q is None or new_g is None:
            raise ValueError(f"variant={variant!r} needs new_q and new_g (system B)")
        _check_system(new_q, new_g, "new_q and new_g", n)
    labels = labels.to(rev_q.device)

    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=rev_q.device)
    neg = ~same
    m = None if hard_negatives is None else int(hard_negatives)

    s_a = -pairwise_distance(rev_q, old_g, distance) / tau
    lse_neg_a = _masked_logsumexp(s_a, _hardest(s_a, neg, m))
    if not use_b:
        loss_a, valid_a = _anchor_loss(s_a, same, lse_neg_a)
        return _masked_mean(loss_a, valid_a)

    s_b = -pairwise_distance(new_q, new_g, distance) / tau
    lse_neg_b = _masked_logsumexp(s_b, _hardest(s_b, neg, m))
    if variant == "joint":
        both = torch.logaddexp(lse_neg_a, lse_neg_b)
        den_a, den_b = both, both
    else:  # separate
        den_a, den_b = lse_neg_a, lse_neg_b
    loss_a, valid_a = _anchor_loss(s_a, same, den_a)
    loss_b, valid_b = _anchor_loss(s_b, same & ~eye, den_b)
    return _masked_mean(loss_a, valid_a) + _masked_mean(loss_b, valid_b)


class CMCLLoss(nn.Module):
    """:func:`cmcl_loss` with its options bound, for use as a criterion object.

    ``CMCLLoss(tau=0.1)(rev_q, old_g, new_q, new_g, labels)``.
    """

    def __init__(
        self,
        tau: float = 0.1,
        variant: str = "joint",
        hard_negatives: int | None = None,
        distance: str = "euclidean",
    ) -> None:
        super().__init__()
        if variant not in CMCL_VARIANTS:
            raise ValueError(f"variant={variant!r} is not one of {CMCL_VARIANTS}")
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is not one of {DISTANCES}")
        self.tau, self.variant = tau, variant
        self.hard_negatives, self.distance = hard_negatives, distance

    def forward(self, rev_q, old_g, new_q, new_g, labels) -> torch.Tensor:  # noqa: D102
        return cmcl_loss(
            rev_q, old_g, new_q, new_g, labels,
            tau=self.tau, variant=self.variant,
            hard_negatives=self.hard_negatives, distance=self.distance,
        )

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, variant={self.variant!r}, "
                f"hard_negatives={self.hard_negatives}, distance={self.distance!r}")


# --------------------------------------------------------------------------- #
# regression and classification terms
# --------------------------------------------------------------------------- #
def reverse_loss(rev: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """L_rev = mean_i ||rev_i - old_i||^2 (PAPER.md 2.2): squared Euclidean error
    summed over the dimensions, averaged over the samples.

    >>> reverse_loss(torch.zeros(2, 3), torch.ones(2, 3))
    tensor(3.)
    """
    if rev.shape != old.shape or rev.ndim != 2:
        raise ValueError(
            f"reverse_loss needs rev and old of the same (n, d) shape, got "
            f"{tuple(rev.shape)} and {tuple(old.shape)}"
        )
    return (rev - old).pow(2).sum(1).mean()


def bct_influence_loss(
    new_embeddings: torch.Tensor,
    labels: torch.Tensor,
    old_classifier: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    num_old_classes: int,
) -> torch.Tensor:
    """BCT influence loss: cross-entropy of the frozen old classifier applied to the
    new embeddings, over the samples of old classes (``label < num_old_classes``; the
    old classes are the first ones). Returns 0 (attached to the graph) when the
    batch holds no old-class sample.

    ``old_classifier`` is either a callable (e.g. the old model's ``nn.Linear`` head)
    mapping ``(n, d)`` embeddings to ``(n, num_old_classes)`` logits, or a weight
    tensor ``W`` of shape ``(num_old_classes, d)`` (logits ``= emb @ W.T``; it is
    detached). A callable is used as given: freeze it (``requires_grad_(False)``) so
    that only the new model learns; gradients still flow to ``new_embeddings``.
    """
    labels = torch.as_tensor(labels, device=new_embeddings.device)
    if new_embeddings.ndim != 2 or labels.ndim != 1 or labels.shape[0] != new_embeddings.shape[0]:
        raise ValueError(
            f"bct_influence_loss needs (n, d) embeddings and (n,) labels, got "
            f"{tuple(new_embeddings.shape)} and {tuple(labels.shape)}"
        )
    keep = labels < num_old_classes
    if not bool(keep.any()):
        return (new_embeddings * 0.0).sum()
    emb = new_embeddings[keep]
    if isinstance(old_classifier, torch.Tensor):
        logits = F.linear(emb, old_classifier.detach())
    else:
        logits = old_classifier(emb)
    if logits.ndim != 2 or logits.shape[1] != num_old_classes:
        raise ValueError(
            f"old_classifier must output (n, num_old_classes={num_old_classes}) logits, "
            f"got {tuple(logits.shape)}"
        )
    return F.cross_entropy(logits, labels[keep].long())


def heteroscedastic_loss(
    per_sample_loss: torch.Tensor, log_sigma: torch.Tensor, mu_uncertainty: float = 0.5
) -> torch.Tensor:
    """FastFill's uncertainty weighting: ``mean_i 0.5 exp(-s_i) l_i + mu_uncertainty s_i``
    where ``l_i`` is a per-sample loss and ``s_i`` the predicted log-variance
    (``mu_uncertainty = 0.5``: the Gaussian negative log-likelihood up to a constant).

    >>> heteroscedastic_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    tensor(1.)
    """
    loss = per_sample_loss.reshape(-1)
    s = log_sigma.reshape(-1)
    if loss.shape != s.shape:
        raise ValueError(
            f"heteroscedastic_loss needs one log_sigma per sample loss, got "
            f"{tuple(per_sample_loss.shape)} and {tuple(log_sigma.shape)}"
        )
    return (0.5 * torch.exp(-s) * loss + mu_uncertainty * s).mean()


def feature_regression(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Per-sample squared error, shape ``(n,)``: ``||pred_i - target_i||^2`` summed over
    the ``d`` dimensions (``reduction="sum"``, the L_rev / FCT term of this package) or
    averaged over them (``"mean"``: ``torch.nn.MSELoss(reduction="none")`` then a mean
    over dimensions, FastFill's per-sample term in its authors' code); ``sum = d * mean``.

    >>> feature_regression(torch.zeros(2, 4), torch.ones(2, 4), "mean")
    tensor([1., 1.])
    """
    if reduction not in REGRESSIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REGRESSIONS}")
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(
            f"feature_regression needs pred and target of the same (n, d) shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    sq = (pred - target).pow(2)
    return sq.sum(1) if reduction == "sum" else sq.mean(1)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-sample cross-entropy ``(n,)`` of ``logits (n, C)`` against integer ``labels``
    in ``[0, C)``, with label smoothing ``eps``: ``(1 - eps) * nll + eps * mean_k(-log p_k)``
    (``torch.nn.functional.cross_entropy`` with ``reduction="none"``).
    """
    labels = torch.as_tensor(labels, device=logits.device)
    if logits.ndim != 2 or labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"classification_loss needs (n, C) logits and (n,) labels, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {logits.shape[1]}) for {logits.shape[1]} logits, got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return F.cross_entropy(logits, labels.long(), reduction="none", label_smoothing=label_smoothing)


def fastfill_loss(
    emb: torch.Tensor,
    target: torch.Tensor,
    log_sigma: torch.Tensor,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    mu: float = 1.0,
    label_smoothing: float = 0.1,
    mu_uncertainty: float = 0.5,
    regression: str = "sum",
) -> torch.Tensor:
    """FastFill's training loss (Jaeckle et al., ICLR 2023, as in its authors' code):

    ``mean_i 0.5 exp(-s_i) (r_i + mu * ce_i) + mu_uncertainty * s_i``

    with ``r_i = feature_regression(emb, target, regression)[i]`` (``emb = h(phi_old(x))``,
    ``target = phi_new(x)``), ``ce_i`` the label-smoothed cross-entropy of ``logits`` (the
    frozen new model's classifier applied to ``emb``) and ``s_i = log_sigma[i]`` the
    predicted log-variance. ``mu = 0`` drops the classification term (``logits`` and
    ``labels`` may then be ``None``). The authors average the squared error over the
    dimensions (``regression="mean"``) of unnormalised features; see
    :class:`backfill_utils.compat.recipes.FastFillRecipe` for why the default here is ``"sum"``.
    """
    per_sample = feature_regression(emb, target, regression)
    if mu != 0:
        if logits is None or labels is None:
            raise ValueError("fastfill_loss with mu != 0 needs logits and labels")
        per_sample = per_sample + mu * classification_loss(logits, labels, label_smoothing)
    return heteroscedastic_loss(per_sample, log_sigma, mu_uncertainty)


def bict_loss(
    emb: torch.Tensor,
    target: torch.Tensor,
    logits: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ce_weight: float = 1.0,
    feature_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """BiCT's forward-compatibility loss for the transformation ``h`` of old embeddings
    towards the backward-compatible new model (see :mod:`backfill_utils.compat.fit`):

    ``feature_weight * mean_i ||emb_i - target_i||^2 + ce_weight * mean_i ce_i``

    with ``emb = h(phi_old(x))``, ``target = phi_bct(x)`` and ``ce_i`` the cross-entropy
    of ``logits`` (the frozen BCT model's classifier applied to ``emb``): the influence
    loss of BCT, run in the forward direction. ``ce_weight = 0`` needs no logits.
    """
    loss = feature_weight * feature_regression(emb, target, "sum").mean()
    if ce_weight != 0:
        if logits is None or labels is None:
            raise ValueError("bict_loss with ce_weight != 0 needs logits and labels")
        loss = loss + ce_weight * classification_loss(logits, labels, label_smoothing).mean()
    return loss
