"""Benchmark of the backfill-curve engine against the straightforward method.

    python -m backfill_utils.bench [--n 10000] [--dim 128] [--large 50000]
                                   [--skip-baseline] [--out PATH] [--no-progress]

1. An 11-point distance-rank-merge curve (mAP, top-1, top-5, leave-one-out)
   over ``n`` x ``n`` class-structured random embeddings, with the engine
   (:func:`backfill_utils.backfill.backfill_curve`) and with the straightforward
   method (per ratio: full ``n x n`` distance matrix, ``argsort`` of every row,
   ``sklearn.metrics.average_precision_score`` per query, as apple/ml-fct
   evaluates), measured side by side; the two curves are compared.
2. The same curve over ``large`` x ``large`` items in a child process, which
   reports its wall time and its own peak resident memory (``ru_maxrss``).

The table is printed and a JSON file is written (default
``results/bench/bench.json`` in the repository, via a temporary file and
``os.replace``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import backfill as bf
from . import metrics as mt

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "bench" / "bench.json"


def make_data(n: int, dim: int = 128, n_classes: int = 100, seed: int = 0,
              sigma_old: float = 2.5, sigma_new: float = 2.0) -> dict[str, np.ndarray]:
    """Class-structured random embeddings of an 'old' and a 'new' model.

    Labels are uniform over ``n_classes``; each model places class ``c`` at its
    own random centre (the two spaces are unrelated, as for two independently
    trained models) and adds isotropic gaussian noise (the new model less);
    embeddings are L2-normalised float32.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)

    def embed(sigma: float) -> torch.Tensor:
        centres = torch.randn(n_classes, dim, generator=g)
        x = centres[labels] + sigma * torch.randn(n, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    old = embed(sigma_old)
    new = embed(sigma_new)
    return {"labels": labels.numpy(), "old": old.numpy(), "new": new.numpy()}


def straightforward_curve(system: bf.BackfillSystem, labels: np.ndarray, ratios: np.ndarray,
                          order: np.ndarray, ks=(1, 5), progress: bool = True) -> dict[str, list]:
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
        m = bf.backfilled_count(r, n)
        is_new = np.zeros(n, dtype=bool)
        is_new[order[:m]] = True
        d_old = mt.pairwise_distances(system.query_old, system.gallery_old).numpy()
        d_new = mt.pairwise_distances(system.query_new, system.gallery_new).numpy()
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


def _engine_run(data: dict, progress: bool, memory_budget: int) -> tuple[float, Any, int]:
    labels = data["labels"]
    system = bf.BackfillSystem.merge("rank merge", data["old"], data["old"], data["new"], data["new"],
                                     query_passes=2)
    n = len(labels)
    chunk = mt.auto_chunk_size(n, n, int(np.bincount(labels).max()), 11, memory_budget)
    t0 = time.perf_counter()
    curve = bf.backfill_curve(system, labels, labels, exclude_self=True, seed=0,
                              memory_budget=memory_budget, progress=progress)
    return time.perf_counter() - t0, curve, chunk


def _large_worker(args: argparse.Namespace) -> None:
    """Child process: the large curve; prints one JSON line with time and peak RSS."""
    data = make_data(args.n, args.dim, args.classes, args.seed)
    rss_data = _peak_rss_mb()
    seconds, curve, chunk = _engine_run(data, args.progress, args.memory_budget)
    print(json.dumps({
        "n": args.n, "seconds": seconds, "chunk_size": chunk,
        "peak_rss_mb": _peak_rss_mb(), "rss_after_data_mb": rss_data,
        "curve": curve.to_dict(orient="list"),
    }))


def _run_large(n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "backfill_utils.bench", "--_large-worker", "--n", str(n),
           "--dim", str(args.dim), "--classes", str(args.classes), "--seed", str(args.seed),
           "--memory-budget", str(args.memory_budget)]
    if args.no_progress:
        cmd.append("--no-progress")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"large benchmark process failed with exit code {proc.returncode}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_seconds"] = wall
    return res


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a result file is for readers
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt_table(rows: list[tuple[str, str]]) -> str:
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backfill_utils.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="queries = gallery items of the side-by-side run")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension")
    p.add_argument("--classes", type=int, default=100, help="number of classes of the random data")
    p.add_argument("--large", type=int, default=50000, help="size of the large run (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-budget", type=int, default=mt.DEFAULT_MEMORY_BUDGET,
                   help="bytes per engine chunk (sets the chunk size)")
    p.add_argument("--skip-baseline", action="store_true", help="do not run the straightforward method")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--_large-worker", dest="large_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.progress = not args.no_progress
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.large_worker:
        _large_worker(args)
        return {}
    env = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(f"data: {args.n} x {args.n}, dim {args.dim}, {args.classes} classes, "
          f"11 ratios, leave-one-out; torch threads {env['torch_threads']}", flush=True)
    data = make_data(args.n, args.dim, args.classes, args.seed)
    eng_s, curve, chunk = _engine_run(data, args.progress, args.memory_budget)
    result: dict[str, Any] = {
        "config": {"n": args.n, "dim": args.dim, "classes": args.classes, "seed": args.seed,
                   "ratios": bf.DEFAULT_RATIOS.tolist(), "exclude_self": True,
                   "system": "rank merge (old/old + new/new)", "memory_budget": args.memory_budget},
        "environment": env,
        "engine": {"seconds": eng_s, "chunk_size": chunk, "curve": curve.to_dict(orient="list")},
    }
    rows = [("engine, 11-point curve", f"{eng_s:8.1f} s  (chunk {chunk} queries)")]
    if not args.skip_baseline:
        system = bf.BackfillSystem.merge("rank merge", data["old"], data["old"], data["new"], data["new"])
        t0 = time.perf_counter()
        base = straightforward_curve(system, data["labels"], bf.DEFAULT_RATIOS,
                                     bf.random_order(args.n, 0), progress=args.progress)
        base_s = time.perf_counter() - t0
        diff = max(float(np.max(np.abs(np.asarray(base[c]) - curve[c].to_numpy())))
                   for c in ("mAP", "top1", "top5"))
        result["baseline"] = {"seconds": base_s, "curve": base, "max_abs_diff_vs_engine": diff,
                              "speedup": base_s / eng_s}
        rows += [("straightforward (argsort + sklearn)", f"{base_s:8.1f} s"),
                 ("speed-up", f"{base_s / eng_s:8.1f} x"),
                 ("max |engine - straightforward| (pct points)", f"{diff:.2e}")]
    if args.large:
        print(f"large run: {args.large} x {args.large} in a child process ...", flush=True)
        large = _run_large(args.large, args)
        result["large"] = large
        rows += [(f"engine, {args.large} x {args.large}, 11-point curve",
                  f"{large['seconds']:8.1f} s  (chunk {large['chunk_size']} queries)"),
                 ("  peak RSS of that process", f"{large['peak_rss_mb']:8.0f} MB "
                  f"(after data: {large['rss_after_data_mb']:.0f} MB)")]
    print()
    print(curve.round(3).to_string(index=False))
    print()
    print(_fmt_table(rows))
    _write_json(result, args.out)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
