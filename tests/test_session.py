"""Notebook set-up: parameters and overrides, the run's own folder, the claim policy."""
import matplotlib
import pandas as pd
import pytest

from backfill_utils import cache
from backfill_utils import config as C
from backfill_utils import session
from backfill_utils.studies import claims as CL


def test_parse_overrides_accepts_mappings_and_yaml_strings():
    assert C.parse_overrides("{train: {epochs: 5}}") == {"train": {"epochs": 5}}
    assert C.parse_overrides('{"train": {"epochs": 5}}') == {"train": {"epochs": 5}}
    assert C.parse_overrides({"seed": 1}) == {"seed": 1}
    assert C.parse_overrides(None) == {} == C.parse_overrides("  ")
    with pytest.raises(ValueError, match="mapping of profile keys"):
        C.parse_overrides("[1, 2]")
    with pytest.raises(ValueError, match="not valid YAML"):
        C.parse_overrides("{train: {epochs: 5}")


def test_overrides_use_the_strict_profile_check():
    cfg = C.load_profile("smoke", overrides="{train: {epochs: 1}, compat: {epochs: 2}}")
    assert cfg["train"]["epochs"] == 1 and cfg["compat"]["epochs"] == 2 and cfg["train"]["lr"] == 0.1
    with pytest.raises(KeyError, match=r"unknown configuration key 'epoch'; known keys: \[.*'epochs'"):
        C.load_profile("smoke", overrides={"train": {"epoch": 1}})
    with pytest.raises(KeyError, match="'trian'.*known keys"):
        C.load_profile("smoke", overrides="{trian: {epochs: 1}}")
    # explicit parameters are applied after the overrides
    assert C.load_profile("smoke", overrides={"seed": 4}, seed=5)["seed"] == 5


def test_run_folders_never_collide():
    base = C.load_profile("default")
    assert base["reference_run"] and C.output_dir(base) == C.RESULTS_DIR
    same = C.load_profile("default", overrides={"train": {"epochs": base["train"]["epochs"]}}, seed=0,
                          data_root="/elsewhere")
    assert C.output_dir(same) == C.RESULTS_DIR, "no effective change, the same run (data_root is a location)"
    folders = {
        "smoke": C.load_profile("smoke"),
        "default_cifar100": C.load_profile("default", dataset="cifar100"),
        "default_seed3": C.load_profile("default", seed=3),
        "e1": C.load_profile("default", overrides={"train": {"epochs": 1}}),
        "e2": C.load_profile("default", overrides={"train": {"epochs": 2}}),
        "smoke_e1": C.load_profile("smoke", overrides="{train: {epochs: 1}}"),
    }
    dirs = {k: C.output_dir(v) for k, v in folders.items()}
    assert len(set(dirs.values())) == len(dirs), dirs
    assert dirs["smoke"] == C.RESULTS_DIR / "smoke"
    assert dirs["default_cifar100"] == C.RESULTS_DIR / "default_cifar100"
    assert dirs["default_seed3"] == C.RESULTS_DIR / "default_seed3"
    for k in ("e1", "e2", "smoke_e1"):
        assert dirs[k].parent == C.RESULTS_DIR and dirs[k].name.startswith(("default_", "smoke_")), dirs[k]
        assert not folders[k]["reference_run"]


def test_results_env_overrides_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(C.RESULTS_ENV, str(tmp_path))
    assert C.output_dir(C.load_profile("smoke", seed=9)) == tmp_path.resolve()


def test_a_non_default_run_writes_only_under_its_own_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    run = session.setup("smoke", overrides="{train: {epochs: 1}}", kind="render")
    assert run.out.parent == tmp_path / "results" and not run.strict and run.kind == "render"
    assert cache.get_mode() == "render"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("profile=smoke dataset=synthetic seed=0 overrides={'train': {'epochs': 1}} -> ")
    assert "claims reported, not asserted" in line
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    run.figure(fig, "f")
    plt.close(fig)
    run.table(pd.DataFrame({"a": [1.0]}), "t")
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert files and all(p.parts[:2] == ("results", run.out.name) for p in files), files
    assert {p.name for p in files} == {"f.png", "f.pdf", "t.csv", "t.md", "t.tex"}


def test_setup_rejects_bad_input():
    with pytest.raises(ValueError, match="kind must be one of"):
        session.setup("smoke", kind="draw")
    with pytest.raises(KeyError, match="known keys"):
        session.setup("smoke", overrides={"compat": {"epoch": 1}})
    with pytest.raises(FileNotFoundError, match="available profiles"):
        session.setup("nope")


def test_claims_are_asserted_on_the_reference_run_only(capsys):
    claims = pd.DataFrame({"id": ["ours_gt_rm_map", "ours_gt_bct_map", "rm_rises"],
                           "claim": ["a > b", "c > d", "(reported) e"], "checked": [True, True, False],
                           "value": [1.0, 3.0, 0.0], "reference": [2.0, 1.0, 1.0],
                           "holds": [False, True, False], "setting": ["open", "extended", "extended"]})
    relaxed = session.Run(cfg={}, out=C.RESULTS_DIR / "x", strict=False, kind="compute")
    failed = relaxed.check_claims(claims)
    assert list(failed["claim"]) == ["a > b"]
    out = capsys.readouterr().out
    assert f"{session.CLAIM_MARK} open setting: a > b [ours_gt_rm_map] (value 1.00, reference 2.00)" in out
    assert relaxed.expect(False, "x wins", "1 vs 2") is False
    assert f"{session.CLAIM_MARK} x wins (1 vs 2)" in capsys.readouterr().out
    strict = session.Run(cfg={}, out=C.RESULTS_DIR, strict=True, kind="compute")
    strict.check_claims(claims, asserted={"ours_gt_bct_map"})  # by id: the failing one is not asserted
    strict.check_claims(claims, asserted={"ours_gt_rm_map"} | CL.ASSERTED)  # it is, but not in its (open) setting
    strict.check_claims(claims.assign(asserted=[False, True, True]))  # the table's asserted column
    with pytest.raises(AssertionError, match=r"open setting: a > b \[ours_gt_rm_map\]"):
        strict.check_claims(claims)  # no asserted column: every row
    with pytest.raises(AssertionError, match="ours_gt_rm_map"):
        strict.check_claims(claims.assign(setting="extended"), asserted={"ours_gt_rm_map"})
    with pytest.raises(ValueError, match=r"unknown claim id\(s\) \['ours_gt_rm'\]"):
        strict.check_claims(claims, asserted={"ours_gt_rm"})
    with pytest.raises(AssertionError, match="x wins"):
        strict.expect(False, "x wins")
    assert strict.expect(True, "y")


def test_no_backend_is_forced_at_import():
    import importlib

    from backfill_utils.figures import curve_figures as CF, style as ST

    before = matplotlib.get_backend()
    for module in (ST, CF):
        importlib.reload(module)
    assert matplotlib.get_backend() == before
    for path in (C.REPO_ROOT / "backfill_utils" / "figures").glob("*.py"):
        assert "matplotlib.use(" not in path.read_text(), path


def test_download_reaches_every_dataset_loader(monkeypatch):
    from backfill_utils.data import api as D
    from backfill_utils import embed as E
    from backfill_utils import train as TR

    seen = []
    real = D.get_dataset

    def spy(*args, **kwargs):
        seen.append(kwargs.get("download"))
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "get_dataset", spy)
    cfg = C.load_profile("smoke", download=True,
                         overrides={"dataset_options": {"num_classes": 4, "train_per_class": 4, "test_per_class": 2}})
    assert cfg["download"] is True
    assert C.load_profile("smoke", download=True)["run_name"] == "smoke"  # where data comes from: no new run
    E._split_dataset(cfg, "test", [0, 1], augment=False)
    TR.build_train_dataset(TR.model_spec(cfg, "extended", "old"), None, cfg["download"])
    assert seen == [True, True]
    assert C.load_profile("smoke")["download"] is False


def test_render_notebook_on_a_fresh_clone_first_says_what_to_run(tmp_cache, tmp_path, monkeypatch, capsys):
    """A render notebook opened before anything was computed: its first output is the one
    command that computes its inputs, with its own parameters; the runner accepts it."""
    import shlex

    from backfill_utils.tools import run as R

    monkeypatch.setenv(C.RESULTS_ENV, str(tmp_path / "results"))
    monkeypatch.delenv(C.PROFILE_ENV, raising=False)
    session.setup("smoke", seed=3, kind="render", style=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("INPUTS NOT COMPUTED YET") and "no models, embeddings, compat" in lines[0]
    command = "python -m backfill_utils.tools.run --profile smoke -p seed 3 --only 10 20 30 31 32"
    assert lines[1].strip() == command and lines[2] == "then run this notebook again."
    assert lines[3].startswith("profile=smoke") and len(lines) == 4
    args = shlex.split(command)[3:]
    books, cfg = R.prepare("smoke", {"seed": 3}, args[args.index("--only") + 1:])
    assert [b.name[:2] for b in books] == ["10", "20", "30", "31", "32"] and cfg["seed"] == 3
    # the error of a missing artifact gives the command too
    with pytest.raises(cache.MissingArtifactError, match=r"`python -m backfill_utils\.tools\.run --profile smoke -p seed 3 "
                                                      r"--only 10 20 30 31 32`"):
        cache.cached_arrays("curves", {"k": 1}, lambda: pytest.fail("computed in render mode"))

    # computed kinds are left out of the command; the default profile needs no argument
    (tmp_cache / "models" / "0123abcd").mkdir(parents=True)
    (tmp_cache / "models" / "0123abcd" / "model.pt").write_bytes(b"")
    session.setup("default", kind="render", style=False)
    assert "    python -m backfill_utils.tools.run --only 20 30 31 32\n" in capsys.readouterr().out
    # no note for a notebook that reads no cache, nor for a compute notebook
    for kw in ({"kind": "render", "reads": ()}, {"kind": "compute"}):
        session.setup("smoke", style=False, **kw)
        out = capsys.readouterr().out
        assert out.startswith("profile=smoke") and "INPUTS NOT COMPUTED" not in out
    # nothing when every kind has entries
    for kind in set(cache.KINDS) - {"models"}:
        (tmp_cache / kind).mkdir(exist_ok=True)
        (tmp_cache / kind / "x.npz").write_bytes(b"")
    assert session.missing_inputs_note() is None
    with cache.mode("render", run_args=" --profile smoke"), pytest.raises(cache.MissingArtifactError) as err:
        cache.cached_arrays("curves", {"k": 1}, lambda: pytest.fail("computed in render mode"))
    assert "(`python -m backfill_utils.tools.run --profile smoke --only 31`)" in str(err.value)
