"""The results of :mod:`backfill_utils.tools.bench_serve`: the summary table (merged and
single side by side), the benchmark's two goals, and the environment and code state it ran in.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch



def environment(threads: int, torch_threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "faiss_threads": threads, "torch_threads": torch_threads, "platform": platform.platform(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def git_state() -> str | None:
    """Commit of the code that ran (``+dirty`` with uncommitted changes), if in a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "backfill_utils"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def summarize(rows: list[dict]) -> pd.DataFrame:
    """One line per (size, factory, ratio): merged and single side by side."""
    df = pd.DataFrame(rows)
    keys = ["size", "factory", "ratio"]
    cols = ["qps_b1", "p50_ms", "p99_ms", "qps_b256", "p50_b256_ms", "recall_at_10", "index_mb", "index_rss_mb"]
    m = df[df.kind == "merged"].set_index(keys)[cols]
    s = df[df.kind == "single"].set_index(keys)[cols]
    out = m.add_suffix("_merged").join(s.add_suffix("_single"))
    out["params"] = df[df.kind == "merged"].set_index(keys)["params"].map(
        lambda p: ", ".join(f"{k}={v}" for k, v in p.items()) or "exact")
    plain = df[df.kind == "merged_plain"].set_index(keys)
    if len(plain):  # the index without psi and rho against the single index of the same pass
        out["index_ratio_b1"] = plain["p50_ms"] / plain["single_p50_ms"]
        out["index_ratio_b256"] = plain["p50_b256_ms"] / plain["single_p50_b256_ms"]
    else:
        out["index_ratio_b1"] = out["index_ratio_b256"] = np.nan
    # medians: robust to the scheduling stalls of a loaded machine
    out["time_ratio_b1"] = out["p50_ms_merged"] / out["p50_ms_single"]
    out["time_ratio_b256"] = out["p50_b256_ms_merged"] / out["p50_b256_ms_single"]
    return out.reset_index()


def goals(table: pd.DataFrame, rows: list[dict], target_size: int = 1_000_000) -> dict:
    """The two goals of the benchmark.

    1. Exact merged search takes at most 1.2 x the time of one exact index of
       the same total size: the largest median-time ratio over ratios and batch
       sizes (``Flat``), with psi and rho (``exact_time_ratio_max``) and for the
       index alone, without them (``exact_index_time_ratio_max``).
    2. An approximate factory reaches recall@10 >= 0.95 at ``target_size``
       items: per family, the smallest swept search parameter whose merged
       recall@10 is >= 0.95 at every ratio, with the merged and single
       throughputs of the sweep (batch of the recall queries) at that value and
       the merged throughput relative to the exact merged index at batch 256
       (``speedup_vs_exact``: an approximate index is only worth it above 1).
    """
    flat = table[table.factory == "Flat"]
    worst = float(flat[["time_ratio_b1", "time_ratio_b256"]].max().max()) if len(flat) else float("nan")
    worst_index = float(flat[["index_ratio_b1", "index_ratio_b256"]].max().max()) if len(flat) else float("nan")
    approx = {}
    for fam in ("IVF", "HNSW"):
        merged = [r for r in rows if r["size"] == target_size and r["family"] == fam and r["kind"] == "merged"]
        if not merged:
            continue
        key = next(k for k in merged[0]["sweep"][0] if k not in ("merged", "single"))
        values = [e[key] for e in merged[0]["sweep"]]
        per_value = {v: [next(e for e in r["sweep"] if e[key] == v) for r in merged] for v in values}
        ok = [v for v in values if min(e["merged"]["recall_at_10"] for e in per_value[v]) >= 0.95]
        best = ok[0] if ok else values[-1]
        approx[fam] = {"factory": merged[0]["factory"], "parameter": key, "value": best, "reaches_0.95": bool(ok),
                       "ratios": [r["ratio"] for r in merged],
                       "recall_at_10_merged": [e["merged"]["recall_at_10"] for e in per_value[best]],
                       "qps_merged": [e["merged"]["qps"] for e in per_value[best]],
                       "recall_at_10_single": [e["single"]["recall_at_10"] for e in per_value[best]],
                       "qps_single": [e["single"]["qps"] for e in per_value[best]],
                       "speedup_vs_exact": [e["merged"]["qps"] / float(exact.iloc[0]) for e, exact in zip(
                           per_value[best], (table[(table["size"] == target_size) & (table.factory == "Flat")
                                                   & (table.ratio == r["ratio"])].qps_b256_merged
                                             for r in merged))]}
    return {"exact_time_ratio_max": worst, "exact_within_1.2x": bool(worst <= 1.2),
            "exact_index_time_ratio_max": worst_index, "exact_index_within_1.2x": bool(worst_index <= 1.2),
            "approximate_at_target": approx, "target_size": target_size,
            "approximate_recall_0.95_met": any(v["reaches_0.95"] for v in approx.values())}
