"""A short check of the GPU path: training throughput and the engine on CUDA vs CPU.

    python -m backfill_utils.tools.gpu_check [--epochs 3] [--n-train 50000] [--out PATH]

For a machine with an NVIDIA GPU (a few minutes there); with tiny sizes it also
runs on the CPU (``--epochs 1 --n-train 512 --width 8 --workers 0``), where the
"device" side is the engine's torch path, the code that runs on a GPU.

1. **Training.** The ``paper`` profile's backbone recipe (ResNet-18 with the
   CIFAR stem, width 64, batch 256, SGD + cosine, label smoothing; mixed
   precision on CUDA; DataLoader workers with pinned memory) on the synthetic
   dataset at CIFAR size (32 x 32, 100 classes, ``n_train`` images), through
   :func:`backfill_utils.train.train` with a temporary artifact cache. Reports
   images/s per epoch and the mean over the epochs after the first (warm-up:
   worker start, cuDNN autotuning).
2. **The engine on both devices.** The trained model embeds the training images
   (the gallery, leave-one-out) and an untrained network of the same recipe
   stands for the old model; the 11-point rank-merge curve is computed on the
   CPU (the numba kernels) and on the device (torch path).

   * *Exact check*: the embeddings rounded to integers (``round(127 x)``, the
     L2-normalised ``x`` has ``|x_k| <= 1``). Every product, sum of squares and
     distance is then an integer below ``2**24``, exact in float32 whatever the
     order of the additions, so both devices see the same distances and must
     give the same ranks, top-k and flips; AP may differ only by the order of
     its float64 sum (at most ``P * 2**-53`` relative): tolerance ``1e-9``.
   * *As is*: the float32 embeddings. cuBLAS and the CPU's BLAS round the
     distance products differently, so metrics may differ where two distances
     are within a few units in the last place; the largest difference is
     reported, not checked.

Prints a JSON summary (card, torch / CUDA versions, images/s, engine seconds
on each device, largest differences) and writes it to ``--out`` (temporary
file, then ``os.replace``). Exit status 1 if the exact check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as C
from .. import io
from .. import train as TR
from ..backfill import curves as BC, systems as BS
from ..data import api as D
from ..embed import extract
from ..models import EmbeddingNet
from ..retrieval import engine

EXACT_AP_TOL = 1e-9  # fraction; AP sums in another order on the other device
CURVE_KEYS = ("mAP", "top1", "top5", "negative_flips")


def environment(device: torch.device) -> dict:
    """Card, versions and CPU count."""
    env = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, card_memory_gib=round(props.total_memory / 2**30, 1),
                   card_count=torch.cuda.device_count())
    else:
        env["card"] = None
    return env


def profile(args: argparse.Namespace) -> dict:
    """The paper profile on the synthetic dataset at CIFAR size, shrunk by the flags."""
    per_class = max(1, args.n_train // args.classes)
    return C.load_profile(
        "paper", dataset="synthetic", data_root=None, val_fraction=0.0,  # train on all n_train images
        dataset_options={"num_classes": args.classes, "train_per_class": per_class,
                         "test_per_class": 1, "image_size": 32},
        backbone={"width": args.width},
        train={k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("num_workers", args.workers)) if v is not None},
    )


def train_throughput(cfg: dict, device: torch.device, progress: bool) -> tuple[EmbeddingNet, dict]:
    """Train the profile's backbone; images/s per epoch from the loop's own timings."""
    spec = TR.model_spec(cfg, "extended", "new")
    rows: list[dict] = []
    t0 = time.perf_counter()
    model = TR.train(spec, device=device, progress=progress, callback=lambda e, row: rows.append(dict(row)))
    wall = time.perf_counter() - t0
    n_images = len(TR.build_train_dataset(spec))
    batch = spec["recipe"]["batch_size"]
    per_epoch = (n_images // batch) * batch  # drop_last
    ips = [per_epoch / r["seconds"] for r in rows]
    steady = ips[1:] if len(ips) > 1 else ips
    return model, {"images": n_images, "images_per_epoch": per_epoch, "epochs": len(rows),
                   "batch_size": batch, "workers": spec["recipe"].get("num_workers", 0),
                   "mixed_precision": device.type == "cuda", "pinned_memory": device.type == "cuda",
                   "images_per_s_per_epoch": ips, "images_per_s": float(np.mean(steady)),
                   "train_wall_seconds": wall, "final_train_acc": rows[-1]["train_acc"] if rows else None}


def gallery_embeddings(cfg: dict, model: EmbeddingNet, device: torch.device, progress: bool):
    """(old, new, labels): an untrained network and the trained one on the clean training images."""
    name, opts = cfg["dataset"], cfg["dataset_options"]
    info = D.dataset_info(name, **opts)
    tf = D.test_transform(name, info["image_size"], mean=info["mean"], std=info["std"])
    ds = D.get_dataset(name, "train", transform=tf, **opts)
    torch.manual_seed(int(cfg["seed"]) + 12345)
    untrained = EmbeddingNet(**dict(model.config))
    new = extract(model, ds, device=device, progress=progress, desc="embed (trained)")
    old = extract(untrained, ds, device=device, progress=progress, desc="embed (untrained)")
    return old, new, np.asarray(ds.targets, dtype=np.int64)


def _curve(system, labels, device: torch.device, cpu_method: str):
    before = engine.CPU_METHOD
    engine.CPU_METHOD = cpu_method
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        curve, pq = BC.backfill_curve(system, labels, labels, exclude_self=True, device=device,
                                      return_per_query=True, on_no_relevant="skip")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return curve, pq, time.perf_counter() - t0
    finally:
        engine.CPU_METHOD = before


def compare_devices(old: np.ndarray, new: np.ndarray, labels: np.ndarray, device: torch.device) -> dict:
    """The curve on the CPU (numba) and on ``device`` (torch path), exact and as-is embeddings."""
    cpu = torch.device("cpu")
    other_method = "torch"  # on a GPU the torch path runs anyway; on the CPU it is forced
    out: dict[str, Any] = {"gallery": int(len(labels)), "classes": int(len(np.unique(labels)))}
    tiny = BS.BackfillSystem.merge("warm-up", old[:64], old[:64], new[:64], new[:64])
    _curve(tiny, labels[:64], device, other_method)  # CUDA context, cuBLAS handles
    _curve(tiny, labels[:64], cpu, "auto")  # numba compile or cache load
    for kind, (o, n) in (("exact", (np.round(old * 127), np.round(new * 127))), ("as_is", (old, new))):
        system = BS.BackfillSystem.merge("rank merge", o.astype(np.float32), o.astype(np.float32),
                                         n.astype(np.float32), n.astype(np.float32), query_passes=2)
        c_cpu, pq_cpu, s_cpu = _curve(system, labels, cpu, "auto")
        c_dev, pq_dev, s_dev = _curve(system, labels, device, other_method)
        res = {"cpu_seconds": s_cpu, "device_seconds": s_dev,
               "max_abs_diff_curve_pct_points": float(max(
                   np.max(np.abs(c_cpu[k].to_numpy() - c_dev[k].to_numpy())) for k in CURVE_KEYS)),
               "max_abs_diff_ap": float(np.nanmax(np.abs(pq_cpu["ap"] - pq_dev["ap"]))),
               "ranks_identical": bool(np.array_equal(pq_cpu["first_rank"], pq_dev["first_rank"])),
               "curve_cpu": c_cpu.to_dict(orient="list")}
        if kind == "exact":
            res["identical"] = res["ranks_identical"] and res["max_abs_diff_ap"] <= EXACT_AP_TOL
        out[kind] = res
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m backfill_utils.tools.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=50000, help="training images (CIFAR-100: 50,000)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--width", type=int, default=64, help="ResNet width (paper: 64)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the paper profile's (256)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the profile's, 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "n_train", "classes", "width"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    progress = not args.no_progress
    cfg = profile(args)  # (sets the torch threads from $BACKFILL_THREADS, as every entry point)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary: dict[str, Any] = {"environment": environment(device),
                               "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    old_cache = os.environ.get(C.CACHE_ENV)
    with tempfile.TemporaryDirectory(prefix="gpu_check_cache_") as tmp:
        os.environ[C.CACHE_ENV] = tmp  # never touch the project's cache of trained models
        try:
            model, summary["train"] = train_throughput(cfg, device, progress)
            old, new, labels = gallery_embeddings(cfg, model, device, progress)
        finally:
            if old_cache is None:
                os.environ.pop(C.CACHE_ENV, None)
            else:
                os.environ[C.CACHE_ENV] = old_cache
    summary["engine"] = compare_devices(old, new, labels, device)
    summary["ok"] = bool(summary["engine"]["exact"]["identical"])
    brief = json.loads(json.dumps(summary, default=str))
    for kind in ("exact", "as_is"):
        brief["engine"][kind].pop("curve_cpu")
    print(json.dumps(brief, indent=2))
    if args.out is not None:
        io.atomic_write_json(args.out, summary)
    return summary


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
