"""Tests of backfill_utils.recipes: validation, JSON round trip, and that the recipes
equal to the old defaults train bit-identical modules to the COMPAT_VERSION 1 code."""

import dataclasses
import json

import legacy_compat_v1 as legacy
import numpy as np
import pytest
import torch
from compat_problems import single_thread, synthetic, unit  # noqa: F401 (fixture)

from backfill_utils import compat
from backfill_utils.compat_train import fit_fastfill, fit_fct, fit_reverse
from backfill_utils.recipes import (
    RECIPES,
    BiCTRecipe,
    CMCLPsiRecipe,
    CMCLPsiRhoRecipe,
    FastFillRecipe,
    FCTRecipe,
    RevPsiRecipe,
    recipe_from_dict,
)


@pytest.fixture(scope="module")
def data():
    new, old, y, _ = synthetic(n_per_class=12)
    return new, old, y


def _same_modules(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:  # exact: same code path, same process, same machine
        assert torch.equal(sa[k], sb[k]), k


# --------------------------------------------------------------------------- #
# the old defaults, bit for bit
# --------------------------------------------------------------------------- #
# legacy keyword arguments of compat.train_reverse (COMPAT_VERSION 1) -> the recipe
REVERSE_CASES = [
    (dict(), RevPsiRecipe()),
    (dict(use_cmcl=True), CMCLPsiRecipe()),
    (dict(use_cmcl=True, variant="single", lambda_rev=0.0),
     CMCLPsiRecipe(variant="single", lambda_rev=0.0)),
    (dict(use_cmcl=True, learn_new=True), CMCLPsiRhoRecipe()),
    (dict(use_cmcl=True, learn_new=True, variant="separate", hard_negatives=5, tau=0.2,
          distance="squared", samples_per_class=3, hidden=12, lr=3e-3, batch_size=36,
          epochs=4, optimizer="sgd", weight_decay=1e-4, seed=3),
     CMCLPsiRhoRecipe(variant="separate", hard_negatives=5, tau=0.2, distance="squared",
                      samples_per_class=3, hidden=12, rho_hidden=12, lr=3e-3, batch_size=36,
                      epochs=4, optimizer="sgd", weight_decay=1e-4, seed=3)),
]


@pytest.mark.parametrize("flags,recipe,passes",
                         [c + (1,) for c in REVERSE_CASES] + [REVERSE_CASES[3] + (3,)],
                         ids=["rev_psi", "cmcl_psi", "cmcl_single_no_rev", "cmcl_psi_rho",
                              "cmcl_separate_custom", "cmcl_psi_rho_3_passes"])
def test_reverse_recipe_equals_legacy_training(data, flags, recipe, passes):
    new, old, y = data
    if passes > 1:
        g = np.random.default_rng(5)
        new = unit(new[None] + 0.05 * g.normal(size=(passes,) + new.shape))
        old = unit(old[None] + 0.05 * g.normal(size=(passes,) + old.shape))
    want_psi, want_rho, want_hist = legacy.train_reverse(new, old, y, disable=True, **flags)
    for psi, rho, hist in (fit_reverse(recipe, new, old, y, disable=True),
                           compat.train_reverse(new, old, y, disable=True, **flags)):
        _same_modules(psi, want_psi)
        assert (rho is None) == (want_rho is None)
        if rho is not None:
            _same_modules(rho, want_rho)
        assert list(hist.columns) == list(want_hist.columns) and hist.equals(want_hist)


def test_forward_recipes_equal_legacy_training(data):
    new, old, _ = data
    want_h, want_hist = legacy.train_fct(old, new, disable=True)
    for h, hist in (fit_fct(FCTRecipe(), old, new, disable=True),
                    compat.train_fct(old, new, disable=True)):
        _same_modules(h, want_h)
        assert hist.equals(want_hist)
    # FastFill before COMPAT_VERSION 2 = no classification term, summed squared error
    want_m, want_hist = legacy.train_fastfill(old, new, disable=True, epochs=5, seed=2)
    old_ff = FastFillRecipe(mu=0.0, regression="sum", epochs=5, seed=2)
    for m, hist in (fit_fastfill(old_ff, old, new, disable=True),
                    compat.train_fastfill(old, new, disable=True, epochs=5, seed=2)):
        _same_modules(m, want_m)
        assert hist.equals(want_hist)


# --------------------------------------------------------------------------- #
# JSON and validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_round_trip_through_json(name):
    cls = RECIPES[name]
    r = cls()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["recipe"] == name and recipe_from_dict(d) == r
    assert set(d) - {"recipe"} == {f.name for f in dataclasses.fields(cls)}
    changed = r.replace(lr=2, depth=2, seed=5)
    assert changed.lr == 2.0 and isinstance(changed.lr, float)  # ints become floats
    assert recipe_from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.lr = 1.0


def test_base_recipe_is_not_a_recipe():
    from backfill_utils.recipes import Recipe

    with pytest.raises(TypeError, match="use one of"):
        Recipe()


def test_recipe_from_dict_errors():
    with pytest.raises(ValueError, match="recipe 'nope' is not one of"):
        recipe_from_dict({"recipe": "nope"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['tau'\] for recipe 'fct'"):
        recipe_from_dict({"recipe": "fct", "tau": 0.1})


@pytest.mark.parametrize("cls,field,value", [
    (FCTRecipe, "epochs", 0),
    (FCTRecipe, "epochs", 2.5),
    (FCTRecipe, "epochs", True),
    (RevPsiRecipe, "batch_size", 1),
    (RevPsiRecipe, "lr", 0.0),
    (RevPsiRecipe, "lr", float("nan")),
    (RevPsiRecipe, "optimizer", "adamw"),
    (RevPsiRecipe, "weight_decay", -1.0),
    (RevPsiRecipe, "hidden", 0),
    (RevPsiRecipe, "depth", 0),
    (RevPsiRecipe, "normalize", 1),
    (RevPsiRecipe, "seed", -1),
    (CMCLPsiRecipe, "tau", 0.0),
    (CMCLPsiRecipe, "hard_negatives", 0),
    (CMCLPsiRecipe, "samples_per_class", 0),
    (CMCLPsiRecipe, "lambda_rev", -0.5),
    (CMCLPsiRecipe, "distance", "cosine"),
    (CMCLPsiRecipe, "variant", "separate"),
    (CMCLPsiRhoRecipe, "variant", "single"),
    (CMCLPsiRhoRecipe, "rho_depth", 0),
    (CMCLPsiRhoRecipe, "rho_hidden", -3),
    (FastFillRecipe, "mu", -1.0),
    (FastFillRecipe, "label_smoothing", 1.0),
    (FastFillRecipe, "mu_uncertainty", 0.0),
    (FastFillRecipe, "regression", "median"),
    (BiCTRecipe, "ce_weight", -1.0),
    (BiCTRecipe, "feature_weight", float("inf")),
    (BiCTRecipe, "label_smoothing", -0.1),
])
def test_invalid_field_is_named(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{field: value})


def test_invalid_combinations_are_named():
    with pytest.raises(ValueError, match=r"CMCLPsiRecipe.batch_size=6 with samples_per_class=4"):
        CMCLPsiRecipe(batch_size=6)
    with pytest.raises(ValueError, match="ce_weight and BiCTRecipe.feature_weight are both 0"):
        BiCTRecipe(ce_weight=0, feature_weight=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'tau'"):
        RevPsiRecipe(tau=0.1)  # L_rev-only psi has no CMCL fields


def test_legacy_flag_errors(data):
    new, old, y = data
    kw = dict(epochs=1, disable=True)
    with pytest.raises(ValueError, match="learn_new=True needs use_cmcl"):
        compat.train_reverse(new, old, y, learn_new=True, **kw)
    with pytest.raises(ValueError, match="single"):
        compat.train_reverse(new, old, y, use_cmcl=True, learn_new=True, variant="single", **kw)
    with pytest.raises(ValueError, match="nothing to train"):
        compat.train_reverse(new, old, y, lambda_rev=0.0, **kw)
    with pytest.raises(ValueError, match="variant"):
        compat.train_reverse(new, old, y, use_cmcl=True, variant="both", **kw)
    with pytest.raises(ValueError, match="without rho gives psi exactly the gradient"):
        compat.train_reverse(new, old, y, use_cmcl=True, variant="separate", **kw)
    with pytest.raises(ValueError, match="learn_new=False"):
        compat.train_reverse(new, old, y, rho=compat.LearnableEmbedding(16), **kw)
    with pytest.raises(ValueError, match="epochs"):
        compat.train_fastfill(old, new, epochs=0)
