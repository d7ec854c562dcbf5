"""Equal-budget tuning (studies/tuning.py): the default recipe first, each method's own knobs, the
choice on the validation split, a tiny end-to-end run; missing outputs name their make target."""
import json

import optuna
import pandas as pd
import pytest

from backfill_utils import cache
from backfill_utils import config as C
from backfill_utils import session
from backfill_utils.backfill import registry as MM
from backfill_utils.studies import regimes as RG
from backfill_utils.studies import sensitivity as SE
from backfill_utils.studies import tuning as TU

from conftest import tiny_profile


@pytest.mark.parametrize("name", ["RM+psi", "RM+psi+CMCL", "Ours", "FCT", "FastFill", "BiCT"])
def test_trial_zero_is_the_default_recipe(name):
    cfg = C.load_profile("default")
    recipe = TU.suggest(optuna.trial.FixedTrial(TU.default_params(cfg, name)), cfg, name)
    default = MM.get(name).default_recipe(cfg)
    if hasattr(default, "arch"):  # FCT, FastFill: their authors' inner width, 16 x the embedding dimension
        assert recipe == default and recipe.hidden == 16 * cfg["embedding_dim"] == 2048
        return
    assert recipe.replace(hidden=None, **({"rho_hidden": None} if hasattr(recipe, "rho_hidden") else {})) == default
    assert recipe.hidden == 2 * cfg["embedding_dim"]  # hidden=None means twice the input dimension


def test_each_method_searches_its_own_knobs():
    cfg = C.load_profile("default")
    knobs = {}
    for name in TU.tune_config(cfg)["methods"]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(lambda t: float(TU.suggest(t, cfg, name).epochs), n_trials=1)
        knobs[name] = set(study.trials[0].params)
    shared = {"epochs", "lr", "weight_decay", "width_x", "depth"}
    assert knobs["RM+psi"] == shared and knobs["FCT"] == shared | {"arch", "regression"}
    assert knobs["Ours"] == shared | {"tau", "hard_negatives", "lambda_rev", "rho_width_x", "rho_depth"}
    assert knobs["FastFill"] == shared | {"mu", "mu_uncertainty", "arch", "regression"}
    assert knobs["BiCT"] == shared | {"ce_weight", "feature_weight"}


def test_select_takes_the_best_validation_trial_earliest_on_ties():
    rows = [("A", 0, True, 1.0), ("A", 1, False, 3.0), ("A", 2, False, 3.0), ("B", 0, True, 2.0), ("B", 1, False, 1.0)]
    trials = pd.DataFrame([{"method": m, "trial": t, "default": d, "val_auc_map": v,
                            "recipe": json.dumps({"recipe": "fct", "epochs": t + 1})} for m, t, d, v in rows])
    chosen = TU.select(trials)
    assert chosen["A"]["trial"] == 1 and chosen["A"]["recipe"]["epochs"] == 2
    assert chosen["B"]["trial"] == 0 and chosen["B"]["default_val_auc_map"] == 2.0


@pytest.mark.slow
def test_tiny_tuning_end_to_end(tmp_cache, tmp_path, monkeypatch):
    """Equal budgets, the default first, choices on the validation split, the test split over every seed;
    a second run proposes the same trials (seeded TPE) and costs nothing (cache)."""
    monkeypatch.setenv(C.RESULTS_ENV, str(tmp_path / "results"))
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"], compat_seeds=2, val_fraction=0.25,
                       compat={"epochs": 2, "batch_size": 16},
                       tune={"trials": 3, "startup_trials": 2, "methods": ["FCT", "Ours"],
                             "sensitivity": {"tau": [0.05], "hard_negatives": [], "lambda_rev": []}})
    trials = TU.search(cfg, progress=False)
    assert trials.groupby("method").size().to_dict() == {"FCT": 3, "Ours": 3}
    assert trials[trials.trial == 0]["default"].all() and not trials[trials.trial > 0]["default"].any()
    again = TU.search(cfg, progress=False)
    assert again["params"].tolist() == trials["params"].tolist()
    assert again["val_auc_map"].tolist() == trials["val_auc_map"].tolist()
    chosen = TU.select(trials)
    test = TU.evaluate_test(cfg, chosen, progress=False)
    assert len(test) == 2 * 2 * 2 and set(test["seed"]) == {cfg["seed"], cfg["seed"] + 1}
    folder = TU.write_outputs(cfg, trials, chosen, test)
    assert folder == tmp_path / "results" / "tuning" and not TU.missing_outputs(cfg)
    out = TU.read_outputs(cfg)
    assert set(out["table"]["method"]) == {"FCT", "Ours"} and (out["table"]["seeds"] == 2).all()
    raw = SE.study(cfg, chosen["Ours"]["recipe"], progress=False)
    assert set(raw["knob"]) == set(SE.KNOBS) and set(raw["split"]) == {"test", "val"}


def test_missing_study_outputs_name_the_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(C.RESULTS_ENV, str(tmp_path))
    cfg = C.load_profile("smoke")
    with pytest.raises(cache.MissingArtifactError, match="make tune PROFILE=smoke"):
        TU.read_outputs(cfg)
    with pytest.raises(cache.MissingArtifactError, match="make regimes PROFILE=smoke"):
        RG.read_outputs(cfg)
    relaxed = session.Run(cfg=cfg, out=tmp_path, strict=False, kind="render")
    assert relaxed.optional(lambda: TU.read_outputs(cfg)) is None
    assert "NOT RENDERED" in capsys.readouterr().out
    strict = session.Run(cfg=cfg, out=tmp_path, strict=True, kind="render")
    with pytest.raises(cache.MissingArtifactError):
        strict.optional(lambda: RG.read_outputs(cfg))
