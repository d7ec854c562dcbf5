"""own_models: reading and checking own embeddings (every error before training), training the
registry's embedding-only methods on them, their curves against the engine's references."""
from __future__ import annotations

import numpy as np
import pytest

from backfill_utils import config as C
from backfill_utils.backfill import registry as MM
from backfill_utils.retrieval import metrics as MT
from backfill_utils.studies import own_models as OM


def make_arrays(n_train=160, n_test=40, d_old=6, d_new=8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    ytr, yte = np.arange(n_train) % classes, np.arange(n_test) % classes

    def emb(y, d, centers, sigma):
        return (centers[y] + sigma * rng.standard_normal((len(y), d))).astype(np.float32)

    co, cn = rng.standard_normal((classes, d_old)), rng.standard_normal((classes, d_new))
    return {"old_train": emb(ytr, d_old, co, 1.0), "new_train": emb(ytr, d_new, cn, 0.6), "train_labels": ytr,
            "old_test": emb(yte, d_old, co, 1.0), "new_test": emb(yte, d_new, cn, 0.6), "test_labels": yte}


def save(tmp_path, arrays):
    paths = {}
    for n, a in arrays.items():
        paths[n] = tmp_path / f"{n}.npy"
        np.save(paths[n], np.asarray(a))
    return paths


def test_load_reads_normalises_and_keeps_rows(tmp_path):
    arrays = make_arrays()
    emb = OM.load_own_embeddings(save(tmp_path, arrays))
    for n in ("old_train", "new_train", "old_test", "new_test"):
        x = getattr(emb, n)
        ref = arrays[n] / np.linalg.norm(arrays[n].astype(np.float64), axis=1, keepdims=True)
        assert x.dtype == np.float32 and np.allclose(x, ref, rtol=0, atol=1e-6), n
    assert np.array_equal(emb.test_labels, arrays["test_labels"]) and emb.train_labels.dtype == np.int64
    raw = OM.load_own_embeddings(save(tmp_path, arrays), normalize=False)
    assert np.array_equal(raw.old_test, arrays["old_test"])


def _broken(name, value):
    def change(a):
        a = dict(a)
        a[name] = value(a[name]) if callable(value) else value
        return a
    return change


CASES = {
    "lengths": (_broken("new_train", lambda x: x[:-1]), r"mismatched lengths in the train split"),
    "labels length": (_broken("test_labels", lambda y: y[:-2]), r"mismatched lengths in the test split"),
    "dimension": (_broken("old_test", lambda x: x[:, :-1]), r"old_test has dimension 5 but old_train has 6"),
    "nan": (_broken("new_test", lambda x: np.where(np.arange(len(x))[:, None] == 3, np.nan, x)),
            r"new_test .* NaN or infinite values in 1 rows \(first rows: \[3\]\)"),
    "inf": (_broken("old_train", lambda x: np.where(x > 2.5, np.inf, x)), r"old_train .*NaN or infinite"),
    "1-D embeddings": (_broken("old_train", lambda x: x[:, 0]), r"old_train .* must be a non-empty \(n, d\) array"),
    "float labels": (_broken("train_labels", lambda y: y + 0.5), r"train_labels .* integer class labels"),
    "2-D labels": (_broken("test_labels", lambda y: y[:, None]), r"test_labels .* 1-D array"),
    "single test image": (_broken("test_labels", lambda y: np.where(np.arange(len(y)) == 0, 99, y)),
                          r"classes \[99\] have a single test image"),
    "zero row": (_broken("new_train", lambda x: np.where(np.arange(len(x))[:, None] == 0, 0, x)),
                 r"new_train .* all-zero rows"),
    "one class": (_broken("train_labels", lambda y: np.zeros_like(y)), r"a single class"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_files_are_clear_errors_naming_the_file(tmp_path, case):
    change, match = CASES[case]
    paths = save(tmp_path, change(make_arrays()))
    with pytest.raises(ValueError, match=match) as info:
        OM.load_own_embeddings(paths)
    if case not in ("lengths", "labels length", "dimension", "single test image", "one class"):
        assert str(tmp_path) in str(info.value)  # the file is named


def test_missing_unreadable_or_unnamed_files(tmp_path):
    paths = save(tmp_path, make_arrays())
    with pytest.raises(FileNotFoundError, match=r"old_test: no such file .*nope\.npy"):
        OM.load_own_embeddings({**paths, "old_test": tmp_path / "nope.npy"})
    with pytest.raises(ValueError, match=r"new_test: no path given"):
        OM.load_own_embeddings({**paths, "new_test": None})
    with pytest.raises(ValueError, match=r"unknown file name\(s\) \['old_tset'\]"):
        OM.load_own_embeddings({**paths, "old_tset": paths["old_test"]})
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"old_train: .*obj\.npy is not a readable \.npy array"):
        OM.load_own_embeddings({**paths, "old_train": tmp_path / "obj.npy"})
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(ValueError, match=r"train_labels: .*text\.npy is not a readable"):
        OM.load_own_embeddings({**paths, "train_labels": tmp_path / "text.npy"})


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BACKFILL_CACHE", str(tmp_path_factory.mktemp("cache")))
    cfg = C.load_profile("smoke", compat={"epochs": 1, "batch_size": 32})
    emb = OM.check_own_embeddings(make_arrays())
    yield cfg, emb, OM.evaluate_own(emb, cfg, progress=False)
    mp.undo()


@pytest.mark.slow
def test_embedding_only_methods_are_trained_the_others_skipped(own_run):
    cfg, emb, (curves, summary, trained, skipped) = own_run
    main = MM.names("main")
    assert set(skipped) == {"BCT", "BiCT", "FastFill", "FastFill-small", "naive"}
    assert "classifier" in skipped["FastFill"] and "classifier" in skipped["FastFill-small"]
    assert "d_old = d_new (6 != 8)" in skipped["naive"]
    assert list(summary["method"]) == [n for n in main if n not in skipped]
    assert set(trained) == {"FCT", "FCT-small", "RM+psi", "RM+psi+CMCL", "Ours"}
    assert trained["Ours"].psi is not None and trained["Ours"].rho is not None and trained["FCT"].h is not None
    for n in summary["method"]:
        assert len(curves[curves.method == n]) == cfg["eval"]["num_ratios"], n


@pytest.mark.slow
def test_curves_end_at_the_engines_references(own_run):
    cfg, emb, (curves, summary, trained, skipped) = own_run
    y = emb.test_labels
    old = MT.evaluate_retrieval(emb.old_test, y, emb.old_test, y, exclude_self=True)
    new = MT.evaluate_retrieval(emb.new_test, y, emb.new_test, y, exclude_self=True)
    rm = curves[curves.method == "RM"].sort_values("ratio")
    assert rm["mAP"].iloc[0] == pytest.approx(old["mAP"], abs=1e-9)
    assert rm["mAP"].iloc[-1] == pytest.approx(new["mAP"], abs=1e-9)
    s = summary.set_index("method")
    assert s.loc["offline", "final_map"] == pytest.approx(new["mAP"], abs=1e-9)
    assert s.loc["RM", "query_passes"] == 2 and s.loc["Ours", "extra_params"] == trained["Ours"].n_params > 0


@pytest.mark.slow
def test_training_is_cached_by_content(own_run, monkeypatch):
    cfg, emb, (curves, summary, trained, skipped) = own_run
    monkeypatch.setattr(OM, "OwnData", lambda *a, **k: pytest.fail("trained again"))
    again = OM.train_own(emb, cfg, "FCT", progress=False)  # from the cache: the same weights
    for k, v in trained["FCT"].h.state_dict().items():
        assert np.array_equal(v.numpy(), again.h.state_dict()[k].numpy()), k
    other = OM.check_own_embeddings(make_arrays(seed=1))
    assert other.digest() != emb.digest() and OM._own_key(other, cfg, "FCT") != OM._own_key(emb, cfg, "FCT")
    with pytest.raises(OM.NeedsClassifier, match="bct"):
        OM.train_own(emb, cfg, "BiCT")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:relative gain:RuntimeWarning")  # tiny arrays: top-5 saturates at 100
def test_worker_processes_train_the_same_modules(tmp_path, monkeypatch):
    """With 2 workers the modules are trained in worker processes (read from the files) and
    read from the cache here: the same weights as one process trains."""
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BACKFILL_THREADS", "1")
    cfg = C.load_profile("smoke", compat={"epochs": 1, "batch_size": 32})
    paths = save(tmp_path, make_arrays(n_train=80, n_test=20))
    emb = OM.load_own_embeddings(paths)
    names = ["RM", "FCT", "RM+psi"]
    monkeypatch.setenv("BACKFILL_WORKERS", "2")
    OM._pretrain(paths, emb, cfg, names, True, False)
    from backfill_utils import cache
    for n in ("FCT", "RM+psi"):  # written by the workers
        assert cache.cache_path("compat", OM._own_key(emb, cfg, n)).is_file(), n
    _, s2, t2, _ = OM.evaluate_own(emb, cfg, names, paths=paths, progress=False)
    monkeypatch.setenv("BACKFILL_CACHE", str(tmp_path / "cache1"))
    monkeypatch.setenv("BACKFILL_WORKERS", "1")
    _, s1, t1, _ = OM.evaluate_own(emb, cfg, names, progress=False)
    for n in ("FCT", "RM+psi"):
        for slot, module in t1[n].modules().items():
            for k, v in module.state_dict().items():
                assert np.array_equal(v.numpy(), t2[n].modules()[slot].state_dict()[k].numpy()), (n, slot, k)
    assert s1.equals(s2)


@pytest.mark.slow
def test_a_method_registered_elsewhere_joins_only_when_named(own_run):
    cfg, emb, (curves, summary, trained, skipped) = own_run
    MM.register(MM.Method("RM copy", dict(color="k", ls="-"), "a notebook's method", ("main",), two_pass=True))
    try:
        _, s_default, _, _ = OM.evaluate_own(emb, cfg, progress=False)  # the trainings come from the cache
        _, s_named, _, _ = OM.evaluate_own(emb, cfg, ["RM", "RM copy"], progress=False)
    finally:
        MM.unregister("RM copy")
    assert "RM copy" not in set(s_default["method"]) and s_default.equals(summary)
    assert list(s_named["method"]) == ["RM", "RM copy"]
    assert s_named.drop(columns="method").iloc[0].equals(s_named.drop(columns="method").iloc[1])


def test_a_run_on_own_files_gets_its_own_folder_and_dataset_name(tmp_path, monkeypatch, capsys):
    """Own files write to <run folder>/own_models/<name>/, named after their paths (or the
    user's name), never over the series' outputs; the set-up line names them, not the profile's dataset."""
    from backfill_utils import config as C
    from backfill_utils import session

    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    a = {n: str(tmp_path / "clip_vs_dino" / f"{n}.npy") for n in OM.FILES}
    b = {n: str(tmp_path / "other" / f"{n}.npy") for n in OM.FILES}
    name_a = OM.own_run_name(a)
    assert name_a.startswith("clip_vs_dino_") and name_a == OM.own_run_name(dict(a))
    assert OM.own_run_name(b) != name_a and OM.own_run_name(a, "mine") == "mine"
    assert OM.own_run_name(dict.fromkeys(OM.FILES)) is None
    with pytest.raises(ValueError, match=r"no path given for \['test_labels'\]"):
        OM.own_run_name({**a, "test_labels": None})
    for bad in ("../x", "modules", ""):
        with pytest.raises(ValueError, match="plain folder name"):
            OM.own_run_name(a, bad)
    series = session.setup("smoke", kind="compute", style=False)
    own = session.setup("smoke", kind="compute", style=False, own=name_a)
    out = capsys.readouterr().out.splitlines()
    assert series.out == tmp_path / "results" / "smoke" and series.own is None
    assert own.out == tmp_path / "results" / "smoke" / "own_models" / name_a and own.own == name_a
    assert "dataset=synthetic" in out[0]
    assert f"dataset=own:{name_a} " in out[1] and "dataset=synthetic" not in out[1]
    assert not session.setup("default", kind="compute", style=False, own="mine").strict
    assert session.setup("default", kind="compute", style=False).out == tmp_path / "results"
