"""The papermill batch runner behind ``make reproduce``.

``python -m backfill_utils.tools.run --profile default`` executes every notebook of
``notebooks/`` in name order (the numbers give the stage) with the same
parameters (``-p name value``, values in YAML, e.g. ``-p overrides '{train:
{epochs: 1}}'``). Before any notebook runs, every parameter name is checked
against each notebook's ``parameters`` cell (papermill itself only warns on an
unknown name) and the profile is loaded with the parameters, so a misspelt
override key is an error naming the known keys.

Everything a run writes goes to its own folder (:func:`config.output_dir`):
``results/`` only for the default profile as it is, ``results/<run name>/``
otherwise. Executed notebooks go to ``<folder>/executed/`` (progress bars
collapsed to their last state, so the copies stay small), with a runtime table
(``runtimes.csv`` / ``.md``; its TOTAL is the wall-clock time of the series).
With ``$BACKFILL_WORKERS`` > 1, consecutive render notebooks (which only read)
run side by side, that many at a time, and compute notebooks train independent
models in that many worker processes (:mod:`backfill_utils.parallel`). At the end the runner prints a summary: the
folder, the runtimes, how many claims of the paper the notebooks checked (none for
e.g. ``--only 00``) and every one that does not hold on this run (from
``tables/claims.csv`` and the notebooks' claim lines).

``--pin`` pins the math libraries' CPU code path for the notebooks' kernels
(:data:`config.PINNED_ENV`): the same numbers on any x86-64 CPU with AVX2, at
about 35% more CPU time in training (docs/reproducibility.md); off by default.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time
from pathlib import Path

import pandas as pd

from .. import config as C
from .. import io
from .. import parallel
from ..session import CHECKED_MARK, CLAIM_MARK
from . import results_doc as RD

PINNED_ENV = C.PINNED_ENV
PARAMETERS = ("profile", "dataset", "data_root", "seed", "overrides", "download")


def list_notebooks(select: list[str] | None = None) -> list[Path]:
    """Notebooks of the series in order; ``select`` keeps those whose name starts with a prefix."""
    books = sorted(p for p in C.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if select:
        books = [b for b in books if any(b.name.startswith(s) for s in select)]
        if not books:
            raise ValueError(f"no notebook matches {select}; notebooks: {[b.name for b in list_notebooks()]}")
    return books


def notebook_parameters(path: Path) -> dict:
    """The parameters cell of a notebook (``papermill.inspect_notebook``)."""
    import papermill as pm

    return pm.inspect_notebook(str(path))


def check_parameters(path: Path, params: dict) -> None:
    """Raise if ``params`` has a name that the notebook's parameters cell does not define."""
    known = notebook_parameters(path)
    if not known:
        raise ValueError(f"{path.name} has no cell tagged 'parameters'; every notebook of the series needs one")
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for {path.name}; it accepts: {sorted(known)}"
        )


def resolve(profile: str, params: dict) -> dict:
    """The run's configuration from the profile and the notebook parameters
    (raises on an unknown profile or override key, before anything runs)."""
    from ..data.api import check_dataset_options

    keys = {k: params.get(k) for k in ("dataset", "data_root", "seed")}
    cfg = C.load_profile(profile, overrides=params.get("overrides"),
                         download=bool(params.get("download", False)), **keys)
    check_dataset_options(cfg["dataset"], cfg.get("dataset_options"))
    return cfg


def prepare(profile: str, params: dict, select: list[str] | None = None) -> tuple[list[Path], dict]:
    """The checks made before any notebook runs: the notebooks (``select``), every
    parameter name against each of them, the profile and its overrides.
    Returns the notebooks and the run's configuration."""
    params = dict(params, profile=profile)
    books = list_notebooks(select)
    for book in books:
        check_parameters(book, params)
    return books, resolve(profile, params)


def _coerce(value: str, name: str = "value"):
    """A ``-p`` value as YAML (no aliases, :func:`config.parse_yaml`); a malformed one is a
    one-line ``ValueError`` naming the parameter."""
    return C.parse_yaml(value, f"-p {name}")


_CR = re.compile(r"[^\n]*\r(?!\n)")


def collapse_progress(text: str) -> str:
    r"""Keep the last state of every carriage-return-updated line (tqdm bars).

    >>> collapse_progress("a\n 10%|#|\r 50%|##|\r100%|###|\nb\n")
    'a\n100%|###|\nb\n'
    """
    return _CR.sub("", text)


def clean_outputs(nb) -> None:
    """Shrink stored outputs in place: consecutive stream outputs of one name (stdout,
    stderr) merged, progress bars collapsed to their last state."""
    for cell in nb.get("cells", []):
        merged = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                prev = merged[-1] if merged else None
                if prev is not None and prev.get("output_type") == "stream" and prev["name"] == out["name"]:
                    prev["text"] += text
                    continue
                out["text"] = text
            merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = collapse_progress(out["text"])
        if "outputs" in cell:
            cell["outputs"] = merged


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Inside: SIGTERM raises ``KeyboardInterrupt`` like SIGINT, so the ``finally`` blocks that
    remove temporary files (and stop the notebook's kernel) run for both (main thread only;
    elsewhere a no-op)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _missing_input(exc: Exception) -> str | None:
    """The message of a notebook's missing or corrupt input, if that is why it failed."""
    if getattr(exc, "ename", None) in ("MissingArtifactError", "CorruptArtifactError"):
        return f"{exc.ename}: {exc.evalue}"
    return None


def _tracked_kernel_manager(started: list):
    """nbclient's kernel manager class, each instance appended to ``started``."""
    from jupyter_client import AsyncKernelManager

    class TrackedKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            started.append(self)

    return TrackedKernelManager


def _stop_kernels(started: list) -> None:
    """Stop the kernels in ``started`` that are still running and remove their connection
    files: when SIGINT or SIGTERM interrupts a notebook, nbclient's own clean-up never runs
    (the kernel would outlive the cell and its ``/tmp/tmp*.json`` connection file stay behind).
    After a normal end or a failing cell nbclient has done both, and this does nothing."""
    for km in started:
        process = getattr(getattr(km, "provisioner", None), "process", None)
        if process is not None and process.poll() is None:
            process.kill()
            with contextlib.suppress(Exception):
                process.wait(10)
        with contextlib.suppress(Exception):
            km.cleanup_connection_file()


def _execute(book: Path, target: Path, params: dict, kernel: str | None) -> None:
    import nbformat
    import papermill as pm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(io.temporary_name(f"{book.stem}.ipynb"))
    kernels: list = []
    try:
        nb = pm.execute_notebook(str(book), str(tmp), parameters=params, cwd=str(C.NOTEBOOKS_DIR),
                                 kernel_name=kernel, progress_bar=False, log_output=False,
                                 kernel_manager_class=_tracked_kernel_manager(kernels))
    except Exception as exc:
        if tmp.exists():
            failed = nbformat.read(tmp, as_version=4)
            clean_outputs(failed)
            io.atomic_write(target, lambda p: nbformat.write(failed, str(p)))
        missing = _missing_input(exc)
        if missing is not None:  # the message is all the reader needs: no traceback
            raise SystemExit(f"{book.name}: {missing}\n(executed copy: {target})") from None
        print(f"FAILED: {book.name}; executed copy with the error: {target}", file=sys.stderr)
        raise
    finally:
        _stop_kernels(kernels)
        tmp.unlink(missing_ok=True)
    clean_outputs(nb)
    io.atomic_write(target, lambda p: nbformat.write(nb, str(p)))


def is_render(book: Path) -> bool:
    """Whether a notebook of the series is a render notebook (``session.setup(..., kind="render")``):
    it only reads, so render notebooks may run side by side."""
    import json

    cells = json.loads(book.read_text()).get("cells", [])
    return any('kind="render"' in "".join(c.get("source", [])) for c in cells if c.get("cell_type") == "code")


def render_groups(books: list[Path], n_workers: int) -> list[list[Path]]:
    """The series in order, as groups: each compute notebook alone; consecutive render
    notebooks together when ``n_workers > 1`` (they run side by side, ``n_workers`` at a time).

    >>> names = [Path(n) for n in ("a", "b", "c")]
    >>> render_groups(names, 1) == [[names[0]], [names[1]], [names[2]]]
    True
    """
    groups: list[list[Path]] = []
    for book in books:
        if n_workers > 1 and groups and is_render(book) and all(is_render(b) for b in groups[-1]):
            groups[-1].append(book)
        else:
            groups.append([book])
    return groups


def _execute_group(group: list[Path], books: list[Path], out_dir: Path, params: dict,
                   kernel: str | None) -> list[dict]:
    """Execute the notebooks of one group (side by side when there are several); the
    first failure is raised after the others finished."""
    from concurrent.futures import ThreadPoolExecutor

    def one(book: Path) -> dict:
        print(f"[{books.index(book) + 1}/{len(books)}] {book.name} ...", flush=True)
        t0 = time.perf_counter()
        _execute(book, out_dir / book.name, params, kernel)
        dt = time.perf_counter() - t0
        print(f"    {book.name} done in {dt:.1f} s", flush=True)
        return {"notebook": book.name, "seconds": round(dt, 1)}

    if len(group) == 1:
        return [one(group[0])]
    with ThreadPoolExecutor(max_workers=parallel.workers()) as pool:
        futures = [pool.submit(one, b) for b in group]
        return [f.result() for f in futures]


def kernel_env(profile: str, results: Path, pin: bool = False, env: dict | None = None) -> dict:
    """The variables the runner sets for its kernels (they inherit its environment): the
    profile, the run's results folder (``$BACKFILL_RESULTS``, so that a kernel writes
    where the runner reports), ``PYTHONPATH`` led by this package's checkout (a kernel
    imports the code, profiles and cache of the runner's checkout, also where another
    checkout is installed in editable mode) and, with ``pin``, :data:`PINNED_ENV` (values
    already in ``env``, default ``os.environ``, are kept)."""
    env = os.environ if env is None else env
    root = str(C.REPO_ROOT)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    out = {C.PROFILE_ENV: profile, C.RESULTS_ENV: str(Path(results).resolve()),
           "PYTHONPATH": os.pathsep.join([root, *rest])}
    if pin:
        out.update({k: env.get(k, v) for k, v in PINNED_ENV.items()})
    return out


def run_series(profile: str = "default", params: dict | None = None, select: list[str] | None = None,
               out_dir: Path | None = None, kernel: str | None = None, pin: bool = False) -> pd.DataFrame:
    """Execute the series (or ``select``) with ``params``; returns the runtime table.

    Checks first, before any notebook runs: parameter names against every
    notebook, the profile and its overrides. ``out_dir`` defaults to the run's
    ``executed/`` folder. The kernels get :func:`kernel_env` (``pin``: with
    :data:`PINNED_ENV`, values already in the environment kept).
    """
    params = dict(params or {}, profile=profile)
    books, cfg = prepare(profile, params, select)
    results = C.output_dir(cfg)
    out_dir = Path(out_dir) if out_dir else results / "executed"
    rows = []
    env_before = dict(os.environ)
    os.environ.update(kernel_env(profile, results, pin))
    n_workers = parallel.workers()
    print(f"run {cfg['run_name']}: {len(books)} notebooks; results -> {results}/ (executed notebooks: {out_dir}/)"
          + (f" (render notebooks {n_workers} at a time)" if n_workers > 1 else ""), flush=True)
    start = time.perf_counter()
    try:
        for group in render_groups(books, n_workers):
            rows += _execute_group(group, books, out_dir, params, kernel)
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    table = pd.DataFrame(rows, columns=["notebook", "seconds"])
    total = time.perf_counter() - start if rows else 0.0
    # wall-clock time of the series (render notebooks that ran side by side overlap)
    table = pd.concat([table, pd.DataFrame([{"notebook": "TOTAL", "seconds": round(total, 1)}])])
    io.atomic_write(out_dir / "runtimes.csv", lambda p: table.to_csv(p, index=False))
    io.atomic_write_text(out_dir / "runtimes.md", table.to_markdown(index=False) + "\n")
    print(table.to_string(index=False))
    print(summary(C.output_dir(cfg), out_dir, [b.name for b in books]))
    return table


def _executed(executed: Path, names: list[str] | None) -> list[Path]:
    """The executed notebooks of ``executed`` that this run ran (``names``; default all)."""
    return [p for p in sorted(executed.glob("[0-9][0-9]_*.ipynb")) if names is None or p.name in names]


def _stream_lines(path: Path) -> list[str]:
    """The lines a notebook printed (its stream outputs)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return [line for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "stream"
            for line in out.get("text", "").splitlines()]


def _wrote_claims_csv(path: Path) -> bool:
    return path.name.startswith("31_")  # 31_backfill writes tables/claims.csv and prints its rows


def failed_claims(results: Path, executed: Path, names: list[str] | None = None) -> list[str]:
    """Claims of the paper that do not hold on a run: the checked rows of
    ``tables/claims.csv`` that fail, each named by its text and its id (when the run ran the
    notebook that writes it; a claims.csv without ids is an error asking to rerun it), then
    the claim lines (:data:`CLAIM_MARK`) printed by the executed notebooks (``names``:
    which ones; default all)."""
    lines = []
    books = _executed(executed, names)
    claims_csv = results / "tables" / "claims.csv"
    if claims_csv.is_file() and any(_wrote_claims_csv(p) for p in books):
        t = pd.read_csv(claims_csv)
        if "id" not in t.columns:
            raise ValueError(f"{claims_csv} has no claim ids (column 'id'): it predates them; rerun 31_backfill")
        bad = t[t["checked"].astype(bool) & ~t["holds"].astype(bool)]
        lines += [f"claims.csv: {r.setting} setting: {r.claim} [{r.id}] (value {r.value:.2f}, "
                  f"reference {r.reference:.2f})" for r in bad.itertuples()]
    for path in books:
        if _wrote_claims_csv(path):
            continue  # its claim lines are the claims.csv rows, listed above
        lines += [f"{path.stem}: {line[len(CLAIM_MARK):].strip()}" for line in _stream_lines(path)
                  if line.startswith(CLAIM_MARK)]
    return lines


_CHECKED = re.compile(re.escape(CHECKED_MARK) + r" (\d+)")


def checked_claims(executed: Path, names: list[str] | None = None) -> int:
    """How many claims of the paper the executed notebooks (``names``; default all)
    checked: the sum of their :data:`CHECKED_MARK` lines."""
    return sum(int(m.group(1)) for path in _executed(executed, names) for line in _stream_lines(path)
               if (m := _CHECKED.match(line)))


def summary(results: Path, executed: Path, names: list[str] | None = None) -> str:
    """The closing lines of a run: where its results are, how many claims of the paper
    its notebooks checked, and those that do not hold."""
    claims = failed_claims(results, executed, names)
    n = checked_claims(executed, names)
    head = f"results of this run: {results}/ (executed notebooks: {executed}/)"
    if not claims:
        if n == 0:
            return head + "\nno claim of the paper was checked on this run (none of its notebooks checks one)"
        return head + f"\nall {n} checked claim(s) of the paper hold on this run"
    return "\n".join([head, f"{len(claims)} of {max(n, len(claims))} checked claim(s) of the paper do not hold "
                             "on this run:"] + [f"  - {c}" for c in claims])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the notebook series headlessly with papermill.")
    parser.add_argument("--profile", default="default", help=f"one of {C.available_profiles()}")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (YAML value), e.g. -p dataset cifar100 "
                             "or -p overrides '{train: {epochs: 5}}'")
    parser.add_argument("--only", nargs="*", default=None, help="run only notebooks whose name starts with these prefixes")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--pin", action="store_true",
                        help="pin the math libraries' CPU code path: the same numbers on any x86-64 CPU "
                             "with AVX2, about 35%% more CPU time in training (docs/reproducibility.md)")
    args = parser.parse_args(argv)
    if args.profile not in C.available_profiles():
        parser.error(f"unknown profile {args.profile!r}; available: {C.available_profiles()}")
    try:
        params = {name: _coerce(value, name) for name, value in args.parameter}
        _, cfg = prepare(args.profile, params, args.only)
    except (KeyError, ValueError, FileNotFoundError) as exc:  # rejected before anything ran
        parser.error(exc.args[0] if exc.args else str(exc))
    with _terminate_as_interrupt():
        try:
            run_series(args.profile, params, args.only, kernel=args.kernel, pin=args.pin)
        except KeyboardInterrupt:
            print("interrupted: the notebook that was running left no temporary file; rerun to go on "
                  "(finished artifacts are cached)", file=sys.stderr)
            raise SystemExit(130) from None
    if cfg["run_name"] == "default" and not args.only and not os.environ.get(C.RESULTS_ENV):
        from . import report

        RD.update_readme()
        report.update_readme()
        print("README.md and docs/: results and 'What holds, and where' updated from results/")


if __name__ == "__main__":
    main()
