"""Benchmark of the faiss index over the mixed gallery against one faiss index.

    python -m backfill_utils.tools.bench_serve [--sizes 100000 1000000] [--ratios 0 0.5 1]
        [--factories Flat IVF HNSW] [--threads 2] [--out PATH] [--no-progress] ...

For each gallery size ``N`` (a child process per size, so that each size has its
own peak memory):

1. ``--data models`` (default): embeddings of trained networks -- the ``--setting``'s old
   and new models of the ``--profile`` (default: the default profile's extended setting)
   over newly rendered images of its test classes
   (:func:`backfill_utils.tools.bench_gallery.model_inputs`, cached per chunk), test and
   validation queries from streams of their own, and the trained ``--method``'s psi and
   rho (default "Ours"); with it, the real test split's IVF recall curve beside the
   gallery's (``fidelity`` in the output). ``--data generated``: 128-d class-structured
   embeddings (:func:`backfill_utils.tools.bench.make_data`), psi a
   :class:`~backfill_utils.compat.modules.ReverseTransform` trained with L_rev for a few
   epochs, rho a :class:`~backfill_utils.compat.modules.LearnableEmbedding` as initialised;
2. IVF: at each ratio the merged index's ``nprobe`` per side is chosen by
   :meth:`~backfill_utils.serve.index.OnlineBackfillIndex.tune_search` on the validation
   queries for recall@10 >= ``--target``, and the single index's as the smallest swept
   ``nprobe`` reaching it; HNSW runs ``--ef-search`` on both;
3. per factory (``Flat`` exact, ``IVF``, ``HNSW``): **single** = one faiss
   index of that type holding the new embeddings of all ``N`` items (queried
   with the new embedding); **merged** = an
   :class:`~backfill_utils.serve.index.OnlineBackfillIndex` with psi and rho, filled
   with ``add_old`` and then backfilled in a random order up to each ratio;
   for ``Flat`` also **merged_plain**, the same index without psi and rho (a
   compatible model's), in a pass of its own against the single index, which
   measures the index apart from the transforms;
4. at each ratio, merged and single interleaved query by query (so that a
   change of machine load hits both): queries/s at batch 1 and batch 256,
   p50 / p99 latency at batch 1; recall@10 of the approximate factories
   against the exact results of the same queries (merged: the exact merged
   ranking, i.e. the ``Flat`` merged index; single: the ``Flat`` single index),
   at the chosen search parameters and over a sweep of one parameter for both sides;
5. memory: the size of each index (``faiss.serialize_index``: vectors, ids,
   graph or lists; for merged both sides, HNSW tombstones included), the growth
   of resident memory while it is built, and the child's peak resident memory
   (``VmHWM``: data, both indexes and the search buffers together).

The time ratio merged / single is the ratio of the *median* times (batch 1 and
batch 256): a loaded machine stalls single calls, and medians keep those stalls
from deciding the comparison. faiss uses ``--threads`` OpenMP threads (default
2); torch (psi, rho) ``--torch-threads`` (default 1): the transforms are too
small to gain from threads, and two thread pools on two cores spin against each
other. HNSW uses faiss's default ``efConstruction`` (40). The table is printed
and ``results/bench/serve.json`` written atomically.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch
from tqdm import tqdm

from .. import config as C
from .. import io
from ..backfill import orders
from ..compat import modules as K
from ..compat.fit import fit_reverse
from ..compat.recipes import RevPsiRecipe
from ..serve.index import OnlineBackfillIndex
from . import bench_gallery as G
from . import blocks
from .bench import make_data
from .bench_serve_summary import environment, fidelity_table, git_state, goals, render_markdown, summarize
from .bench_timing import interleaved, recall_at, status_mb

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "results" / "bench" / "serve.json"
DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
TOP_K = 10
SPEED_COLUMNS = ["N", "factory", "ratio", "qps_b1_merged", "qps_b1_single", "p50_ms_merged", "p50_ms_single",
                 "p99_ms_merged", "p99_ms_single", "qps_b256_merged", "qps_b256_single", "time_ratio_b1",
                 "time_ratio_b256", "index_ratio_b1", "index_ratio_b256", "speedup_b1", "speedup_b256"]
MEMORY_COLUMNS = ["N", "factory", "ratio", "params", "recall_at_10_merged", "recall_at_10_single",
                  "index_mb_merged", "index_mb_single", "index_rss_mb_merged", "index_rss_mb_single"]


def nlist_for(n: int) -> int:
    """IVF lists: the power of two nearest to ``4 sqrt(n)`` (faiss's guideline 4-16 sqrt(n))."""
    return int(2 ** round(np.log2(4 * np.sqrt(n))))


def factory_spec(family: str, n: int, args: argparse.Namespace) -> tuple[str, dict, str, list[int]]:
    """``(factory string, search params, swept parameter, sweep values)`` of a family."""
    if family == "Flat":
        return "Flat", {}, "", []
    if family == "IVF":
        nlist = nlist_for(n)
        sweep = sorted({v for v in args.nprobe_sweep if v <= nlist})
        if not sweep:
            raise ValueError(f"--nprobe-sweep {args.nprobe_sweep} has no value <= nlist {nlist} of {n:,} items; "
                             "give smaller values")
        return f"IVF{nlist},Flat", {"nprobe": min(args.nprobe, nlist)}, "nprobe", sweep
    if family == "HNSW":
        return f"HNSW{args.hnsw_m}", {"efSearch": args.ef_search}, "efSearch", args.ef_sweep
    raise ValueError(f"unknown factory family {family!r}; use Flat, IVF or HNSW")


def _single_index(factory: str, x: np.ndarray, train: np.ndarray, args, progress: bool):
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_L2)
    if not index.is_trained:
        index.train(train)
    for s in tqdm(range(0, len(x), args.chunk), desc=f"single {factory}", disable=not progress, leave=False):
        index.add(x[s:s + args.chunk])
    return index


def _search_single(index, params: dict) -> Callable:
    if isinstance(index, faiss.IndexIVF):
        return lambda q, k: index.search(q, k, params=faiss.SearchParametersIVF(**params))
    if isinstance(index, faiss.IndexHNSW):
        return lambda q, k: index.search(q, k, params=faiss.SearchParametersHNSW(**params))
    return lambda q, k: index.search(q, k)


def _measure(fns: dict[str, Callable], q: np.ndarray, args) -> dict[str, dict]:
    """Batch-1 latency (faiss on ``--threads-b1`` threads) and batch-256 throughput (on
    ``--threads``) of each search function (interleaved)."""
    faiss.omp_set_num_threads(args.threads_b1)
    try:
        b1 = interleaved({n: (lambda x, f=f: f(x, TOP_K)) for n, f in fns.items()},
                         [q[i:i + 1] for i in range(args.max_queries)], args.min_queries, args.max_seconds)
    finally:
        faiss.omp_set_num_threads(args.threads)
    bs = args.batch_size
    bb = interleaved({n: (lambda x, f=f: f(x, TOP_K)) for n, f in fns.items()},
                     [q[i:i + bs] for i in range(0, args.max_batches * bs, bs)], args.min_batches, args.max_seconds)
    out = {}
    for name in fns:
        t1, tb = np.asarray(b1[name]), np.asarray(bb[name])
        out[name] = {"qps_b1": len(t1) / t1.sum(), "p50_ms": 1e3 * float(np.percentile(t1, 50)),
                     "p99_ms": 1e3 * float(np.percentile(t1, 99)), "n_b1": len(t1),
                     "qps_b256": bs * len(tb) / tb.sum(), "p50_b256_ms": 1e3 * float(np.median(tb)),
                     "n_b256": bs * len(tb)}
    return out


def _build_merged(data: dict, factory: str, params: dict, psi, rho, args, progress: bool) -> OnlineBackfillIndex:
    """The merged index with every item on the old side (ratio 0)."""
    n = len(data["old"])
    merged = OnlineBackfillIndex(data["old"].shape[1], data["new"].shape[1], query_transform=psi,
                                 new_transform=rho, factory=factory, search_params=params or None)
    if factory.startswith("IVF"):
        merged.train(old=data["old"][:args.train_size], new=data["new"][:args.train_size])
    for s in tqdm(range(0, n, args.chunk), desc=f"add_old {factory}", disable=not progress, leave=False):
        merged.add_old(np.arange(s, min(s + args.chunk, n)), data["old"][s:s + args.chunk])
    return merged


def _tune_single(single, q_val: np.ndarray, values: list, target: float) -> tuple[dict, float]:
    """The smallest swept ``nprobe`` of the single IVF index whose recall@10 on the validation
    queries (against its search of every list, which is exact) reaches ``target``; the largest
    value when none does."""
    exact = single.search(q_val, TOP_K, params=faiss.SearchParametersIVF(nprobe=single.nlist))[1]
    for value in values:
        recall = recall_at(single.search(q_val, TOP_K, params=faiss.SearchParametersIVF(nprobe=value))[1], exact)
        if recall >= target:
            break
    return {"nprobe": value}, recall


def _sweep(merged, single, params: dict, key: str, values: list, q: np.ndarray, exact_m, exact_s) -> list[dict]:
    """Recall@10 and throughput (one batch of ``q``) of merged and single at each swept value
    (the same value on both sides of the merged index)."""
    rows, chosen = [], merged.search_params
    for value in values:
        merged.set_search_params(**{key: value})
        entry = {key: value}
        for kind, fn, exact in (("merged", merged.search, exact_m),
                                ("single", _search_single(single, {**params, key: value}), exact_s)):
            t = time.perf_counter()
            found = fn(q, TOP_K)[1]
            entry[kind] = {"recall_at_10": recall_at(found, exact), "qps": len(q) / (time.perf_counter() - t)}
        rows.append(entry)
    if values:
        merged.set_search_params(**chosen)
    return rows


def _run_family(family: str, data: dict, psi, rho, truth: dict, args, progress: bool) -> list[dict]:
    """Single and merged index of one family at every ratio (see the module docstring).

    For ``Flat`` a third index, ``merged_plain``, holds the same items without
    psi and rho (a compatible model's index): it measures the index alone, apart
    from the transforms' forward passes.
    """
    n = len(data["old"])
    factory, params, sweep_key, sweep = factory_spec(family, n, args)
    order = orders.random_order(n, seed=args.seed)
    q_rec = data["q_new"][:args.recall_queries]
    rows: list[dict] = []
    rss0, t0 = status_mb("VmRSS"), time.perf_counter()
    single = _single_index(factory, data["new"], data["new"][:args.train_size], args, progress)
    single_build = {"build_s": time.perf_counter() - t0, "index_rss_mb": status_mb("VmRSS") - rss0,
                    "index_mb": faiss.serialize_index(single).nbytes / 2**20}
    params_single, tuned_single = dict(params), None
    if family == "IVF":
        params_single, tuned_single = _tune_single(single, data["q_val"], sweep, args.target)
    search_single = _search_single(single, params_single)
    rss0, t0 = status_mb("VmRSS"), time.perf_counter()
    merged = _build_merged(data, factory, params, psi, rho, args, progress)
    merged_build = {"build_s": time.perf_counter() - t0}
    done = 0
    for ratio in args.ratios:
        m = orders.backfilled_count(ratio, n)
        t0 = time.perf_counter()
        for s in tqdm(range(done, m, args.chunk), desc=f"backfill to {ratio}", disable=not progress, leave=False):
            batch = order[s:min(s + args.chunk, m)]
            merged.backfill(batch, data["new"][batch])
        backfill_s, done = time.perf_counter() - t0, m
        merged_build["index_rss_mb"] = status_mb("VmRSS") - rss0
        merged_build["index_mb"] = sum(faiss.serialize_index(side.index).nbytes  # both sides, tombstones included
                                       for side in (merged._old, merged._new)) / 2**20
        tuned = None
        if family == "IVF":
            t0 = time.perf_counter()
            try:
                tuned = merged.tune_search(data["q_val"], target=args.target, k=TOP_K, grid=sweep)
                tuned = {"recall_val": tuned["recall"], "cost": tuned["cost"], "seconds": time.perf_counter() - t0}
            except ValueError as exc:  # the target is out of the grid's reach: its largest value
                merged.set_search_params(nprobe=sweep[-1])
                tuned = {"unreachable": str(exc), "seconds": time.perf_counter() - t0}
        res = _measure({"merged": merged.search, "single": search_single}, data["q_new"], args)
        exact_m = truth.setdefault(("merged", ratio), merged.search(q_rec, TOP_K)[1] if family == "Flat" else None)
        exact_s = truth.setdefault(("single", ratio), search_single(q_rec, TOP_K)[1] if family == "Flat" else None)
        sweep_rows = _sweep(merged, single, params, sweep_key, sweep, q_rec, exact_m, exact_s)
        for kind, fn, exact in (("merged", merged.search, exact_m), ("single", search_single, exact_s)):
            sizes = {"old": merged.n_old, "new": merged.n_new}
            used = ({side: p for side, p in merged.search_params.items() if sizes[side]}  # non-empty sides
                    if kind == "merged" else {"old": params_single, "new": params_single})
            rows.append({"size": n, "family": family, "factory": factory, "params": used, "ratio": float(ratio),
                         "kind": kind, **res[kind], **(single_build if kind == "single" else merged_build),
                         "tuned": tuned if kind == "merged" else (
                             {"recall_val": tuned_single} if tuned_single is not None else None),
                         "recall_at_10": None if family == "Flat" else recall_at(fn(q_rec, TOP_K)[1], exact),
                         **({"backfill_s": backfill_s, "n_new": merged.n_new} if kind == "merged" else {}),
                         **({"sweep": sweep_rows} if kind == "merged" and sweep else {})})
        if progress:
            tqdm.write(f"{n} {factory} r={ratio}: merged {res['merged']['qps_b1']:.0f} q/s (b1), "
                       f"single {res['single']['qps_b1']:.0f} q/s (b1)", file=sys.stderr)
    del merged
    if family == "Flat" and data["old"].shape[1] == data["new"].shape[1]:
        rows += _plain_pass(data, factory, search_single, order, args, progress)
    del single
    gc.collect()
    return rows


def _plain_pass(data: dict, factory: str, search_single: Callable, order: np.ndarray, args,
                progress: bool) -> list[dict]:
    """The merged index without psi and rho against the single index, interleaved, at every ratio."""
    n, rows, done = len(data["old"]), [], 0
    plain = _build_merged(data, factory, {}, None, None, args, progress)
    for ratio in args.ratios:
        m = orders.backfilled_count(ratio, n)
        for s in range(done, m, args.chunk):
            batch = order[s:min(s + args.chunk, m)]
            plain.backfill(batch, data["new"][batch])
        done = m
        res = _measure({"merged_plain": plain.search, "single": search_single}, data["q_new"], args)
        rows.append({"size": n, "family": "Flat", "factory": factory, "params": {}, "ratio": float(ratio),
                     "kind": "merged_plain", **res["merged_plain"],
                     "single_p50_ms": res["single"]["p50_ms"], "single_p50_b256_ms": res["single"]["p50_b256_ms"]})
    return rows


def _worker(args: argparse.Namespace) -> dict:
    """One gallery size: data, psi, every family; returns the rows and the peak RSS."""
    n, progress = args.size, not args.no_progress
    torch.manual_seed(args.seed)
    n_q = max(args.max_queries, args.max_batches * args.batch_size, args.recall_queries)
    t0, extra = time.perf_counter(), {}
    if args.data == "models":
        inp = G.model_inputs(C.load_profile(args.profile), args.setting, args.method, n, n_q, args.val_queries,
                             threads=args.threads, progress=progress, fidelity=n == min(args.sizes))
        data = {k: inp[k] for k in ("old", "new", "q_new", "q_val")}
        psi, rho = inp["query_transform"], inp["new_transform"]
        extra = {"inputs_s": time.perf_counter() - t0, "fidelity": inp["fidelity"]}
        del inp
    else:
        n_v = args.val_queries
        raw = make_data(n + n_q + n_v + args.psi_train, args.dim, args.classes, args.seed)
        data = {"old": raw["old"][:n], "new": raw["new"][:n], "q_new": raw["new"][n:n + n_q],
                "q_val": raw["new"][n + n_q:n + n_q + n_v]}
        tr = slice(n + n_q + n_v, None)
        recipe = RevPsiRecipe(epochs=args.psi_epochs, seed=args.seed)
        psi, _, hist = fit_reverse(recipe, raw["new"][tr], raw["old"][tr], disable=not progress)
        extra = {"psi_train_s": time.perf_counter() - t0, "psi_final_loss": float(hist["loss"].iloc[-1])}
        rho = K.LearnableEmbedding(args.dim).eval()
        del raw
    gc.collect()
    truth: dict = {}
    rows = []
    for family in args.factories:
        rows += _run_family(family, data, psi, rho, truth, args, progress)
    return {"size": n, "rows": rows, "peak_rss_mb": status_mb("VmHWM"), **extra, "load_after": os.getloadavg()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backfill_utils.tools.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="gallery sizes")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="backfill ratios (ascending)")
    p.add_argument("--factories", nargs="+", default=["Flat", "IVF", "HNSW"], help="Flat first (the exact truth)")
    p.add_argument("--data", choices=["models", "generated"], default="models",
                   help="trained networks' embeddings of rendered images, or generated ones")
    p.add_argument("--profile", default="default", help="--data models: the profile of the trained models")
    p.add_argument("--setting", default="extended", help="--data models: the setting of the old and new models")
    p.add_argument("--method", default="Ours", help="--data models: the method whose psi and rho are served")
    p.add_argument("--dim", type=int, default=128, help="--data generated: dimension")
    p.add_argument("--classes", type=int, default=100, help="--data generated: classes")
    p.add_argument("--target", type=float, default=0.97,
                   help="IVF: validation recall@10 each side's nprobe is tuned for (above 0.95: test queries vary)")
    p.add_argument("--val-queries", type=int, default=2000, help="validation queries of the tuning")
    p.add_argument("--recall-queries", type=int, default=2000, help="test queries of every recall")
    p.add_argument("--threads", type=int, default=2, help="faiss (OpenMP) threads")
    p.add_argument("--threads-b1", type=int, default=1, help="faiss threads of the batch-1 timings")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads (psi, rho, psi's training)")
    p.add_argument("--nprobe", type=int, default=8, help="IVF nprobe before the first tuning")
    p.add_argument("--nprobe-sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128],
                   help="IVF nprobe values of the sweep and of the tuning grid")
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=32, help="HNSW efSearch in the timed runs")
    p.add_argument("--ef-sweep", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--train-size", type=int, default=100_000, help="IVF training sample per index")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--min-queries", type=int, default=30, help="batch-1 queries timed at least")
    p.add_argument("--max-queries", type=int, default=500, help="batch-1 queries timed at most")
    p.add_argument("--min-batches", type=int, default=2, help="batches timed at least")
    p.add_argument("--max-batches", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=15.0, help="time per measurement after the minimum")
    p.add_argument("--chunk", type=int, default=50_000, help="items per add_old / backfill call")
    p.add_argument("--psi-train", type=int, default=10_000, help="--data generated: training items for psi")
    p.add_argument("--psi-epochs", type=int, default=3, help="--data generated: psi's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--docs", action="store_true", help="also write the results into docs/serving.md")
    p.add_argument("--render-only", action="store_true", help="only write docs/serving.md's block from --out")
    p.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render_only and not args.out.is_file():
        p.error(f"--render-only reads {args.out}, which does not exist; run the benchmark first")
    if any(v < 1 for v in args.nprobe_sweep + args.ef_sweep):
        p.error("--nprobe-sweep and --ef-sweep take positive integers")
    if args.factories[0] != "Flat":
        p.error("--factories must start with Flat: its results are the exact truth for recall")
    if list(args.ratios) != sorted(args.ratios):
        p.error("--ratios must be ascending")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render_only:
        result = json.loads(args.out.read_text())
        blocks.write_block(DOC, "SERVE", lambda: render_markdown(result))
        print(f"wrote the SERVE block of {DOC} from {args.out}")
        return result
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.torch_threads)
    if args.worker:
        print(json.dumps(_worker(args), default=float))
        return {}
    started, load_before, t_start = time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg(), time.perf_counter()
    git = git_state()  # the code that runs, before anything can change it
    per_size, rows = [], []
    for n in args.sizes:
        print(f"gallery {n:,} items, {args.dim}-d, factories {args.factories}, ratios {args.ratios}, "
              f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}", flush=True)
        cmd = [sys.executable, "-m", "backfill_utils.tools.bench_serve", "--_worker", "--size", str(n),
               *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--_worker"]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark of size {n} failed with exit code {proc.returncode}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows += res.pop("rows")
        per_size.append(res)
    fidelity = [row for res in per_size for row in res.pop("fidelity", [])]
    table = summarize(rows)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("worker", "size", "no_progress", "docs", "render_only")},
              "environment": {**environment(args.threads, args.torch_threads), "git": git, "started": started,
                              "load_average_before": load_before, "load_average_after": os.getloadavg(),
                              "wall_seconds": time.perf_counter() - t_start},
              "per_size": per_size, "table": table.to_dict(orient="records"), "rows": rows, "fidelity": fidelity,
              "goals": goals(table, rows, max(args.sizes))}
    show = table.copy()
    show.insert(0, "N", show.pop("size").map(lambda v: f"{v:,}"))
    print()
    print(show[SPEED_COLUMNS].to_markdown(index=False, floatfmt=".3g"))
    print()
    print(show[MEMORY_COLUMNS].to_markdown(index=False, floatfmt=".3g"))
    print()
    if fidelity:
        print("IVF recall@10 by nprobe, one index, real test split vs benchmark gallery (equal items per list):")
        print(fidelity_table(fidelity).to_markdown(floatfmt=".3f"))
        print()
    for res in per_size:
        print(f"N = {res['size']:,}: peak RSS of the benchmark process {res['peak_rss_mb']:.0f} MiB "
              "(data, every index, buffers)")
    print()
    print(json.dumps(result["goals"], indent=2, default=float))
    io.atomic_write_json(args.out, result, default=float)
    print(f"\nwrote {args.out}")
    if args.docs:
        blocks.write_block(DOC, "SERVE", lambda: render_markdown(result))
        print(f"wrote the SERVE block of {DOC}")
    return result


if __name__ == "__main__":
    main()
