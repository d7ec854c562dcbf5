"""The papermill batch runner: parameter checking and the notebook list."""
import pytest

from backfill_utils import config as C
from backfill_utils import run as R


def test_series_is_numbered_and_each_notebook_has_the_parameters():
    books = R.list_notebooks()
    assert books, "no notebooks found"
    names = [b.name for b in books]
    assert names == sorted(names)
    for b in books:
        params = R.notebook_parameters(b)
        assert set(params) == {"profile", "dataset", "data_root", "seed"}, b.name


def test_unknown_parameter_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter.*datset"):
        R.run_series("smoke", {"datset": "cifar100"}, out_dir=tmp_path)
    assert not list(tmp_path.iterdir()), "nothing may be executed or written"


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


def test_update_readme_fills_only_the_marked_block(tmp_path):
    res = tmp_path / "results"
    (res / "tables").mkdir(parents=True)
    (res / "tables" / "table1.md").write_text("| a |\n|---|\n| 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{R.README_START}\nold\n{R.README_END}\noutro\n")
    R.update_readme(res, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "| 1 |" in text and "old\n" not in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="RESULTS"):
        R.update_readme(res, readme)
