"""Training the compatibility modules on cached (frozen-backbone) embeddings, one
function per family of recipes (:mod:`backfill_utils.compat.recipes`):

* :func:`fit_reverse` -- psi (and rho): ``RevPsiRecipe``, ``CMCLPsiRecipe``,
  ``CMCLPsiRhoRecipe``;
* :func:`fit_fct` -- FCT's h: ``FCTRecipe``;
* :func:`fit_fastfill` -- FastFill's h and uncertainty head: ``FastFillRecipe``;
* :func:`fit_bict` -- BiCT's h towards the backward-compatible new model: ``BiCTRecipe``.

Inputs are cached embeddings of the train split, ``(N, d)`` or ``(P, N, d)`` for ``P``
augmented passes (:mod:`backfill_utils.compat.inputs`), and, where the recipe needs
them, integer labels and a frozen classifier. Training is seeded by ``recipe.seed``
(the global torch RNG is left untouched), uses Adam (or SGD with momentum 0.9) with a
per-step cosine learning-rate schedule, shows a plain ``tqdm`` bar over the epochs
(``disable=True`` hides it), and returns the module(s) in eval mode with a
``pandas.DataFrame`` history: one row per epoch, the sample-weighted mean of each loss
term, and the learning rate at the end of the epoch. A module a recipe builds normalises
its input and output exactly when ``recipe.normalize`` is true.

The classifier of FastFill and BiCT is a module mapping new-space embeddings to logits,
e.g. the new (or BCT) backbone's :class:`~backfill_utils.models.CosineClassifier`
(``EmbeddingNet.classifier``). It is used frozen (eval mode, no parameter gradients,
both restored afterwards); the gradient flows through it to ``h``. The labels are the
new model's training-class labels that come with the cached train embeddings.

BiCT (Su et al., arXiv 2204.13919) upgrades the old gallery "by forward-compatible
training towards the embedding space of the backward-compatible new model": ``h`` maps
old embeddings into the space of the BCT backbone (trained with the influence loss
through the frozen old classifier), from embeddings only, no images. Its loss here,
``feature_weight * ||h(phi_old) - phi_bct||^2 + ce_weight * CE(classifier_bct(h(phi_old)), y)``,
is a reading of the paper's abstract (its full text was not reachable): forward-compatible
training (FCT's regression) towards the BCT model's embeddings, plus BCT's influence
loss run in the forward direction through the frozen BCT classifier.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from .inputs import (
    as_labels, check_classifier, class_balanced_batches, draw_passes, frozen, gather, n_random_batches,
    output_dim, pair_views, random_batches)
from .losses import bict_loss, classification_loss, cmcl_loss, fastfill_loss, feature_regression, reverse_loss
from .modules import (
    FastFillSideProjection, FastFillTransform, ForwardTransform, LearnableEmbedding, ReverseTransform,
    SideProjection)
from .recipes import BiCTRecipe, CMCLPsiRecipe, CMCLPsiRhoRecipe, FastFillRecipe, FCTRecipe, Recipe, RevPsiRecipe

__all__ = ["fit_reverse", "fit_fct", "fit_fastfill", "fit_bict"]

ReverseRecipe = RevPsiRecipe | CMCLPsiRecipe | CMCLPsiRhoRecipe
StepLoss = Callable[[np.ndarray, np.ndarray], dict[str, torch.Tensor]]
#: ``on_epoch(epoch, modules) -> dict``: called after each epoch with the modules in eval mode
#: (their mode is restored afterwards); what it returns joins that epoch's history row.
OnEpoch = Callable[[int, Sequence[nn.Module]], dict]


def _schedule(opt: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Per-step learning rate: cosine decay to 0 over the run, after a linear warm-up over
    ``recipe.warmup_epochs`` (the authors' FCT schedule, evaluated per step instead of per
    epoch): at step ``t`` of the warm-up ``lr (t + 1) / W``, then
    ``0.5 lr (1 + cos(pi (t - W) / (T - W)))``."""
    total = max(1, recipe.epochs * steps_per_epoch)
    if not recipe.warmup_epochs:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    warm = recipe.warmup_epochs * steps_per_epoch

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- #
# the training loop
# --------------------------------------------------------------------------- #
def _fit(modules: Sequence[nn.Module], make_batches: Callable[[np.random.Generator], list],
         steps_per_epoch: int, step_loss: StepLoss, n_passes: int, n: int, recipe: Recipe,
         rng: np.random.Generator, disable: bool, desc: str, on_epoch: OnEpoch | None = None) -> pd.DataFrame:
    """Epochs of ``step_loss`` over ``make_batches``; one history row per epoch. With
    ``recipe.bn_eval_half`` the modules train in eval mode (BatchNorm statistics frozen)
    from epoch ``epochs / 2`` on, as FCT's authors do."""
    params = [p for m in modules for p in m.parameters()]
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    sched = _schedule(opt, recipe, steps_per_epoch)
    rows = []
    bar = tqdm(range(recipe.epochs), desc=desc, disable=disable)
    for epoch in bar:
        frozen_bn = recipe.bn_eval_half and epoch >= recipe.epochs / 2
        for m in modules:
            m.train(not frozen_bn)
        passes = draw_passes(n_passes, n, rng)
        sums: dict[str, float] = defaultdict(float)
        seen = 0
        for idx in make_batches(rng):
            terms = step_loss(idx, passes)
            loss = terms["loss"]
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(
                    f"{desc}: non-finite loss at epoch {epoch}; lower lr or check the inputs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for key, value in terms.items():
                sums[key] += float(value.detach()) * len(idx)
            seen += len(idx)
        row = {"epoch": epoch, **{k: v / seen for k, v in sums.items()},
               "lr": opt.param_groups[0]["lr"]}
        if on_epoch is not None:
            for m in modules:
                m.eval()
            row.update(on_epoch(epoch, modules))
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    for m in modules:
        m.eval()
    return pd.DataFrame(rows)


def _check_given(module: nn.Module | None, d_in: int, d_out: int, name: str, hint: str) -> None:
    """A module given to start from must map ``d_in`` to ``d_out`` dimensions."""
    if module is None:
        return
    out = output_dim(module, d_in, name)
    if out != d_out:
        raise ValueError(f"{name} maps {d_in}-dimensional inputs to {out} dimensions but "
                         f"{d_out} are needed; {hint}")


def _norm(recipe: Recipe) -> dict[str, bool]:
    """The normalisation flags of a module a recipe builds: its input and output are
    L2-normalised exactly when the recipe normalises the cached embeddings."""
    return {"normalize_input": recipe.normalize, "normalize_output": recipe.normalize}


def _check_recipe(recipe: Any, kinds: tuple[type, ...], fn: str) -> None:
    if not isinstance(recipe, kinds):
        names = ", ".join(k.__name__ for k in kinds)
        raise TypeError(f"{fn} takes a recipe of type {names}; got {type(recipe).__name__}")


# --------------------------------------------------------------------------- #
# psi and rho
# --------------------------------------------------------------------------- #
def fit_reverse(
    recipe: ReverseRecipe,
    new_emb: Any,
    old_emb: Any,
    labels: Any = None,
    *,
    psi: nn.Module | None = None,
    rho: nn.Module | None = None,
    disable: bool = False,
) -> tuple[nn.Module, nn.Module | None, pd.DataFrame]:
    """Train psi (and rho for a :class:`CMCLPsiRhoRecipe`) on cached train embeddings.

    * :class:`RevPsiRecipe`: ``L_rev`` on shuffled batches; ``labels`` may be ``None``.
    * :class:`CMCLPsiRecipe`: ``L_CMCL + lambda_rev * L_rev`` on class-balanced batches;
      system A is ``{psi(phi_new), phi_old}``, system B the frozen ``{phi_new, phi_new}``.
    * :class:`CMCLPsiRhoRecipe`: the same with system B ``{rho(phi_new), rho(phi_new)}``,
      rho trained jointly with psi (the paper's full method).

    ``new_emb`` / ``old_emb``: ``(N, d_new)`` / ``(N, d_old)`` or ``(P, N, d)``.
    ``psi`` / ``rho``: modules to start from (trained in place; the recipe's widths and
    depths then do not apply); default fresh :class:`ReverseTransform` /
    :class:`LearnableEmbedding`. Returns ``(psi, rho or None, history)``; history columns
    ``epoch, loss[, cmcl], rev, lr``.
    """
    _check_recipe(recipe, (RevPsiRecipe, CMCLPsiRecipe, CMCLPsiRhoRecipe), "fit_reverse")
    learn_new = isinstance(recipe, CMCLPsiRhoRecipe)
    use_cmcl = not isinstance(recipe, RevPsiRecipe)
    if rho is not None and not learn_new:
        raise ValueError(f"a rho module was given but {type(recipe).__name__} does not train "
                         f"rho; use CMCLPsiRhoRecipe")
    new_v, old_v = pair_views(new_emb, old_emb, ("new_emb", "old_emb"), recipe.normalize)
    n_passes, n, d_new = new_v.shape
    d_old = old_v.shape[2]
    if use_cmcl and labels is None:
        raise ValueError(f"{type(recipe).__name__} needs labels (class-balanced batches)")
    y = as_labels(labels, n) if labels is not None else None
    _check_given(psi, d_new, d_old, "psi", f"build it as ReverseTransform(d_new={d_new}, "
                 f"d_old={d_old})")
    _check_given(rho, d_new, d_new, "rho", f"rho maps the new space ({d_new}) to itself")

    rng = np.random.default_rng(recipe.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        if psi is None:
            psi = ReverseTransform(d_new, d_old, recipe.hidden, depth=recipe.depth, **_norm(recipe))
        if learn_new and rho is None:
            rho = LearnableEmbedding(d_new, recipe.rho_hidden, depth=recipe.rho_depth, **_norm(recipe))
        modules = [psi] + ([rho] if learn_new else [])

        def step_loss(idx: np.ndarray, passes: np.ndarray) -> dict[str, torch.Tensor]:
            new_b, old_b = gather(new_v, passes, idx), gather(old_v, passes, idx)
            rev = psi(new_b)
            l_rev = reverse_loss(rev, old_b)
            if not use_cmcl:
                return {"loss": l_rev, "rev": l_rev}
            sys_b = rho(new_b) if learn_new else new_b
            l_cmcl = cmcl_loss(rev, old_b, sys_b, sys_b, y[torch.as_tensor(idx)],
                               tau=recipe.tau, variant=recipe.variant,
                               hard_negatives=recipe.hard_negatives, distance=recipe.distance)
            return {"loss": l_cmcl + recipe.lambda_rev * l_rev, "cmcl": l_cmcl, "rev": l_rev}

        if use_cmcl:
            def make_batches(r):
                return class_balanced_batches(y.numpy(), recipe.batch_size,
                                              recipe.samples_per_class, r)
            steps = max(1, n // recipe.batch_size)
            desc = "psi" + ("+rho" if learn_new else "") + f" CMCL[{recipe.variant}]"
        else:
            def make_batches(r):
                return random_batches(n, recipe.batch_size, r)
            steps = n_random_batches(n, recipe.batch_size)
            desc = "psi L_rev"
        history = _fit(modules, make_batches, steps, step_loss, n_passes, n, recipe, rng,
                       disable, desc)
    return psi, (rho if learn_new else None), history


# --------------------------------------------------------------------------- #
# forward transformations: FCT, FastFill, BiCT
# --------------------------------------------------------------------------- #
def _fit_forward(recipe: Recipe, old_emb: Any, target_emb: Any, labels: Any, classifier: Any,
                 model: nn.Module | None, make_model: Callable[[int, int], nn.Module],
                 loss_terms: Callable[..., dict[str, torch.Tensor]], uses_classifier: bool,
                 target_name: str, desc: str, disable: bool,
                 on_epoch: OnEpoch | None = None) -> tuple[nn.Module, pd.DataFrame]:
    """The shared loop of the old -> new transformations on shuffled batches.

    ``loss_terms(model, old_b, target_b, y_b, classifier)`` returns the history terms,
    ``"loss"`` first."""
    old_v, tgt_v = pair_views(old_emb, target_emb, ("old_emb", target_name), recipe.normalize)
    n_passes, n, d_old = old_v.shape
    d_new = tgt_v.shape[2]
    y = None
    if uses_classifier:
        if labels is None or classifier is None:
            raise ValueError(f"{type(recipe).__name__} with a classification term needs labels "
                             f"and the frozen classifier of the new model")
        y = as_labels(labels, n)
        check_classifier(classifier, d_new, y)
    _check_given(model, d_old, d_new, desc, f"build it with d_old={d_old}, d_new={d_new}")
    rng = np.random.default_rng(recipe.seed)
    with torch.random.fork_rng(devices=[]), frozen(classifier if uses_classifier else None):
        torch.manual_seed(recipe.seed)
        if model is None:
            model = make_model(d_old, d_new)

        def step_loss(idx: np.ndarray, passes: np.ndarray) -> dict[str, torch.Tensor]:
            old_b, tgt_b = gather(old_v, passes, idx), gather(tgt_v, passes, idx)
            y_b = y[torch.as_tensor(idx)] if y is not None else None
            return loss_terms(model, old_b, tgt_b, y_b, classifier)

        history = _fit([model], lambda r: random_batches(n, recipe.batch_size, r),
                       n_random_batches(n, recipe.batch_size), step_loss, n_passes, n, recipe,
                       rng, disable, desc, on_epoch)
    return model, history


def _ce_terms(logits: torch.Tensor, y_b: torch.Tensor, label_smoothing: float) -> dict:
    logits = logits.detach()
    return {"ce": classification_loss(logits, y_b, label_smoothing).mean(),
            "acc": (logits.argmax(1) == y_b).float().mean()}


def _forward_model(recipe: Recipe, d_old: int, d_new: int, uncertainty: bool = False) -> nn.Module:
    """A fresh h of the recipe's ``arch``: the authors' side projection or the small MLP."""
    if recipe.arch == "side_projection":
        cls = FastFillSideProjection if uncertainty else SideProjection
    else:
        cls = FastFillTransform if uncertainty else ForwardTransform
    return cls(d_old, d_new, recipe.hidden, depth=recipe.depth, **_norm(recipe))


def fit_fct(recipe: FCTRecipe, old_emb: Any, new_emb: Any, *, h: nn.Module | None = None,
            disable: bool = False, on_epoch: OnEpoch | None = None) -> tuple[nn.Module, pd.DataFrame]:
    """Train FCT's h (old -> new, no side information) with the squared error to
    ``phi_new`` (``recipe.regression``: averaged or summed over the dimensions), on the
    recipe's ``arch``. ``h``: a module to start from; ``on_epoch``: see :data:`OnEpoch`.
    Returns ``(h, history)``; history columns ``epoch, loss, l2, lr``."""
    _check_recipe(recipe, (FCTRecipe,), "fit_fct")

    def terms(model, old_b, new_b, y_b, classifier):
        l2 = feature_regression(model(old_b), new_b, recipe.regression).mean()
        return {"loss": l2, "l2": l2}

    return _fit_forward(recipe, old_emb, new_emb, None, None, h,
                        lambda a, b: _forward_model(recipe, a, b), terms, False, "new_emb", "FCT h",
                        disable, on_epoch)


def fit_fastfill(recipe: FastFillRecipe, old_emb: Any, new_emb: Any, labels: Any = None,
                 classifier: nn.Module | None = None, *, model: nn.Module | None = None,
                 disable: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """Train a :class:`FastFillTransform` with FastFill's loss
    (:func:`backfill_utils.compat.losses.fastfill_loss`): per sample, the regression to
    ``phi_new`` plus ``recipe.mu`` times the cross-entropy of ``classifier(h(phi_old))``
    against ``labels``, weighted by the predicted uncertainty. ``classifier``: the frozen
    new model's classifier (``(n, d_new)`` -> logits); ``labels`` and ``classifier`` are
    not needed when ``recipe.mu == 0``. Returns ``(model, history)``; history columns
    ``epoch, loss, l2[, ce, acc], log_sigma, lr`` (``l2``: the regression term with the
    recipe's reduction; ``acc``: top-1 accuracy of the classifier on ``h(phi_old)``).
    """
    _check_recipe(recipe, (FastFillRecipe,), "fit_fastfill")
    use_ce = recipe.mu != 0

    def terms(model, old_b, new_b, y_b, classifier):
        emb, log_sigma = model(old_b)
        logits = classifier(emb) if use_ce else None
        out = {"loss": fastfill_loss(emb, new_b, log_sigma, logits, y_b, mu=recipe.mu,
                                     label_smoothing=recipe.label_smoothing,
                                     mu_uncertainty=recipe.mu_uncertainty,
                                     regression=recipe.regression),
               "l2": feature_regression(emb.detach(), new_b, recipe.regression).mean()}
        if use_ce:
            out.update(_ce_terms(logits, y_b, recipe.label_smoothing))
        out["log_sigma"] = log_sigma.detach().mean()
        return out

    return _fit_forward(recipe, old_emb, new_emb, labels, classifier, model,
                        lambda a, b: _forward_model(recipe, a, b, uncertainty=True),
                        terms, use_ce, "new_emb", "FastFill", disable)


def fit_bict(recipe: BiCTRecipe, old_emb: Any, bct_emb: Any, labels: Any = None,
             classifier: nn.Module | None = None, *, h: nn.Module | None = None,
             disable: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """Train BiCT's forward transformation h: old embeddings -> the space of the
    backward-compatible (BCT) new model, with :func:`backfill_utils.compat.losses.bict_loss`.

    ``bct_emb``: cached train embeddings of the BCT backbone (same samples and passes as
    ``old_emb``); ``classifier``: the BCT backbone's frozen classifier; ``labels``: the
    training-class labels (not needed when ``recipe.ce_weight == 0``). At serving time the
    query is the BCT embedding, not-yet-backfilled items hold ``h(phi_old)`` and backfilled
    items the BCT embedding. Returns ``(h, history)``; history columns
    ``epoch, loss, l2[, ce, acc], lr``.
    """
    _check_recipe(recipe, (BiCTRecipe,), "fit_bict")
    use_ce = recipe.ce_weight != 0

    def terms(model, old_b, bct_b, y_b, classifier):
        emb = model(old_b)
        logits = classifier(emb) if use_ce else None
        out = {"loss": bict_loss(emb, bct_b, logits, y_b, ce_weight=recipe.ce_weight,
                                 feature_weight=recipe.feature_weight,
                                 label_smoothing=recipe.label_smoothing),
               "l2": feature_regression(emb.detach(), bct_b, "sum").mean()}
        if use_ce:
            out.update(_ce_terms(logits, y_b, recipe.label_smoothing))
        return out

    return _fit_forward(recipe, old_emb, bct_emb, labels, classifier, h,
                        lambda a, b: ForwardTransform(a, b, recipe.hidden, depth=recipe.depth, **_norm(recipe)),
                        terms, use_ce, "bct_emb", "BiCT h", disable)
