"""The papermill batch runner: checks before anything runs, the run's own folder, the summary."""

import os

import nbformat
import pandas as pd
import pytest

from backfill_utils import config as C
from backfill_utils import session
from backfill_utils.tools import results_doc as RD, run as R


def test_series_is_numbered_and_each_notebook_has_the_parameters():
    books = R.list_notebooks()
    assert books, "no notebooks found"
    names = [b.name for b in books]
    assert names == sorted(names)
    for b in books:
        params = R.notebook_parameters(b)
        # every notebook takes the series' parameters; a tutorial may add its own (61: paths), default None
        assert set(R.PARAMETERS) <= set(params), b.name
        assert all(p["default"] in ("None", "False") for p in params.values()), b.name  # literals only
        assert all(params[p]["default"] == "None" for p in set(params) - set(R.PARAMETERS)), b.name


@pytest.mark.slow
def test_unknown_parameter_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter.*datset"):
        R.run_series("smoke", {"datset": "cifar100"}, out_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing may be executed or written"


@pytest.mark.slow
def test_misspelt_override_is_an_error_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_execute", lambda *a, **k: pytest.fail("a notebook ran"))
    with pytest.raises(KeyError, match=r"'epoch'; known keys: \[.*'epochs'"):
        R.run_series("smoke", {"overrides": "{train: {epoch: 1}}"}, out_dir=tmp_path)
    with pytest.raises(KeyError, match="'trian'"):
        R.run_series("smoke", {"overrides": {"trian": {"epochs": 1}}}, out_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing may be executed or written"


def test_cli_reports_rejected_parameters(capsys, monkeypatch):
    monkeypatch.setattr(R, "_execute", lambda *a, **k: pytest.fail("a notebook ran"))
    for argv, msg in ((["--profile", "smoke", "-p", "overrides", "{train: {epoch: 1}}"], "known keys"),
                      (["--profile", "smoke", "-p", "epochs", "1"], "unknown parameter")):
        with pytest.raises(SystemExit):
            R.main(argv)
        assert msg in capsys.readouterr().err


@pytest.mark.slow
def test_runs_go_to_their_own_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    seen = []
    monkeypatch.setattr(R, "_execute", lambda book, target, params, kernel: seen.append((target, params)))
    R.run_series("smoke", {"overrides": "{train: {epochs: 1}}"}, select=["00", "10"])
    cfg = C.load_profile("smoke", overrides="{train: {epochs: 1}}")
    executed = tmp_path / "results" / cfg["run_name"] / "executed"
    assert [t for t, _ in seen] == [executed / "00_data.ipynb", executed / "10_train.ipynb"]
    assert seen[0][1] == {"overrides": "{train: {epochs: 1}}", "profile": "smoke"}
    files = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert {p.parts[:3] for p in files} == {("results", cfg["run_name"], "executed")}


@pytest.mark.slow
def test_kernels_get_the_runners_results_folder_and_checkout(monkeypatch, tmp_path):
    """A kernel inherits the runner's environment while it runs: the run's results folder
    and a PYTHONPATH led by the runner's checkout, so that a kernel of another checkout's
    editable install writes where the runner reports; the environment is restored after."""
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    seen = []
    monkeypatch.setattr(R, "_execute", lambda book, target, params, kernel: seen.append(dict(os.environ)))
    R.run_series("smoke", {}, select=["00"])
    assert seen[0][C.RESULTS_ENV] == str(tmp_path / "results" / "smoke")
    assert seen[0]["PYTHONPATH"].split(os.pathsep) == [str(C.REPO_ROOT), "/elsewhere"]
    assert seen[0][C.PROFILE_ENV] == "smoke"
    assert C.RESULTS_ENV not in os.environ and os.environ["PYTHONPATH"] == "/elsewhere"
    # a kernel's set-up resolves the same folder as the runner from that variable
    monkeypatch.setenv(C.RESULTS_ENV, seen[0][C.RESULTS_ENV])
    assert C.output_dir(C.load_profile("smoke")) == tmp_path / "results" / "smoke"
    env = R.kernel_env("smoke", tmp_path, pin=True, env={"MKL_CBWR": "AUTO"})
    assert env["MKL_CBWR"] == "AUTO" and env["ATEN_CPU_CAPABILITY"] == "avx2"


def test_select_and_unknown_prefix():
    first = R.list_notebooks()[0]
    assert R.list_notebooks([first.name[:2]])[0] == first
    with pytest.raises(ValueError, match="no notebook matches"):
        R.list_notebooks(["99"])


def test_cli_rejects_unknown_profile(capsys):
    with pytest.raises(SystemExit):
        R.main(["--profile", "nope"])
    assert "unknown profile" in capsys.readouterr().err


def test_notebooks_are_stored_without_outputs():
    import nbformat

    for b in R.list_notebooks():
        nb = nbformat.read(b, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, b.name


def test_output_dir_per_run():
    assert C.output_dir(C.load_profile("default")) == C.RESULTS_DIR
    assert C.output_dir(C.load_profile("smoke")) == C.RESULTS_DIR / "smoke"
    assert C.output_dir(C.load_profile("default", dataset="cifar100")) == C.RESULTS_DIR / "default_cifar100"


def test_progress_bars_are_collapsed_in_stored_outputs():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    pieces = ["start\n"] + [f"\rtrain: {i:3d}%|{'#' * (i // 10):10s}| {i}/100" for i in range(0, 101, 5)] + ["\n"]
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=t) for t in pieces]
    cell.outputs += [nbformat.v4.new_output("stream", name="stdout", text="x\n"),
                     nbformat.v4.new_output("stream", name="stderr", text="end\n")]
    nb.cells.append(cell)
    R.clean_outputs(nb)
    assert [o["name"] for o in cell.outputs] == ["stderr", "stdout", "stderr"]
    assert cell.outputs[0]["text"] == "start\ntrain: 100%|##########| 100/100\n"


def _executed_notebook(folder, name, text):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    nb.cells.append(cell)
    nbformat.write(nb, str(folder / name))


def _claims_csv(results):
    (results / "tables").mkdir(exist_ok=True)
    pd.DataFrame({"id": ["ours_gt_bct_map", "x", "ours_gt_rm_map"],
                  "claim": ["Ours > BCT on auc_map", "(reported) x", "Ours > RM on auc_map"],
                  "checked": [True, False, True], "value": [1.0, 0.0, 3.0], "reference": [2.0, 1.0, 2.0],
                  "holds": [False, False, True], "setting": ["open", "open", "open"]}
                 ).to_csv(results / "tables" / "claims.csv", index=False)


def test_summary_lists_the_claims_that_do_not_hold(tmp_path):
    _claims_csv(tmp_path)
    executed = tmp_path / "executed"
    executed.mkdir()
    _executed_notebook(executed, "31_backfill.ipynb",
                       f"{session.CLAIM_MARK} open setting: Ours > BCT on auc_map\n"
                       f"{session.CHECKED_MARK} 2 (1 do not hold)\n")
    _executed_notebook(executed, "46_distance_distributions.ipynb",
                       f"hello\n{session.CHECKED_MARK} 1 (CMCL raises the AUC: does not hold)\n"
                       f"{session.CLAIM_MARK} CMCL raises the AUC (0.8 vs 0.9)\n")
    _executed_notebook(executed, "49_backfill_order.ipynb", f"{session.CHECKED_MARK} 1 (x: holds)\n")
    text = R.summary(tmp_path, executed)
    assert R.checked_claims(executed) == 4
    assert "2 of 4 checked claim(s) of the paper do not hold on this run" in text
    assert "claims.csv: open setting: Ours > BCT on auc_map [ours_gt_bct_map] (value 1.00, reference 2.00)" in text
    assert "46_distance_distributions: CMCL raises the AUC (0.8 vs 0.9)" in text
    assert "(reported) x" not in text and "Ours > RM" not in text
    (tmp_path / "tables" / "claims.csv").unlink()
    (executed / "46_distance_distributions.ipynb").unlink()
    assert "all 3 checked claim(s) of the paper hold on this run" in R.summary(tmp_path, executed)


def test_summary_of_a_run_that_checked_no_claim(tmp_path):
    """A run of notebooks that check no claim (e.g. --only 00) says so, even next to a
    claims.csv and executed notebooks left by an earlier run."""
    _claims_csv(tmp_path)
    executed = tmp_path / "executed"
    executed.mkdir()
    _executed_notebook(executed, "00_data.ipynb", "saved tables/dataset.csv\n")
    _executed_notebook(executed, "31_backfill.ipynb", f"{session.CHECKED_MARK} 2 (1 do not hold)\n")
    text = R.summary(tmp_path, executed, ["00_data.ipynb"])
    assert R.checked_claims(executed, ["00_data.ipynb"]) == 0
    assert "no claim of the paper was checked on this run" in text
    assert "hold" not in text.replace("(none of its notebooks checks one)", "")
    assert "2 checked claim(s)" in R.summary(tmp_path, executed, ["00_data.ipynb", "31_backfill.ipynb"])


def test_claim_checks_print_how_many_they_checked(capsys):
    run = session.Run(cfg={}, out=C.RESULTS_DIR, strict=False, kind="render")
    run.expect(True, "a wins")
    run.expect(False, "b wins")
    claims = pd.DataFrame({"claim": ["c", "d", "e"], "checked": [True, True, False], "holds": [True, False, False],
                           "value": [1.0, 1.0, 1.0], "reference": [0.0, 2.0, 2.0], "setting": ["open"] * 3})
    run.check_claims(claims)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith(session.CHECKED_MARK)]
    assert lines == [f"{session.CHECKED_MARK} 1 (a wins: holds)", f"{session.CHECKED_MARK} 1 (b wins: does not hold)",
                     f"{session.CHECKED_MARK} 2 (1 do not hold)"]


def test_update_readme_fills_only_the_marked_blocks(tmp_path):
    res = tmp_path / "results"
    (res / "tables").mkdir(parents=True)
    (res / "tables" / "table1.md").write_text("| a |\n|---|\n| 1 |\n")
    pd.DataFrame([{"setting": s, "method": m, "seeds": 3, "AUC_mAP": a, "AUC_mAP_sd": 0.05,
                   "gain_mAP_%": g, "gain_mAP_%_sd": float("nan")}
                  for s in ("extended", "open") for m, a, g in (("old", 10.0, 0.0), ("Ours", 33.814, 77.63))]).to_csv(
        res / "tables" / "table1.csv", index=False)
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    readme, doc = root / "README.md", root / "docs" / "results.md"
    readme.write_text("intro\n<!-- RESULTS:START -->\nold\n<!-- RESULTS:END -->\noutro\n")
    doc.write_text("# all\n<!-- RESULTS_FULL:START -->\n<!-- RESULTS_FULL:END -->\n")
    RD.update_readme(res, root)
    text = readme.read_text()
    assert text.startswith("intro\n<!-- RESULTS:START -->\nTable 1, extended setting")
    assert text.endswith("\n<!-- RESULTS:END -->\noutro\n") and "old\n" not in text
    assert "| Ours | 33.81 +- 0.05 | 77.6 |" in text and text.count("| Ours |") == 1  # one setting
    assert "notebook series" not in text  # no runtimes.csv: no runtime line
    (res / "executed").mkdir()
    pd.DataFrame({"notebook": ["00_data.ipynb", "TOTAL"], "seconds": [10.4, 1033.0]}).to_csv(
        res / "executed" / "runtimes.csv", index=False)
    RD.update_readme(res, root)
    assert "The notebook series of this run took 1033 s (17.2 minutes;" in readme.read_text()
    assert doc.read_text() == ("# all\n<!-- RESULTS_FULL:START -->\n**" + RD.RESULTS_TABLES[0][0]
                               + "** (`results/tables/table1.md`)\n\n| a |\n|---|\n| 1 |\n<!-- RESULTS_FULL:END -->\n")
    doc.write_text("no markers")
    with pytest.raises(ValueError, match=r"results\.md needs exactly one <!-- RESULTS_FULL:START -->"):
        RD.update_readme(res, root)


def test_makefile_pins_what_the_runner_pins():
    import shlex

    text = (C.REPO_ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("PINNED_ENV :="))
    pairs = dict(tok.split("=", 1) for tok in shlex.split(line.split(":=", 1)[1]))
    assert pairs == C.PINNED_ENV == R.PINNED_ENV


def test_render_notebooks_run_side_by_side_compute_notebooks_alone():
    books = R.list_notebooks()
    groups = R.render_groups(books, 2)
    assert [b for g in groups for b in g] == books
    for g in groups:
        assert len(g) == 1 or all(R.is_render(b) for b in g)
    assert not R.is_render(C.NOTEBOOKS_DIR / "30_compat.ipynb") and R.is_render(C.NOTEBOOKS_DIR / "53_regimes.ipynb")
    assert all(len(g) == 1 for g in R.render_groups(books, 1))
