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


def _params(p: dict) -> str:
    """``nprobe=8`` when both sides agree, ``old nprobe=1 / new nprobe=8`` when not, ``exact`` for none."""
    fmt = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())  # noqa: E731
    if not set(p) <= {"old", "new"}:
        return fmt(p) or "exact"
    sides = [d for d in p.values() if d]
    if len(sides) < 2 or sides[0] == sides[1]:
        return fmt(sides[0]) if sides else "exact"
    return f"old {fmt(p['old'])} / new {fmt(p['new'])}"


def summarize(rows: list[dict]) -> pd.DataFrame:
    """One line per (size, factory, ratio): merged and single side by side, and the merged
    index's throughput relative to the exact merged search of the same size and ratio
    (``speedup_b1``, ``speedup_b256``; measured in the same run, not interleaved with it)."""
    df = pd.DataFrame(rows)
    keys = ["size", "factory", "ratio"]
    cols = ["qps_b1", "p50_ms", "p99_ms", "qps_b256", "p50_b256_ms", "recall_at_10", "index_mb", "index_rss_mb"]
    m = df[df.kind == "merged"].set_index(keys)[cols]
    s = df[df.kind == "single"].set_index(keys)[cols]
    out = m.add_suffix("_merged").join(s.add_suffix("_single"))
    out["params"] = df[df.kind == "merged"].set_index(keys)["params"].map(_params)
    out["params_single"] = df[df.kind == "single"].set_index(keys)["params"].map(_params)
    plain = df[df.kind == "merged_plain"].set_index(keys)
    if len(plain):  # the index without psi and rho against the single index of the same pass
        out["index_ratio_b1"] = plain["p50_ms"] / plain["single_p50_ms"]
        out["index_ratio_b256"] = plain["p50_b256_ms"] / plain["single_p50_b256_ms"]
    else:
        out["index_ratio_b1"] = out["index_ratio_b256"] = np.nan
    # medians: robust to the scheduling stalls of a loaded machine
    out["time_ratio_b1"] = out["p50_ms_merged"] / out["p50_ms_single"]
    out["time_ratio_b256"] = out["p50_b256_ms_merged"] / out["p50_b256_ms_single"]
    out = out.reset_index()
    exact = out[out.factory == "Flat"].set_index(["size", "ratio"])
    for b in ("b1", "b256"):
        ref = pd.MultiIndex.from_frame(out[["size", "ratio"]]).map(exact[f"qps_{b}_merged"].to_dict().get)
        out[f"speedup_{b}"] = out[f"qps_{b}_merged"] / np.asarray(ref, dtype=float)
    return out


def fidelity_table(rows: list[dict]) -> pd.DataFrame:
    """The fidelity rows as one table: (pair, nprobe) by source."""
    df = pd.DataFrame(rows)
    table = df.pivot_table(index=["pair", "nprobe"], columns="source", values="recall_at_10")
    table["difference"] = table["benchmark"] - table["real"]
    return table


def goals(table: pd.DataFrame, rows: list[dict], target_size: int = 1_000_000) -> dict:
    """The benchmark's goals, each with the measured numbers.

    1. ``exact``: exact merged search (``Flat``, psi and rho included) takes at most 1.1 x
       the median time of one exact index over every item, at every size, ratio and batch
       size (``time_ratio_max`` per size; ``index_ratio_max``: the index without psi and rho).
    2. ``approximate``: at ``target_size``, for each approximate factory at its timed
       parameters, at every ratio: recall@10 >= 0.95 against the exact merged search and
       >= 10 x its throughput at batch 1 and batch 256.
    3. ``merged_vs_single``: at ``target_size``, over the swept values at which the single
       index reaches recall@10 0.95, the merged index (one value on both sides) is at most
       0.02 below it (the largest shortfall per family and ratio).
    """
    out: dict = {"target_size": target_size, "exact": {}, "approximate": {}, "merged_vs_single": {}}
    for size, flat in table[table.factory == "Flat"].groupby("size"):
        worst = float(flat[["time_ratio_b1", "time_ratio_b256"]].max().max())
        worst_index = float(flat[["index_ratio_b1", "index_ratio_b256"]].max().max())
        out["exact"][str(size)] = {"time_ratio_max": worst, "index_ratio_max": worst_index, "met": bool(worst <= 1.1)}
    at = table[(table["size"] == target_size) & (table.factory != "Flat")]
    for factory, t in at.groupby("factory"):
        per_ratio = [{"ratio": float(r.ratio), "params": r.params, "recall_at_10": float(r.recall_at_10_merged),
                      "speedup_b1": float(r.speedup_b1), "speedup_b256": float(r.speedup_b256)}
                     for r in t.itertuples()]
        out["approximate"][factory] = {
            "per_ratio": per_ratio,
            "met": all(p["recall_at_10"] >= 0.95 and min(p["speedup_b1"], p["speedup_b256"]) >= 10 for p in per_ratio)}
    for r in rows:
        if r["size"] != target_size or r["kind"] != "merged" or not r.get("sweep"):
            continue
        key = next(k for k in r["sweep"][0] if k not in ("merged", "single"))
        gaps = [e["single"]["recall_at_10"] - e["merged"]["recall_at_10"] for e in r["sweep"]
                if e["single"]["recall_at_10"] >= 0.95]
        entry = out["merged_vs_single"].setdefault(r["factory"], {"parameter": key, "per_ratio": []})
        entry["per_ratio"].append({"ratio": r["ratio"], "largest_shortfall": max(gaps) if gaps else None})
    for entry in out["merged_vs_single"].values():
        entry["met"] = all(p["largest_shortfall"] is not None and p["largest_shortfall"] <= 0.02
                           for p in entry["per_ratio"])
    return out


def _sweep_table(rows: list[dict], size: int, family: str) -> pd.DataFrame:
    """Recall@10 by swept value at ``size``: the single index and the merged one (the same
    value on both sides) at each ratio."""
    merged = [r for r in rows if r["size"] == size and r["family"] == family and r["kind"] == "merged"]
    if not merged or not merged[0].get("sweep"):
        return pd.DataFrame()
    key = next(k for k in merged[0]["sweep"][0] if k not in ("merged", "single"))
    table = pd.DataFrame({f"merged r={r['ratio']:g}": {e[key]: e["merged"]["recall_at_10"] for e in r["sweep"]}
                          for r in merged})
    table.insert(0, "single", pd.Series({e[key]: e["single"]["recall_at_10"] for e in merged[0]["sweep"]}))
    table.index = table.index.map(lambda v: str(int(v)))
    table.index.name = key
    return table


def render_markdown(result: dict) -> str:
    """The benchmark's results as the Markdown of the documentation's generated block."""
    env, cfg, rows = result["environment"], result["config"], result["rows"]
    table = pd.DataFrame(result["table"])
    lines = [f"Measured by `python -m backfill_utils.tools.bench_serve` (`--data {cfg['data']}`) on {env['cpu']} "
             f"({env['cpu_count']} CPUs), faiss {env['faiss']} with {env['faiss_threads']} threads "
             f"(batch 1: {cfg.get('threads_b1', env['faiss_threads'])}), torch "
             f"{env['torch']} with {env['torch_threads']}; load average {env['load_average_before'][0]:.1f} at the "
             f"start, {env['load_average_after'][0]:.1f} at the end; {env['wall_seconds'] / 60:.0f} minutes, code "
             f"{env['git']}.", ""]
    if result.get("fidelity"):
        fid = fidelity_table(result["fidelity"]).reset_index()
        lines += ["IVF recall@10 by `nprobe`, one index, the real test split against the benchmark gallery at "
                  "equal items per list (125):", "", fid.to_markdown(index=False, floatfmt=".3f"), ""]
    cols = {"factory": "factory", "ratio": "r", "params": "M params", "recall_at_10_merged": "M R@10",
            "params_single": "S params", "recall_at_10_single": "S R@10", "qps_b1_merged": "q/s b1 M",
            "qps_b1_single": "q/s b1 S", "qps_b256_merged": "q/s b256 M", "qps_b256_single": "q/s b256 S",
            "time_ratio_b1": "M/S b1", "time_ratio_b256": "M/S b256", "speedup_b1": "x exact b1",
            "speedup_b256": "x exact b256"}
    lines += ["M: the merged index over the mixed gallery (psi and rho included), S: one index of the same "
              "type over every new embedding; R@10: recall@10 on the test queries against exact search (M "
              "against exact merged search, S against one exact index); q/s at batch 1 and 256; M/S: median "
              "time ratio; x exact: M's throughput over the exact merged search's (Flat M at that size and "
              "ratio). IVF parameters are tuned on the validation queries (`tune_search`), per side for M.", ""]
    for size, t in table.groupby("size"):
        lines += [f"**{size:,} items**", "", t[list(cols)].rename(columns=cols).to_markdown(
            index=False, floatfmt=".3g"), ""]
    size = result["goals"]["target_size"]
    for family in ("IVF", "HNSW"):
        sweep = _sweep_table(rows, size, family)
        if len(sweep):
            lines += [f"{family} at {size:,} items, one value on both sides (recall@10):", "",
                      sweep.reset_index().to_markdown(index=False, floatfmt=".3f"), ""]
    g = result["goals"]
    lines.append("Goals: exact merged <= 1.1x one exact index: " + ", ".join(
        f"{int(s):,}: {v['time_ratio_max']:.2f}x ({'met' if v['met'] else 'not met'})" for s, v in g["exact"].items())
        + "; approximate recall@10 >= 0.95 at >= 10x exact merged, every ratio: " + ", ".join(
        f"{f}: {'met' if v['met'] else 'not met'}" for f, v in g["approximate"].items())
        + "; merged within 0.02 of single at equal parameter: " + ", ".join(
        f"{f}: {'met' if v['met'] else 'not met'}" for f, v in g["merged_vs_single"].items()) + ".")
    return "\n".join(lines)
