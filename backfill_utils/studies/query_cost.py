"""What a method costs: forward passes and time per query, extra parameters, gallery-side work.

The query side of a registered method follows from its registration
(:func:`backfill_utils.backfill.registry.query_side`): the backbones that embed the query
(two for rank merge) and the trained modules applied to the embedding (psi, rho).
Its extra parameters are those of every trained module, the gallery-side ``h`` of
FCT, FastFill and BiCT included (which costs no query time). The time per query is
measured on this machine (:func:`time_query_forward`), once, and cached (kind
``"experiments"``) so that ``notebooks/51_table2.ipynb`` only reads it.

**The gallery side.** FCT, FastFill and BiCT serve the not-yet-backfilled items as
``h(phi_old(x))``: before serving, every stored old embedding (``N`` of them, the whole
gallery) is transformed once; the paper's method transforms only queries (psi, rho)
and serves the old gallery as it is. :func:`time_gallery_transform` measures ``h`` on
random unit vectors of its input dimension in batches, in seconds per million items
with the process's torch threads (``threads`` column).
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from .. import cache, io
from .. import embed as E
from .. import train as TR
from ..backfill import experiments as X
from ..backfill import registry as MM

__all__ = ["time_query_forward", "time_gallery_transform", "query_cost", "measure_query_cost"]


@torch.no_grad()
def time_query_forward(passes, images, *, repeats: int = 5, warmup: int = 1) -> float:
    """Seconds per query of a query-side forward, the median over ``repeats``.

    ``passes``: a list of ``(backbone, modules)``; each backbone embeds the
    batch ``images`` (``backbone.embed`` if it has one, else ``backbone(x)``)
    and each module is applied to that embedding. The time of one repeat is
    divided by the batch size. Wall-clock time on this machine: it depends on
    the hardware, the threads and the load, so compare methods only within one
    run.
    """
    if len(images) == 0:
        raise ValueError("images is an empty batch")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    nets = [b for b, _ in passes] + [m for _, ms in passes for m in ms]
    modes = [n.training for n in nets]
    for n_ in nets:
        n_.eval()

    def run():
        for backbone, modules in passes:
            z = backbone.embed(images) if hasattr(backbone, "embed") else backbone(images)
            for m in modules:
                m(z)

    try:
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    finally:
        for n_, mode in zip(nets, modes):
            n_.train(mode)
    return float(np.median(times)) / len(images)


#: Items per timed pass of :func:`time_gallery_transform` (one batch of 4,096): FCT's and
#: FastFill's h (5.7 million parameters) take about 2 s per pass on one core, and the
#: per-million figure equals that of 16,384 items within 1% (109 s per million either way).
GALLERY_ITEMS = 4_096


@torch.no_grad()
def time_gallery_transform(module: torch.nn.Module, d_in: int, *, items: int = GALLERY_ITEMS,
                           batch_size: int = GALLERY_ITEMS, repeats: int = 3, seed: int = 0) -> float:
    """Seconds per million items of a gallery-side transformation ``module`` (eval mode),
    the median over ``repeats`` passes over ``items`` random unit vectors of dimension
    ``d_in`` in batches of ``batch_size`` (after one warm-up batch). Wall-clock time of
    this machine with ``torch.get_num_threads()`` threads."""
    if items < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(f"items, batch_size and repeats must be >= 1, got {items}, {batch_size}, {repeats}")
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(items, d_in, generator=g), dim=1)
    was = module.training
    module.eval()
    try:
        module(x[:batch_size])
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, items, batch_size):
                module(x[i:i + batch_size])
            times.append(time.perf_counter() - t0)
    finally:
        module.train(was)
    return float(np.median(times)) * 1e6 / items


def query_cost(cfg: dict, setting: str, names=None, *, batch_size: int = 64, repeats: int = 5,
               warmup: int = 2) -> pd.DataFrame:
    """:func:`measure_query_cost` of ``names`` (default: the ``main`` group), measured
    once and cached: a render notebook reads the times the compute notebook measured."""
    names = list(names or MM.names("main"))
    key = {"study": "query_cost", "setting": setting, "methods": names, "batch_size": int(batch_size),
           "repeats": int(repeats), "warmup": int(warmup), "seed": int(cfg["seed"]), "gallery_items": GALLERY_ITEMS,
           "models": {r: TR.model_spec(cfg, setting, r) for r in MM.BACKBONES},
           "compat": {n: X.compat_key(cfg, setting, n) for n in names if MM.get(n).trainable}}
    arrays = cache.cached_arrays(
        "experiments", key, lambda: io.frame_to_arrays(measure_query_cost(
            cfg, setting, names, batch_size=batch_size, repeats=repeats, warmup=warmup)),
        what=f"the measured query cost of the {setting} setting")
    return io.arrays_to_frame(arrays)


def measure_query_cost(cfg: dict, setting: str, names=None, *, batch_size: int = 64, repeats: int = 5,
                       warmup: int = 2) -> pd.DataFrame:
    """The cost columns of Table 2, per method: forward passes per query, the query
    side, extra parameters, and the measured time per query.

    Backbones are the cached trained models; modules the method's trained modules
    (:func:`experiments.train_method`). Each component of a query side is timed once
    with :func:`time_query_forward` -- a backbone on a batch of ``batch_size`` test
    images, a module on the query backbone's embeddings of that batch -- after every
    component was warmed up, and a method's time is the sum of its components. CPU
    wall-clock time: machine- and load-dependent. Columns: ``method, query_passes,
    query_side`` (backbone passes separated by ``;``, each with the modules applied to
    its output), ``extra_params, ms_per_query``, and the gallery side: ``gallery_side``,
    ``gallery_transforms`` (items transformed before serving: the ``N`` old items of the
    setting's gallery for a method with ``h``, else 0), ``s_per_million_items``
    (:func:`time_gallery_transform`) and ``threads``.
    """
    names = list(names or MM.names("main"))
    sides = {n: MM.query_side(n) for n in names}
    trained = {n: X.train_method(cfg, setting, n, progress=False) for n in names if MM.get(n).trainable}
    roles = sorted({r for side in sides.values() for r, _ in side})
    nets = {r: TR.load_model(TR.model_spec(cfg, setting, r)) for r in roles}
    ds = E._split_dataset(cfg, "test", TR.setting_classes(cfg, setting)["test_classes"], augment=False)
    images = torch.stack([ds[i][0] for i in range(min(int(batch_size), len(ds)))])
    with torch.no_grad():
        z = {r: nets[r].eval().embed(images) for r in roles}
    components = {r: ([(nets[r], [])], images) for r in roles}
    for n, side in sides.items():
        for role, slots in side:
            for slot in slots:
                components[(n, slot)] = ([(torch.nn.Identity(), [getattr(trained[n], slot)])], z[role])
    # warm every component up first (the first forwards of a process are far slower), then time
    for passes, batch in components.values():
        time_query_forward(passes, batch, repeats=max(1, warmup), warmup=0)
    timed = {c: time_query_forward(passes, batch, repeats=repeats, warmup=warmup)
             for c, (passes, batch) in components.items()}
    n_gallery = len(X.SettingData(cfg, setting, progress=False).test_labels)
    rows = []
    for n, side in sides.items():
        parts = [r for r, _ in side] + [(n, s) for _, slots in side for s in slots]
        label = " ; ".join(" + ".join([f"phi_{r}", *slots]) for r, slots in side)
        h = trained[n].h if n in trained else None
        rows.append({"method": n, "query_passes": len(side), "query_side": label,
                     "extra_params": trained[n].n_params if n in trained else 0,
                     "ms_per_query": 1e3 * sum(timed[p] for p in parts),
                     "gallery_side": "h(phi_old) of every old item" if h is not None else "none",
                     "gallery_transforms": n_gallery if h is not None else 0,
                     "s_per_million_items": (time_gallery_transform(h, int(cfg["embedding_dim"]))
                                             if h is not None else 0.0),
                     "threads": torch.get_num_threads()})
    return pd.DataFrame(rows)
