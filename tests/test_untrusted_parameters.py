"""Parameters that someone else controls: profiles, overrides, run names, runner arguments.
None of them runs code, none costs unbounded memory or time, each bad one is an error naming it."""
import os
import time
from pathlib import Path

import pytest

from backfill_utils import config as C
from backfill_utils import session
from backfill_utils.tools import run as R


@pytest.mark.parametrize("keys, match", [
    ({"seed": "/../../../../x/seedpwn"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": True}, "seed must be an integer"),
    ({"dataset": "../../x"}, "dataset must be a dataset name"),
    ({"overrides": "{train: {epochs: 0}}"}, r"train.epochs must be an integer >= 1, got 0"),
    ({"overrides": "{train: {batch_size: '64'}}"}, "train.batch_size must be an integer"),
    ({"overrides": "{compat: {epochs: -1}}"}, "compat.epochs must be an integer >= 1"),
    ({"overrides": "{old_fraction: 1.5}"}, "old_fraction must be a number with 0 < old_fraction < 1"),
    ({"overrides": "{val_fraction: .nan}"}, "val_fraction must be a number"),
])
def test_bad_values_are_refused_when_the_profile_loads(keys, match):
    with pytest.raises(ValueError, match=match):
        C.load_profile("smoke", **keys)
    with pytest.raises(ValueError, match=match):  # a notebook's set-up: the same rule
        session.setup("smoke", kind="compute", style=False, **keys)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["../../../x/evilprof", "smoke/../smoke", "x/evil.yaml", ".."])
def test_a_profile_is_a_name_or_an_absolute_path(profile):
    with pytest.raises(ValueError, match="neither a profile name"):
        C.load_profile(profile)
    with pytest.raises(ValueError, match="neither a profile name"):  # papermill -p profile ... on a notebook
        session.setup(profile, kind="compute", style=False)


def test_a_profile_file_given_by_absolute_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((C.PARAMS_DIR / "smoke.yaml").read_text())
    assert C.load_profile(str(path))["profile"] == "mine"


def test_run_folders_stay_inside_the_results_root(monkeypatch, tmp_path):
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    for name in ("../x", "a/../../b", "/abs"):
        with pytest.raises(ValueError, match="not a plain folder name"):
            C.output_dir({"run_name": name})
    assert C.output_dir({"run_name": "smoke_seed3"}) == tmp_path / "results" / "smoke_seed3"


def test_runner_refuses_traversal_and_malformed_values_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(C.RESULTS_ENV, raising=False)
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(R, "_execute", lambda *a, **k: pytest.fail("a notebook ran"))
    for argv, msg in ((["-p", "seed", "/../../../../x/seedpwn"], "seed must be an integer"),
                      (["-p", "overrides", "{train: [}"], "-p overrides is not valid YAML"),
                      (["-p", "overrides", "{train: {epochs: 0}}"], "train.epochs must be an integer >= 1")):
        with pytest.raises(SystemExit):
            R.main(["--profile", "smoke", "--only", "00"] + argv)
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3, err
    assert not (tmp_path / "results").exists()
    assert not (tmp_path.parent / "x").exists()


def test_yaml_alias_bomb_is_refused_quickly():
    bomb = ("{dataset_options: {a0: &a0 [x, x, x, x, x, x, x, x, x, x], a1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0,"
            " *a0, *a0], a2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1], a3: &a3 [*a2, *a2, *a2, *a2, *a2,"
            " *a2, *a2, *a2, *a2], a4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3], a5: &a5 [*a4, *a4, *a4,"
            " *a4, *a4, *a4, *a4, *a4, *a4], a6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5], a7: &a7 [*a6,"
            " *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6], a8: [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]}}")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="aliases"):
        C.load_profile("smoke", overrides=bomb)
    with pytest.raises(ValueError, match="aliases"):
        R._coerce(bomb, "overrides")
    # the same expansion built without YAML (a mapping passed directly) is refused by its size
    a = ["x"] * 10
    for _ in range(8):
        a = [a] * 9
    with pytest.raises(ValueError, match="more than"):
        C.load_profile("smoke", overrides={"dataset_options": {"a": a}})
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.slow
def test_sigterm_during_a_notebook_leaves_no_temporary_file(monkeypatch, tmp_path):
    import signal

    import papermill

    def fake(book, out, **kwargs):
        Path(out).write_text("{}")  # papermill writes the executed copy as it goes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["00"])[0]
    with pytest.raises(KeyboardInterrupt), R._terminate_as_interrupt():
        R._execute(book, tmp_path / "executed" / book.name, {}, None)
    left = [p.name for p in (tmp_path / "executed").iterdir()] if (tmp_path / "executed").exists() else []
    assert not [n for n in left if ".tmp" in n], left
    assert signal.getsignal(signal.SIGTERM) is not None


def test_sigterm_while_a_kernel_runs_stops_it_and_removes_its_connection_file(monkeypatch, tmp_path):
    """A real kernel, started the way nbclient starts it, when SIGTERM arrives and nbclient's own
    clean-up does not run (the runner's event loop is left where the signal found it)."""
    import asyncio
    import signal

    import papermill
    from jupyter_client import AsyncKernelManager

    started = []

    def fake(book, out, **kwargs):
        km = kwargs.get("kernel_manager_class", AsyncKernelManager)(kernel_name="python3")
        asyncio.run(km.start_kernel())
        started.append(km)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM was not handled")

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["00"])[0]
    try:
        with pytest.raises(KeyboardInterrupt), R._terminate_as_interrupt():
            R._execute(book, tmp_path / "executed" / book.name, {}, None)
        (km,) = started
        assert not Path(km.connection_file).exists(), f"{km.connection_file} was left behind"
        assert km.provisioner.process.poll() is not None, "the kernel is still running"
    finally:
        for km in started:  # whatever happened above, no kernel outlives the test
            if km.provisioner is not None and km.provisioner.process.poll() is None:
                km.provisioner.process.kill()
            Path(km.connection_file).unlink(missing_ok=True)


@pytest.mark.slow
def test_runner_prints_a_missing_input_without_traceback(monkeypatch, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    import papermill

    def fake(book, out, **kwargs):
        raise PapermillExecutionError(0, 1, "s", "MissingArtifactError", "missing input: x; run 10_train first",
                                      ["long", "traceback"] * 20)

    monkeypatch.setattr(papermill, "execute_notebook", fake)
    book = R.list_notebooks(["40"])[0] if R.list_notebooks(["40"]) else R.list_notebooks()[-1]
    with pytest.raises(SystemExit, match=r"^\S+: MissingArtifactError: missing input: x; run 10_train first"):
        R._execute(book, tmp_path / book.name, {}, None)
