"""Tests of backfill_utils.compat.recipes: validation and the JSON round trip.

(That the recipes equal to the COMPAT_VERSION 1 defaults trained bit-identical modules to
the old flag interface was checked against a frozen copy of the old code in commit 8a7b616;
the flag interface and that copy are gone.)"""

import dataclasses
import json

import pytest

from backfill_utils.compat.recipes import (
    RECIPES,
    BiCTRecipe,
    CMCLPsiRecipe,
    CMCLPsiRhoRecipe,
    FastFillRecipe,
    FCTRecipe,
    RevPsiRecipe,
    recipe_from_dict,
)


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
    from backfill_utils.compat.recipes import Recipe

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
