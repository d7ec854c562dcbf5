"""Benchmark of the exact engine: speed-up, the paper's scale, where the time goes.

    python -m backfill_utils.tools.bench [--threads 2] [--n 10000] [--large 50000]
                                   [--skip-baseline] [--out PATH] [--no-progress]
                                   [--docs | --render-only]

Everything is measured in one run, with ``torch.set_num_threads(threads)``:

1. **Side by side** (``n`` x ``n``, 100 classes): the 11-point distance-rank-merge
   curve (mAP, top-1, top-5, negative flips; leave-one-out) with the engine
   (:func:`backfill_utils.backfill.curves.backfill_curve`) and with the straightforward
   method (per ratio: the full ``n x n`` mixed distance matrix, a stable
   ``argsort`` of every row, ``sklearn.metrics.average_precision_score`` per
   query, as apple/ml-fct evaluates); speed-up and largest difference.
2. **The paper's scale** (``large`` x ``large``), each case in a child process
   that reports its wall time, its peak resident memory and the time of each
   engine phase: 100 classes x 500 items (500 relevant per query, CIFAR-100's
   gallery shape grown to 50,000) and 1,000 classes x 50 (ImageNet's validation
   set). The first child also times the two matrix products alone (the same
   ``addmm`` calls over the same chunks, nothing else): the lower bound of the
   arithmetic.
3. **The torch path** (``torch.searchsorted`` + ``bincount``, the engine before
   its compiled kernels, still used on GPUs) on ``--torch-sample`` queries of
   each large case, per phase, scaled to all queries.

Data: class-structured random 128-d embeddings of an "old" and a "new" model
(:func:`make_data`), every class the same size. The table is printed and a JSON
file is written (default ``results/bench/bench.json``; temporary file, then
``os.replace``). On a shared machine, the load average is recorded next to the
numbers (``environment.load_average_*``). ``--docs`` (or ``--readme``) also
rewrites the benchmark block ``BENCH`` of docs/protocol.md from the result
(``--render-only``: from the JSON file, measuring nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as C
from .. import io
from ..backfill import curves as BC, orders, systems as BS
from ..retrieval import counting, engine, phases
from ..retrieval import metrics as MT
from . import blocks

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "bench" / "bench.json"
#: The page that holds the benchmark block, and the block's name (:mod:`backfill_utils.tools.blocks`).
DOC, BLOCK = blocks.DOCS / "protocol.md", "BENCH"
#: The cases of the paper's scale: (name, number of classes); items per class = large / classes.
LARGE_CASES = (("100 classes x 500 (500 relevant per query)", 100),
               ("ImageNet-val shape: 1000 classes x 50", 1000))
#: The benchmark's targets (seconds with 2 threads; peak memory in MB; speed-up).
TARGETS = {"side_by_side_seconds": 5.0, "speedup": 50.0, "large_seconds": {100: 60.0, 1000: 30.0},
           "peak_rss_mb": 2048.0}


def make_data(n: int, dim: int = 128, n_classes: int = 100, seed: int = 0,
              sigma_old: float = 2.5, sigma_new: float = 2.0) -> dict[str, np.ndarray]:
    """Class-structured random embeddings of an 'old' and a 'new' model.

    Classes are balanced (``n // n_classes`` items each, the remainder spread
    over the first classes) in a seeded random order; each model places class
    ``c`` at its own random centre (the two spaces are unrelated, as for two
    independently trained models) and adds isotropic gaussian noise (the new
    model less); embeddings are L2-normalised float32.

    >>> d = make_data(12, dim=4, n_classes=3)
    >>> np.bincount(d["labels"]).tolist(), d["old"].shape, d["new"].dtype
    ([4, 4, 4], (12, 4), dtype('float32'))
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]

    def embed(sigma: float) -> torch.Tensor:
        centres = torch.randn(n_classes, dim, generator=g)
        x = centres[labels] + sigma * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    old = embed(sigma_old)
    new = embed(sigma_new)
    return {"labels": labels.numpy(), "old": old.numpy(), "new": new.numpy()}


def straightforward_curve(system: BS.BackfillSystem, labels: np.ndarray, ratios: np.ndarray,
                          ks=(1, 5), progress: bool = True, seed: int = 0) -> dict[str, list]:
    """The reference method: dense matrix, argsort, sklearn AP per query (leave-one-out).

    Per ratio the full mixed distance matrix is built, every row is argsorted
    (stable, so ties go to the lower index) and sklearn's AP is called per
    query. The query's own item gets a distance larger than every other one and
    is not relevant: it then adds no term to AP and never reaches the top k.
    """
    from sklearn.metrics import average_precision_score
    from tqdm import tqdm

    n = system.n_gallery
    labels = np.asarray(labels)
    out: dict[str, list] = {"ratio": [], "mAP": [], **{f"top{k}": [] for k in ks}}
    pbar = tqdm(total=len(ratios) * n, desc="straightforward", disable=not progress, unit="query")
    for r in ratios:
        is_new = system.backfilled(r, seed=seed)  # the system's order, else random_order(n, seed)
        d_old = MT.pairwise_distances(system.query_old, system.gallery_old).numpy()
        d_new = MT.pairwise_distances(system.query_new, system.gallery_new).numpy()
        d = np.where(is_new[None, :], d_new, d_old)
        del d_old, d_new
        diag = np.arange(n)
        d[diag, diag] = d.max(axis=1) + 1.0
        ranking = np.argsort(d, axis=1, kind="stable")
        rel = labels[None, :] == labels[:, None]
        rel[diag, diag] = False
        aps = np.empty(n)
        for i in range(n):
            aps[i] = average_precision_score(rel[i], -d[i])
            pbar.update(1)
        hit = np.take_along_axis(rel, ranking[:, : max(ks)], axis=1)
        out["ratio"].append(float(r))
        out["mAP"].append(100.0 * aps.mean())
        for k in ks:
            out[f"top{k}"].append(100.0 * hit[:, :k].any(1).mean())
        del d, ranking, rel
    pbar.close()
    return out


def _peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB.

    On Linux ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this
    process image; ``ru_maxrss`` is not used there because Linux carries it over
    from the parent across fork and exec, which would report the parent's
    peak). Elsewhere ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # macOS: bytes, else KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _system(data: dict) -> BS.BackfillSystem:
    return BS.BackfillSystem.merge("rank merge", data["old"], data["old"], data["new"], data["new"],
                                   query_passes=2)


def _warm_up() -> float:
    """Seconds of the first engine call on tiny data (numba compile or cache load)."""
    data = make_data(64, 8, 4)
    t0 = time.perf_counter()
    BC.backfill_curve(_system(data), data["labels"], data["labels"], exclude_self=True)
    return time.perf_counter() - t0


def _engine_run(data: dict, progress: bool, memory_budget: int | None) -> tuple[float, Any, int, dict]:
    labels = data["labels"]
    n = len(labels)
    chunk = MT.auto_chunk_size(n, n, int(np.bincount(labels).max()), 11, memory_budget)
    with phases.phase_times() as times:
        t0 = time.perf_counter()
        curve = BC.backfill_curve(_system(data), labels, labels, exclude_self=True, seed=0,
                                  memory_budget=memory_budget, progress=progress)
        seconds = time.perf_counter() - t0
    times = dict(times)
    times["rest"] = times["total"] - sum(v for k, v in times.items() if k != "total")
    return seconds, curve, chunk, times


def _products_alone(data: dict, chunk: int) -> float:
    """Seconds of the engine's two ``addmm`` per chunk over all queries, nothing else."""
    sides = [torch.from_numpy(data["old"]), torch.from_numpy(data["new"])]
    sq = [(x * x).sum(1) for x in sides]
    t0 = time.perf_counter()
    for s in range(0, len(data["labels"]), chunk):
        for x, x_sq in zip(sides, sq):
            engine.raw_distances(x[s:s + chunk], x, x_sq)
    return time.perf_counter() - t0


def _torch_path_sample(data: dict, n_queries: int, chunk: int) -> dict:
    """Phases of the torch path on the first ``n_queries`` queries, scaled to all."""
    labels = data["labels"]
    n = len(labels)
    q = min(n_queries, n)
    codes, _ = MT.encode_labels(labels, labels)
    seg = orders.backfill_segments(orders.random_order(n, 0), orders.DEFAULT_RATIOS)
    old, new = torch.from_numpy(data["old"]), torch.from_numpy(data["new"])
    before = engine.CPU_METHOD
    engine.CPU_METHOD = "torch"
    try:
        with phases.phase_times() as times:
            engine.retrieval_statistics(old[:q], old, new[:q], new, codes[:q], codes, segment=seg,
                                        n_ratios=len(orders.DEFAULT_RATIOS), exclude_self=True,
                                        chunk_size=min(chunk, q))
    finally:
        engine.CPU_METHOD = before
    scaled = {k: v * n / q for k, v in times.items()}
    scaled["rest"] = scaled["total"] - sum(v for k, v in scaled.items() if k != "total")
    return {"queries_measured": q, "seconds_scaled_to_all_queries": scaled}


def _large_worker(args: argparse.Namespace) -> None:
    """Child process: one large curve; prints one JSON line with times and peak RSS."""
    torch.set_num_threads(args.threads)
    jit = _warm_up()
    data = make_data(args.n, args.dim, args.classes, args.seed)
    rss_data = _peak_rss_mb()
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds, curve, chunk, times = _engine_run(data, args.progress, args.memory_budget)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = {"n": args.n, "classes": args.classes, "per_class": args.n // args.classes,
           "seconds": seconds, "cpu_seconds": cpu, "chunk_size": chunk, "phases_seconds": times,
           "peak_rss_mb": _peak_rss_mb(), "rss_after_data_mb": rss_data, "first_call_seconds": jit,
           "curve": curve.to_dict(orient="list")}
    if args.products:
        res["matrix_products_alone_seconds"] = _products_alone(data, chunk)
    if args.torch_sample:
        res["torch_path"] = _torch_path_sample(data, args.torch_sample, chunk)
    print(json.dumps(res))


def _run_large(classes: int, args: argparse.Namespace, extras: bool) -> dict:
    cmd = [sys.executable, "-m", "backfill_utils.tools.bench", "--_large-worker", "--n", str(args.large),
           "--dim", str(args.dim), "--classes", str(classes), "--seed", str(args.seed),
           "--threads", str(args.threads), "--torch-sample", str(args.torch_sample)]
    if args.memory_budget is not None:
        cmd += ["--memory-budget", str(args.memory_budget)]
    if extras:
        cmd.append("--products")
    if args.no_progress:
        cmd.append("--no-progress")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"large benchmark process ({classes} classes) failed with exit code "
                           f"{proc.returncode}; run `{' '.join(cmd)}` to see its error")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_seconds"] = wall
    return res


def _environment(threads: int) -> dict:
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "numba": numba_version, "cpu_method": counting.resolve_method(engine.CPU_METHOD, torch.device("cpu")),
            "torch_threads": threads, "cpu_count": os.cpu_count(), "cpu_model": C.cpu_model(),
            "machine": platform.machine(), "system": platform.system(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _side_by_side(args: argparse.Namespace) -> tuple[dict, list]:
    data = make_data(args.n, args.dim, args.classes, args.seed)
    eng_s, curve, chunk, times = _engine_run(data, args.progress, args.memory_budget)
    res: dict[str, Any] = {"n": args.n, "classes": args.classes, "engine_seconds": eng_s, "chunk_size": chunk,
                           "engine_phases_seconds": times, "engine_curve": curve.to_dict(orient="list")}
    rows = [(f"engine, {args.n} x {args.n}, 11-point curve", f"{eng_s:8.1f} s  (chunk {chunk} queries)")]
    if not args.skip_baseline:
        t0 = time.perf_counter()
        base = straightforward_curve(_system(data), data["labels"], orders.DEFAULT_RATIOS,
                                     progress=args.progress)
        base_s = time.perf_counter() - t0
        diff = max(float(np.max(np.abs(np.asarray(base[c]) - curve[c].to_numpy())))
                   for c in ("mAP", "top1", "top5"))
        res.update(straightforward_seconds=base_s, straightforward_curve=base, speedup=base_s / eng_s,
                   max_abs_diff_pct_points=diff)
        rows += [("straightforward (argsort + sklearn)", f"{base_s:8.1f} s"),
                 ("speed-up", f"{base_s / eng_s:8.1f} x"),
                 ("max |engine - straightforward| (pct points)", f"{diff:.2e}")]
    return res, rows


def _targets(result: dict) -> dict:
    """Each target with its measured value and whether it is met."""
    sbs = result["side_by_side"]
    out = {"side_by_side_seconds": {"target": TARGETS["side_by_side_seconds"], "measured": sbs["engine_seconds"]}}
    if "speedup" in sbs:
        out["speedup"] = {"target": TARGETS["speedup"], "measured": sbs["speedup"], "at_least": True}
    for case in result.get("large", []):
        lim = TARGETS["large_seconds"].get(case["classes"])
        if lim is not None and case["n"] == 50000:
            out[f"large_{case['classes']}_classes_seconds"] = {"target": lim, "measured": case["seconds"]}
        out[f"large_{case['classes']}_classes_peak_rss_mb"] = {"target": TARGETS["peak_rss_mb"],
                                                               "measured": case["peak_rss_mb"]}
    for v in out.values():
        v["met"] = v["measured"] >= v["target"] if v.pop("at_least", False) else v["measured"] <= v["target"]
    return out


def _fmt_phases(times: dict, keys: list[str]) -> str:
    return "; ".join(f"{k} {times[k]:.1f}" for k in keys if k in times)


def render_markdown(result: dict) -> str:
    """The benchmark block (Markdown) of docs/protocol.md from a result of :func:`main`."""
    env, sbs = result["environment"], result["side_by_side"]
    load = [f"{x:.1f}" for x in (env.get("load_average_start") or [])[:1] + (env.get("load_average_end") or [])[:1]]
    lines = [f"Measured by `python -m backfill_utils.tools.bench` on {env['cpu_model']} ({env['cpu_count']} CPUs), "
             f"{env['torch_threads']} threads, torch {env['torch']}, numba {env['numba']}; load average "
             f"{' at the start, '.join(load)} at the end (1 minute; above {env['cpu_count']} means other "
             f"jobs shared the CPUs). First engine call in a fresh process (compiled kernels loaded from "
             f"the cache): {env['first_call_seconds']:.1f} s.", "",
             "| 11-point exact curve (mAP, top-1, top-5, negative flips), leave-one-out | seconds | "
             "peak memory | target | met |", "|---|---:|---:|---|---|"]
    tg = result.get("targets", {})

    def met(key):
        return ("yes" if tg[key]["met"] else "**no**") if key in tg else ""
    n = sbs["n"]
    lines.append(f"| {n:,} x {n:,}, engine | {sbs['engine_seconds']:.1f} | | <= 5 s | {met('side_by_side_seconds')} |")
    if "straightforward_seconds" in sbs:
        lines.append(f"| {n:,} x {n:,}, straightforward (argsort + scikit-learn), same run | "
                     f"{sbs['straightforward_seconds']:.0f} | | | |")
        lines.append(f"| speed-up (curves agree to {sbs['max_abs_diff_pct_points']:.0e} points) | "
                     f"{sbs['speedup']:.0f}x | | >= 50x | {met('speedup')} |")
    for case in result.get("large", []):
        key = f"large_{case['classes']}_classes_seconds"
        target = f"<= {tg[key]['target']:.0f} s, 2 GB" if key in tg else ""
        ok = met(key) + ("" if met(key.replace("seconds", "peak_rss_mb")) == "yes" else " (memory: no)")
        lines.append(f"| {case['n']:,} x {case['n']:,}, {case['name']} | {case['seconds']:.1f} | "
                     f"{case['peak_rss_mb']:.0f} MB | {target} | {ok} |")
    cpu = [f"{c['name']}: {c['cpu_seconds']:.0f}" for c in result.get("large", []) if "cpu_seconds" in c]
    if cpu:
        lines += ["", f"CPU time of those processes (user + system, all threads), seconds: {'; '.join(cpu)}. "
                  f"On a quiet machine the wall time approaches it divided by the threads "
                  f"({env['torch_threads']}): every phase runs on all of them."]
    lines += ["", "Where the time goes (seconds of wall time, same run):", ""]
    for case in result.get("large", []):
        ph = case["phases_seconds"]
        keys = [k for k in ph if k != "total"]
        lines.append(f"* {case['name']}: {_fmt_phases(ph, keys)}; total {ph['total']:.1f}.")
        if "matrix_products_alone_seconds" in case:
            lines.append(f"  Lower bound of the arithmetic, the two matrix products alone (the same `addmm` "
                         f"calls over the same chunks): {case['matrix_products_alone_seconds']:.1f}.")
        if "torch_path" in case:
            tp = case["torch_path"]["seconds_scaled_to_all_queries"]
            keys = [k for k in tp if k != "total"]
            lines.append(f"  The torch path (`torch.searchsorted` + `bincount`, the engine before its compiled "
                         f"kernels; still the GPU path), {case['torch_path']['queries_measured']:,} queries "
                         f"scaled to all: {_fmt_phases(tp, keys)}; total {tp['total']:.0f}.")
    return "\n".join(lines) + "\n"


def write_doc_block(result: dict, path: Path | None = None) -> None:
    """Replace the block between the BENCH markers of ``path`` (default :data:`DOC`,
    docs/protocol.md) atomically; the rest of the file is unchanged."""
    blocks.write_block(DOC if path is None else path, BLOCK, lambda: render_markdown(result))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backfill_utils.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch (and engine) threads (default 2)")
    p.add_argument("--n", type=int, default=10000, help="queries = gallery items of the side-by-side run")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--classes", type=int, default=100, help="classes of the side-by-side data")
    p.add_argument("--large", type=int, default=50000, help="size of the large runs (0: skip them)")
    p.add_argument("--torch-sample", type=int, default=1000,
                   help="queries of the torch-path breakdown (0: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-budget", type=int, default=None,
                   help="bytes per engine chunk (default: the engine's, 1 GiB on the CPU)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the straightforward method")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--docs", "--readme", dest="docs", action="store_true",
                   help="also rewrite the benchmark block of docs/protocol.md (between the BENCH markers)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: rewrite the block of docs/protocol.md from the JSON at --out")
    p.add_argument("--_large-worker", dest="large_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--products", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    args.progress = not args.no_progress
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.large_worker:
        _large_worker(args)
        return {}
    if args.render_only:
        result = json.loads(args.out.read_text())
        write_doc_block(result)
        print(f"{DOC} benchmark block rewritten from {args.out}")
        return result
    torch.set_num_threads(args.threads)
    env = _environment(args.threads)
    print(f"torch threads {args.threads}; {env['cpu_model']} ({env['cpu_count']} CPUs); "
          f"load average {env['load_average_start']}", flush=True)
    env["first_call_seconds"] = _warm_up()
    sbs, rows = _side_by_side(args)
    result: dict[str, Any] = {
        "config": {"n": args.n, "dim": args.dim, "classes": args.classes, "seed": args.seed,
                   "large": args.large, "ratios": orders.DEFAULT_RATIOS.tolist(), "exclude_self": True,
                   "system": "rank merge (old/old + new/new)", "memory_budget": args.memory_budget},
        "environment": env, "side_by_side": sbs, "large": []}
    if args.large:
        for i, (name, classes) in enumerate(LARGE_CASES):
            print(f"large run: {args.large} x {args.large}, {name}, in a child process ...", flush=True)
            case = _run_large(classes, args, extras=i == 0)
            case["name"] = name
            result["large"].append(case)
            rows += [(f"engine, {args.large} x {args.large}, {name}",
                      f"{case['seconds']:8.1f} s  (chunk {case['chunk_size']}, "
                      f"peak RSS {case['peak_rss_mb']:.0f} MB)")]
            if "matrix_products_alone_seconds" in case:
                rows.append(("  the two matrix products alone", f"{case['matrix_products_alone_seconds']:8.1f} s"))
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["targets"] = _targets(result)
    print()
    print("\n".join(f"{a:<58}  {b}" for a, b in rows))
    for k, v in result["targets"].items():
        print(f"target {k}: {v['measured']:.1f} vs {v['target']} -> {'met' if v['met'] else 'NOT met'}")
    io.atomic_write_json(args.out, result)
    if args.docs:
        write_doc_block(result)
    print(f"\nload average at the end {env['load_average_end']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
