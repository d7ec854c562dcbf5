"""The generated results blocks: README's compact Table 1 (block ``RESULTS``) and every figure
and table of docs/results.md (block ``RESULTS_FULL``), from the files under ``results/``
(written through :mod:`backfill_utils.tools.blocks`; the runner updates them after the
default series).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import config as C
from . import blocks


#: The compact results of README.md and every figure and table of docs/results.md
#: (:mod:`backfill_utils.tools.blocks`).
README_BLOCK, DOC_BLOCK = "RESULTS", "RESULTS_FULL"
DOC = blocks.DOCS / "results.md"
#: The setting of README's compact Table 1 (the one over several seeds).
README_SETTING = "extended"
# (title, path under results/): figures shown inline, tables included as Markdown
RESULTS_FIGURES = [
    ("Backfilling, animated", "figures/backfill_animation.gif"),
    ("Fig. 2: rank merge of old and new (mAP, CMC top-1)", "figures/fig2_merge_curves.png"),
    ("Every method's backfilling curve", "figures/methods_compared.png"),
    ("The regime map: when the reverse direction wins (make regimes)", "figures/regime_map.png"),
    ("Sensitivity of Ours around its tuned recipe (make tune)", "figures/sensitivity.png"),
]
RESULTS_TABLES = [
    ("Table 1: AUC and relative gain of every method (mean and sd over the seeds of the compatibility stage)",
     "tables/table1.md"),
    ("Table 1, second block: default recipe and tuned with an equal budget (make tune)", "tables/table1_tuned.md"),
    ("The paper's claims over the seeds, with their verdicts", "tables/claims.md"),
    ("Table 2, cost next to quality: query side and gallery side", "tables/table2_cost.md"),
    ("Notebook runtimes (seconds)", "executed/runtimes.md"),
]


def _pm(mean, sd, fmt: str) -> str:
    if pd.isna(mean):
        return "n/a"
    return format(mean, fmt) + ("" if pd.isna(sd) else " +- " + format(sd, fmt))


def compact_table1(results: Path | None = None, setting: str = README_SETTING) -> str:
    """README's Table 1: one setting, method x AUC_mAP and relative gain of AUC_mAP (mean +- sd
    over the seeds of the compatibility stage), from ``tables/table1.csv``."""
    results = Path(results or C.RESULTS_DIR)
    path = results / "tables" / "table1.csv"
    if not path.is_file():
        return "Not computed yet: run `make reproduce`.\n"
    t1 = pd.read_csv(path)
    rows = t1[t1.setting == setting]
    if rows.empty:
        return f"`{path.name}` has no {setting} setting: run `make reproduce`.\n"
    seeds = int(rows["seeds"].max()) if "seeds" in rows else 1
    lines = [f"Table 1, {setting} setting (`results/tables/table1.csv`; mean +- sd over {seeds} seed(s) of the "
             "compatibility stage; relative gain = (AUC - M_old) / (M_new - M_old)):", "",
             "| method | AUC_mAP | relative gain of AUC_mAP (%) |", "|:--|--:|--:|"]
    nan = float("nan")
    for _, r in rows.iterrows():
        lines.append(f"| {r['method']} | {_pm(r['AUC_mAP'], r.get('AUC_mAP_sd', nan), '.2f')} | "
                     f"{_pm(r.get('gain_mAP_%', nan), r.get('gain_mAP_%_sd', nan), '.1f')} |")
    total = series_seconds(results)
    if total is not None:
        lines += ["", f"The notebook series of this run took {total:.0f} s ({total / 60:.1f} minutes; per notebook: "
                      "`results/executed/runtimes.md`)."]
    return "\n".join(lines) + "\n"


def series_seconds(results: Path) -> float | None:
    """The wall time of the notebook series of the run in ``results`` (the ``TOTAL`` row of
    ``executed/runtimes.csv``), or None when it has not run."""
    path = Path(results) / "executed" / "runtimes.csv"
    if not path.is_file():
        return None
    t = pd.read_csv(path)
    total = t.loc[t["notebook"] == "TOTAL", "seconds"]
    return float(total.iloc[0]) if len(total) else None


def full_results(results: Path | None = None) -> str:
    """docs/results.md: every figure and table of :data:`RESULTS_FIGURES` / :data:`RESULTS_TABLES`
    that exists under ``results``."""
    results = Path(results or C.RESULTS_DIR)
    parts = []
    for title, rel in RESULTS_FIGURES:
        if (results / rel).is_file():
            parts.append(f"**{title}** (`results/{rel}`)\n\n![{title}](../results/{rel})\n")
    for title, rel in RESULTS_TABLES:
        if (results / rel).is_file():
            parts.append(f"**{title}** (`results/{rel}`)\n\n{(results / rel).read_text().strip()}\n")
    return "\n".join(parts)


def update_readme(results: Path | None = None, root: Path | None = None) -> None:
    """Rewrite README's compact Table 1 (block ``RESULTS``) and docs/results.md's figures and
    tables (block ``RESULTS_FULL``) from the files in ``results``. ``root``: the folder holding
    README.md and docs/ (default: the repository)."""
    readme, doc = (blocks.README, DOC) if root is None else (Path(root) / "README.md", Path(root) / "docs" / "results.md")
    blocks.write_block(readme, README_BLOCK, lambda: compact_table1(results))
    blocks.write_block(doc, DOC_BLOCK, lambda: full_results(results))
