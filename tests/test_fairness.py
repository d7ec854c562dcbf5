"""The fairness studies: worker processes (parallel.py), equal-budget tuning (tuning.py), the
sensitivity grid (sensitivity.py), the regime map (regimes.py), and the runner's render groups."""
import json
import operator

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from backfill_utils import config as C
from backfill_utils import embed as E
from backfill_utils import io
from backfill_utils import methods as MM
from backfill_utils import parallel as PL
from backfill_utils import query_cost as QC
from backfill_utils import regimes as RG
from backfill_utils import run as R
from backfill_utils import sensitivity as SE
from backfill_utils import session
from backfill_utils import train as T
from backfill_utils import tuning as TU
from conftest import tiny_profile


# --------------------------------------------------------------------------- parallel
def test_run_jobs_returns_results_in_job_order_with_workers():
    jobs = [(2, k) for k in range(6)]
    assert PL.run_jobs(operator.pow, jobs, n_workers=2, progress=False) == [2 ** k for k in range(6)]


def test_start_order_puts_dependencies_and_unblockers_first():
    # job 2 depends on 0; job 0 unblocks a job, so it starts before the costlier job 1
    assert PL._order(3, {2: {0}}, [1.0, 5.0, 1.0]) == [0, 1, 2]
    assert PL._order(3, {}, [1.0, 5.0, 2.0]) == [1, 2, 0]
    with pytest.raises(ValueError, match="cycle"):
        PL._order(2, {0: {1}, 1: {0}}, [1.0, 1.0])


def test_workers_from_the_environment(monkeypatch):
    monkeypatch.setenv(PL.WORKERS_ENV, "3")
    assert PL.workers() == 3 and PL.workers(1) == 1
    monkeypatch.setenv(PL.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="BACKFILL_WORKERS"):
        PL.workers()


def test_parallel_backbones_equal_serial_ones(tmp_path, monkeypatch):
    """Two worker processes train the same weights, bit for bit, as one process after the other."""
    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"])
    specs = [T.model_spec(cfg, "extended", r) for r in T.ROLES]
    weights = {}
    for n in (1, 2):
        monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / f"cache{n}"))
        T.train_many(specs, progress=False, n_workers=n)
        weights[n] = [torch.load(T.model_dir(s) / "model.pt") for s in specs]
    for a, b in zip(weights[1], weights[2]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetched_embeddings_curves_and_convergence_equal_serial_ones(tmp_path, monkeypatch):
    """Embeddings, curves and FCT's convergence history computed in two worker processes
    equal those computed in this process, bit for bit, and a second prefetch finds them cached."""
    from backfill_utils import convergence as CV
    from backfill_utils import experiments as X
    from backfill_utils import seeds as SD

    cfg = tiny_profile(train={"epochs": 1, "batch_size": 16}, settings=["extended"], compat_seeds=2,
                       val_fraction=0.25, compat={"epochs": 2, "batch_size": 16})
    names = ["old", "RM", "Ours"]
    out = {}
    # the same torch threads here as in the workers (the thread count changes the last bits of training)
    monkeypatch.setenv(C.THREADS_ENV, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n in (1, 2):
            monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / f"cache{n}"))
            T.train_many([T.model_spec(cfg, "extended", r) for r in T.ROLES], progress=False)
            if n == 2:
                assert X.prefetch_embeddings(cfg, progress=False) == 3 + len(X.train_roles())
                assert X.prefetch_embeddings(cfg, progress=False) == 0
                jobs = [("extended", m, None, sd) for sd in SD.seeds_of(cfg, "extended") for m in ("Ours",)]
                SD.train_jobs(cfg, jobs, progress=False, n_workers=2, also=CV.pool_job(cfg, "extended"))
                assert CV.pool_job(cfg, "extended") == []
                # a curve per method without training, one per seed of Ours
                assert SD.prefetch_curves(cfg, names, progress=False, n_workers=2) == 2 + 2
                assert SD.prefetch_curves(cfg, names, progress=False, n_workers=2) == 0
            emb = [E.get_embeddings(cfg, "extended", r, "test", progress=False)["emb"] for r in T.ROLES]
            _, summary = SD.evaluate_seeds(cfg, names, progress=False)
            out[n] = emb, summary, CV.fct_convergence(cfg, "extended", progress=False)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(out[1][0], out[2][0]):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(out[1][1], out[2][1])
    pd.testing.assert_frame_equal(out[1][2].drop(columns="seconds", errors="ignore"),
                                  out[2][2].drop(columns="seconds", errors="ignore"))


# --------------------------------------------------------------------------- tuning
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


def test_sensitivity_points_add_the_tuned_value():
    cfg = C.load_profile("smoke", overrides={"tune": {"sensitivity": {"tau": [0.3, 0.05], "hard_negatives": [16],
                                                                      "lambda_rev": [1.0]}}})
    tuned = {"tau": 0.1, "hard_negatives": None, "lambda_rev": 1.0}
    pts = SE.points(cfg, tuned)
    assert [v for k, v in pts if k == "tau"] == [0.05, 0.1, 0.3]
    assert [v for k, v in pts if k == "hard_negatives"] == [16, None]
    assert [v for k, v in pts if k == "lambda_rev"] == [1.0]
    bad = C.load_profile("smoke", overrides={"tune": {"sensitivity": {"tau": [0.1], "hard_negatives": [],
                                                                      "lambda_rev": [], }}})
    bad["tune"]["sensitivity"]["temperature"] = [1.0]
    with pytest.raises(ValueError, match="temperature"):
        SE.points(bad, tuned)


# --------------------------------------------------------------------------- regimes
def test_variants_change_only_the_old_model_or_a_family():
    cfg = C.load_profile("default")
    cfgs = RG.variant_cfgs(cfg)
    assert set(cfgs) == set(cfg["regimes"]["variants"])
    families = {}
    for name, c in cfgs.items():
        families.setdefault(RG.family(cfg["regimes"]["variants"][name]), []).append(c)
    for members in families.values():  # one new model's side per family, one old model's per variant
        news = {json.dumps(E.embedding_spec(c, "extended", "new"), sort_keys=True) for c in members}
        olds = {json.dumps(E.embedding_spec(c, "extended", "old"), sort_keys=True) for c in members}
        assert len(news) == 1 and len(olds) == len(members)
    assert len(families) == 3 and "normalize_embeddings: false" in families
    assert all(c["settings"] == ["extended"] for c in cfgs.values())
    assert T.model_spec(cfgs["50% of classes (default)"], "extended", "old") == T.model_spec(cfg, "extended", "old")
    cfg["regimes"]["variants"]["bigger new"] = {"new_backbone": {"width": 64}}
    with pytest.raises(ValueError, match="only the old model"):
        RG.regime_config(cfg)


def test_normalisation_study_sets_each_raw_variant_beside_its_normalised_twin():
    rows = []
    for variant, changes, m_old, m_new, auc in (
            ("default", {}, 20.0, 40.0, {"RM": 25.0, "Ours": 35.0, "FCT": 30.0, "FastFill": 32.0}),
            ("raw", {"normalize_embeddings": False}, 15.0, 35.0, {"RM": 20.0, "Ours": 26.0, "FCT": 27.0,
                                                                  "FastFill": 29.0}),
            ("weak", {"old_fraction": 0.1}, 10.0, 40.0, {"RM": 12.0, "Ours": 30.0, "FCT": 20.0, "FastFill": 21.0})):
        for method, a in auc.items():
            rows.append({"variant": variant, "method": method, "seeds": 2, "auc_map": a,
                         "rel_gain_map": (a - m_old) / (m_new - m_old), "m_old": m_old, "m_new": m_new,
                         "data": RG.family(changes), "changes": json.dumps(changes, sort_keys=True)})
    study = RG.normalisation_study(pd.DataFrame(rows))
    assert study["variant"].tolist() == ["default", "raw"] and study["study"].tolist() == ["raw", "raw"]
    assert study["normalize_embeddings"].tolist() == [True, False]
    np.testing.assert_allclose(study["rm_gain_%"], [25.0, 25.0])
    np.testing.assert_allclose(study["ours_minus_fct_auc_map"], [5.0, -1.0])
    np.testing.assert_allclose(study["ours_minus_fastfill_auc_map"], [3.0, -3.0])
    assert RG.normalisation_study(pd.DataFrame(rows[:4])).empty  # no raw variant: no rows
    with pytest.raises(ValueError, match="make regimes"):
        RG.normalisation_study(pd.DataFrame(rows).drop(columns="changes"))
    cfg = C.load_profile("smoke", overrides={"regimes": {"variants": {"raw": {"normalize_embeddings": 0}}}})
    with pytest.raises(ValueError, match="normalize_embeddings must be true or false"):
        RG.variant_cfgs(cfg)


def test_winners_pair_the_seeds():
    rows = []
    for v, x, (ours, fct, ff) in (("weak", 0.3, ([0.8, 0.82], [0.5, 0.52], [0.4, 0.45])),
                                  ("strong", 0.9, ([0.6, 0.58], [0.9, 0.93], [0.95, 0.91]))):
        for seed in (0, 1):
            for m, g in (("Ours", ours), ("FCT", fct), ("FastFill", ff)):
                rows.append({"variant": v, "method": m, "seed": seed, "rel_gain_map": g[seed],
                             "old_over_new": x, "fct_r0_over_new": x, "m_old": 10.0, "m_new": 30.0,
                             "fct_r0_map": 20.0 if v == "strong" else 12.0, "ours_r0_map": 11.0,
                             "final_map": 34.0 if v == "weak" else 30.0})
    win = RG.winners(pd.DataFrame(rows)).set_index("variant")
    # weak: Ours - best forward per seed = [0.3, 0.3] points x 100; strong: [0.6 - 0.95, 0.58 - 0.93]
    assert win.loc["weak", "reverse_minus_forward"] == pytest.approx(30.0)
    assert win.loc["weak", "winner"] == "reverse" and win.loc["strong", "winner"] == "forward"
    assert win.loc["strong", "reverse_minus_forward"] == pytest.approx(-35.0)
    cross = RG.crossover(win.reset_index())
    assert cross["at"].tolist() == pytest.approx([0.3 + 0.6 * 30 / 65])
    # what decides it: the forward head start at ratio 0 and Ours' end above new/new, in % of the gap of 20
    assert win.loc["strong", "start_gap_%"] == pytest.approx(100 * 9 / 20) and win.loc["strong", "end_bonus_%"] == 0
    assert win.loc["weak", "start_gap_%"] == pytest.approx(5.0) and win.loc["weak", "end_bonus_%"] == pytest.approx(20.0)
    # two data families are not neighbours on the axes of the map, but one on the decider's axis
    fam = win.reset_index().assign(data=["a", "b"])
    assert RG.crossover(fam).empty and len(RG.crossover(fam, "start_gap_minus_end_bonus", by_family=False)) == 1


# --------------------------------------------------------------------------- runner, rendering, costs
def test_render_notebooks_run_side_by_side_compute_notebooks_alone():
    books = R.list_notebooks()
    groups = R.render_groups(books, 2)
    assert [b for g in groups for b in g] == books
    for g in groups:
        assert len(g) == 1 or all(R.is_render(b) for b in g)
    assert not R.is_render(C.NOTEBOOKS_DIR / "30_compat.ipynb") and R.is_render(C.NOTEBOOKS_DIR / "53_regimes.ipynb")
    assert all(len(g) == 1 for g in R.render_groups(books, 1))


def test_missing_study_outputs_name_the_target(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(C.RESULTS_ENV, str(tmp_path))
    cfg = C.load_profile("smoke")
    with pytest.raises(io.MissingArtifactError, match="make tune PROFILE=smoke"):
        TU.read_outputs(cfg)
    with pytest.raises(io.MissingArtifactError, match="make regimes PROFILE=smoke"):
        RG.read_outputs(cfg)
    relaxed = session.Run(cfg=cfg, out=tmp_path, strict=False, kind="render")
    assert relaxed.optional(lambda: TU.read_outputs(cfg)) is None
    assert "NOT RENDERED" in capsys.readouterr().out
    strict = session.Run(cfg=cfg, out=tmp_path, strict=True, kind="render")
    with pytest.raises(io.MissingArtifactError):
        strict.optional(lambda: RG.read_outputs(cfg))


def test_gallery_transform_time_is_measured_per_million_items():
    h = torch.nn.Linear(8, 8)
    s = QC.time_gallery_transform(h, 8, items=4096, batch_size=1024, repeats=1)
    assert 0 < s < 1e4
    with pytest.raises(ValueError, match="items"):
        QC.time_gallery_transform(h, 8, items=0)


def test_variants_are_replaced_whole_by_an_override_and_checked():
    cfg = C.load_profile("default", overrides={"regimes": {"variants": {"only": {"old_fraction": 0.3}}}})
    assert list(cfg["regimes"]["variants"]) == ["only"]
    few = C.load_profile("default", overrides={"regimes": {"variants": {"one class": {
        "old_fraction": 0.1, "dataset_options": {"num_classes": 10}}}}})
    with pytest.raises(ValueError, match="one class.*1 class"):
        RG.variant_cfgs(few)
    # a data family: the new model changes with the data, the variant names its data
    fam = C.load_profile("default", overrides={"regimes": {"variants": {
        "a": {}, "b": {"dataset_options": {"num_classes": 10}}}}})
    cfgs = RG.variant_cfgs(fam)
    assert T.model_spec(cfgs["a"], "extended", "new") != T.model_spec(cfgs["b"], "extended", "new")
