"""The papermill batch runner behind ``make reproduce``.

``python -m backfill_utils.run --profile default`` executes every notebook of
``notebooks/`` in name order (the numbers give the stage), passing the profile
and any ``-p name value`` parameters. Parameter names are checked against each
notebook's ``parameters`` cell first (papermill itself only warns on unknown
names). Executed notebooks go to ``results/executed/`` (for the default
profile; ``results/<profile>/executed/`` otherwise) and a runtime table is
printed and written next to them as ``runtimes.csv``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from . import config as C


def list_notebooks(select: list[str] | None = None) -> list[Path]:
    """Notebooks of the series in order; ``select`` keeps those whose name starts with a prefix."""
    books = sorted(p for p in C.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if select:
        books = [b for b in books if any(b.name.startswith(s) for s in select)]
        if not books:
            raise ValueError(f"no notebook matches {select}; notebooks: {[b.name for b in list_notebooks()]}")
    return books


def notebook_parameters(path: Path) -> dict:
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


def _coerce(value: str):
    import yaml

    return yaml.safe_load(value)


def run_series(profile: str = "default", params: dict | None = None, select: list[str] | None = None,
               out_dir: Path | None = None, kernel: str | None = None) -> pd.DataFrame:
    import papermill as pm

    params = dict(params or {})
    params["profile"] = profile
    books = list_notebooks(select)
    for book in books:  # fail before running anything
        check_parameters(book, {k: v for k, v in params.items() if k != "profile"} | {"profile": profile})
    out_dir = Path(out_dir) if out_dir else C.results_dir(profile) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    env_before = os.environ.get(C.PROFILE_ENV)
    os.environ[C.PROFILE_ENV] = profile
    try:
        for i, book in enumerate(books, 1):
            print(f"[{i}/{len(books)}] {book.name} ...", flush=True)
            t0 = time.perf_counter()
            target = out_dir / book.name
            tmp = target.with_name(f".{book.stem}.tmp.ipynb")
            try:
                pm.execute_notebook(
                    str(book), str(tmp), parameters=params, cwd=str(C.NOTEBOOKS_DIR),
                    kernel_name=kernel, progress_bar=False, log_output=False,
                )
            except Exception:
                if tmp.exists():
                    os.replace(tmp, target)  # keep the failed notebook for inspection
                print(f"FAILED: {book.name}; executed copy with the error: {target}", file=sys.stderr)
                raise
            os.replace(tmp, target)
            dt = time.perf_counter() - t0
            rows.append({"notebook": book.name, "seconds": round(dt, 1)})
            print(f"    done in {dt:.1f} s", flush=True)
    finally:
        if env_before is None:
            os.environ.pop(C.PROFILE_ENV, None)
        else:
            os.environ[C.PROFILE_ENV] = env_before
    table = pd.DataFrame(rows)
    total = table["seconds"].sum() if len(table) else 0.0
    table = pd.concat([table, pd.DataFrame([{"notebook": "TOTAL", "seconds": round(total, 1)}])])
    for suffix, write in ((".csv", lambda p: table.to_csv(p, index=False)),
                          (".md", lambda p: p.write_text(table.to_markdown(index=False) + "\n"))):
        tmp = out_dir / f".runtimes{suffix}.tmp"
        write(tmp)
        os.replace(tmp, out_dir / f"runtimes{suffix}")
    print(table.to_string(index=False))
    return table


README_START, README_END = "<!-- RESULTS:START -->", "<!-- RESULTS:END -->"
# (title, path under results/): figures shown inline, tables included as Markdown
README_FIGURES = [
    ("Backfilling, animated", "figures/backfill_animation.gif"),
    ("Fig. 2: rank merge of old and new (mAP, CMC top-1)", "figures/fig2_merge_curves.png"),
    ("Every method's backfilling curve", "figures/methods_compared.png"),
]
README_TABLES = [
    ("Table 1: AUC and relative gain of every method", "tables/table1.md"),
    ("The paper's claims, checked", "tables/claims.md"),
    ("Notebook runtimes (seconds)", "executed/runtimes.md"),
]


def update_readme(results: Path | None = None, readme: Path | None = None) -> None:
    """Rewrite the README block between the RESULTS markers from the files in ``results``."""
    results = Path(results or C.RESULTS_DIR)
    readme = Path(readme or C.REPO_ROOT / "README.md")
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block")
    parts = []
    for title, rel in README_FIGURES:
        if (results / rel).is_file():
            parts.append(f"**{title}** (`results/{rel}`)\n\n![{title}](results/{rel})\n")
    for title, rel in README_TABLES:
        if (results / rel).is_file():
            parts.append(f"**{title}** (`results/{rel}`)\n\n{(results / rel).read_text().strip()}\n")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = head + README_START + "\n" + "\n".join(parts) + README_END + tail
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run the notebook series headlessly with papermill.")
    parser.add_argument("--profile", default="default", help=f"one of {C.available_profiles()}")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (YAML value), e.g. -p dataset cifar100")
    parser.add_argument("--only", nargs="*", default=None, help="run only notebooks whose name starts with these prefixes")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    args = parser.parse_args(argv)
    if args.profile not in C.available_profiles():
        parser.error(f"unknown profile {args.profile!r}; available: {C.available_profiles()}")
    params = {name: _coerce(value) for name, value in args.parameter}
    run_series(args.profile, params, args.only, kernel=args.kernel)
    if args.profile == "default" and not params and not args.only:
        update_readme()
        print("README.md results block updated from results/")


if __name__ == "__main__":
    main()
