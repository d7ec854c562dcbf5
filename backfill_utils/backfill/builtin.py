"""The package's own registrations: the paper's methods (PAPER.md section 3) and BiCT.

Registered on the first use of :mod:`backfill_utils.backfill.registry` (every lookup there
imports this module), in this order, which is the order of every table and legend:

========================  ==================================================
old, new                  old/old and new/new (flat references)
offline                   old until r = 1, then new
naive                     phi_new query vs the mixed gallery
BCT                       BCT-trained new model vs the mixed gallery
FCT                       phi_new query; old items hold h(phi_old)
FastFill                  FCT + uncertainty and classification term, backfilled
                          by descending sigma (FCT and FastFill: their authors'
                          transformation and training recipe)
FCT-small, FastFill-small the same with this package's small h (one hidden layer
                          of width 2 d) on the shared compat schedule
BiCT                      BCT query; old items hold h(phi_old), h trained towards
                          the BCT model's space
RM                        rank merge of old/old and new/new (2 query passes)
RM+psi                    merge of {psi(phi_new), phi_old} and {phi_new, phi_new}
RM+psi+CMCL               the same with psi trained by joint CMCL + L_rev
Ours                      + learnable new embedding rho (psi, rho joint)
CMCL-single               psi trained with the backward system's loss only (L_A)
CMCL-separate             psi and rho, each system's loss with its own negatives
CMCL w/o L_rev            joint CMCL (psi only) with lambda_rev = 0
========================  ==================================================
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .. import config as C
from ..compat import modules as K
from ..compat.fit import fit_bict, fit_fastfill, fit_fct, fit_reverse
from ..compat.recipes import (
    BiCTRecipe, CMCLPsiRecipe, CMCLPsiRhoRecipe, FastFillRecipe, FCTRecipe, Recipe, RevPsiRecipe)

from .registry import Method, Trained, recipe_from_profile, register, mark_builtin


# --------------------------------------------------------------------------- the paper's methods
def _fit_reverse(data, recipe) -> Trained:
    psi, rho, hist = fit_reverse(recipe, data.embeddings("new"), data.embeddings("old"), data.labels,
                                 disable=not data.progress)
    return Trained(psi=psi, rho=rho, history=hist)


def _fit_fct(data, recipe) -> Trained:
    h, hist = fit_fct(recipe, data.embeddings("old"), data.embeddings("new"), disable=not data.progress)
    return Trained(h=h, history=hist)


def _fit_fastfill(data, recipe) -> Trained:
    h, hist = fit_fastfill(recipe, data.embeddings("old"), data.embeddings("new"), data.labels,
                           data.classifier("new"), disable=not data.progress)
    return Trained(h=h, history=hist)


def _fit_bict(data, recipe) -> Trained:
    h, hist = fit_bict(recipe, data.embeddings("old"), data.embeddings("bct"), data.labels,
                       data.classifier("bct"), disable=not data.progress)
    return Trained(h=h, history=hist)


def _fastfill_order(trained: Trained, old_gallery: np.ndarray) -> np.ndarray:
    return K.fastfill_order(trained.h, old_gallery)


def _components_rm(recipe: Any) -> dict[str, bool]:
    return dict(psi=False, CMCL=False, L_rev=False, rho=False)


def _reverse_components(recipe: Recipe) -> dict[str, bool]:
    cmcl = not isinstance(recipe, RevPsiRecipe)
    return dict(psi=True, CMCL=cmcl, L_rev=bool(recipe.lambda_rev > 0) if cmcl else True,
                rho=isinstance(recipe, CMCLPsiRhoRecipe))


def _reverse(name: str, cls: type[Recipe], style: dict, description: str, groups: tuple[str, ...],
             **fixed: Any) -> Method:
    """A reverse-transform method: psi (and rho for CMCLPsiRhoRecipe) trained by fit_reverse."""
    return Method(name, style, description, groups,
                  slots=("psi", "rho") if cls is CMCLPsiRhoRecipe else ("psi",),
                  fit=_fit_reverse, recipe=lambda cfg: recipe_from_profile(cls, cfg, **fixed),
                  train_roles=("old", "new"), components=_reverse_components)


def _forward(name: str, cls: type[Recipe], style: dict, description: str, groups: tuple[str, ...],
             fit: Callable, prefix: str | None = None, small: bool = False, **kw: Any) -> Method:
    """A forward-transformation method: h (old -> the query model's space) on the gallery side.

    FCT and FastFill (``prefix`` given) start from their authors' recipe, changed by their own
    ``compat.<prefix>_*`` keys only; ``small=True``: the small h (:data:`SMALL_H`) on the shared
    ``compat`` schedule, the method's own loss keys (e.g. ``fastfill_mu``) still applied."""
    def recipe(cfg: dict) -> Recipe:
        if not small:
            fixed = {}
            if cls is FastFillRecipe and f"{prefix}_regression" not in cfg["compat"]:
                fixed["regression"] = fastfill_regression(cfg)
            return recipe_from_profile(cls, cfg, prefix, shared=cls is BiCTRecipe, **fixed)
        schedule = {k: cfg["compat"][k] for k in ("epochs", "batch_size", "lr") if k in cfg["compat"]}
        return recipe_from_profile(cls, cfg, prefix, **SMALL_H, **schedule)

    return Method(name, style, description, groups, slots=("h",), fit=fit, recipe=recipe, **kw)


def fastfill_regression(cfg: dict) -> str:
    """FastFill's regression term at its authors' balance with the cross-entropy: their
    element-wise mean (``"mean"``) on unnormalised embeddings, as in their code; on
    L2-normalised embeddings that term is ``d`` times smaller than on their features (norm of
    order ``sqrt(d)``), so the sum over dimensions (``"sum"``) restores the balance."""
    return "sum" if C.normalize_embeddings(cfg) else "mean"


#: The small h of FCT and FastFill kept beside the authors' transformation: this package's
#: one-hidden-layer MLP (width 2 d) on the shared ``compat`` schedule (epochs, batch, lr), no
#: warm-up, no weight decay, BatchNorm in training mode throughout, the summed squared error.
SMALL_H = dict(arch="mlp", hidden=None, depth=1, weight_decay=0.0, warmup_epochs=0, bn_eval_half=False,
               regression="sum")


# Registration order is the order of every table and legend.
for _m in [
    Method("old", dict(ls=":"), "old/old: the old model on the old gallery",
           ("main", "fig2", "settings"), backbone="old", reference="old"),
    Method("new", dict(ls=":"), "new/new: the new model on a fully backfilled gallery",
           ("main", "fig2", "settings"), reference="new"),
    Method("offline", dict(ls="--"), "offline backfilling: old/old until r = 1, then new/new",
           ("main", "fig2", "flips", "settings", "serving"), backbone="old", reference="offline"),
    Method("naive", dict(ls="-"), "phi_new queries against the mixed gallery",
           ("main", "flips")),
    Method("BCT", dict(ls="-"), "backward-compatible new model (influence loss) "
           "against the mixed gallery", ("main", "flips", "settings"), backbone="bct"),
    _forward("FCT", FCTRecipe, dict(ls="-"), "phi_new queries; old items hold h(phi_old), "
             "h regressed to phi_new (the authors' transformation and schedule)",
             ("main", "flips", "settings", "order_study", "serving"), _fit_fct, "fct",
             train_roles=("old", "new")),
    _forward("FastFill", FastFillRecipe, dict(ls="-"), "FCT's h with uncertainty and the "
             "new classifier's cross-entropy; backfilled by descending uncertainty",
             ("main", "flips", "settings"), _fit_fastfill, "fastfill",
             train_roles=("old", "new"), order=_fastfill_order, order_name="sigma"),
    _forward("FCT-small", FCTRecipe, dict(ls=":"), "FCT with a small h (one hidden layer "
             "of width 2 d, the shared compat schedule)", ("main",), _fit_fct,
             "fct", small=True, train_roles=("old", "new")),
    _forward("FastFill-small", FastFillRecipe, dict(ls=":"), "FastFill with a small h "
             "(one hidden layer of width 2 d, the shared compat schedule)", ("main",),
             _fit_fastfill, "fastfill", small=True, train_roles=("old", "new"),
             order=_fastfill_order, order_name="sigma"),
    _forward("BiCT", BiCTRecipe, dict(ls="-."), "BCT queries; old items hold h(phi_old), "
             "h trained towards the BCT model's space", ("main", "flips", "settings"), _fit_bict, "bict",
             backbone="bct", train_roles=("old", "bct")),
    Method("RM", dict(ls="-"), "rank merge: phi_old and phi_new searches merged by "
           "distance (two query passes)", ("main", "fig2", "ablation", "distances", "flips", "settings",
                                           "order_study", "animation", "serving"),
           two_pass=True, components=_components_rm),
    _reverse("RM+psi", RevPsiRecipe, dict(ls="-"), "psi trained with L_rev only "
             "(before CMCL)", ("main", "ablation", "cmcl_variants", "distances", "flips")),
    _reverse("RM+psi+CMCL", CMCLPsiRecipe, dict(ls="-"), "psi trained with joint CMCL "
             "+ L_rev", ("main", "ablation", "cmcl_variants", "distances", "flips", "settings"), variant="joint"),
    _reverse("CMCL-single", CMCLPsiRecipe, dict(ls="-."), "psi trained with the backward "
             "system's loss only", ("cmcl_variants",), variant="single"),
    # with a frozen new model the separate variant gives psi exactly the gradient of the single
    # one, so separate (and joint = Ours) are compared with rho trained
    _reverse("CMCL-separate", CMCLPsiRhoRecipe, dict(ls="--"), "psi and rho, each "
             "system's loss with its own negatives only", ("cmcl_variants",), variant="separate"),
    _reverse("CMCL w/o L_rev", CMCLPsiRecipe, dict(ls="-."), "joint CMCL (psi only) "
             "without L_rev", ("ablation",), variant="joint", lambda_rev=0.0),
    _reverse("Ours", CMCLPsiRhoRecipe, dict(ls="-", lw=2.2), "psi and rho trained "
             "jointly with CMCL + L_rev (the paper's method)",
             ("main", "ablation", "cmcl_variants", "distances", "flips", "settings", "order_study",
              "animation", "serving"), variant="joint"),
]:
    register(_m)
del _m
mark_builtin()
