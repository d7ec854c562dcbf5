"""Benchmark galleries with the structure of trained networks' embeddings.

The serving benchmark needs galleries of 100,000 and 1,000,000 items; the default
profile's test split has 5,000. :func:`gallery_embeddings` renders new images of the
test classes (:func:`~backfill_utils.data.synthetic.make_synthetic_draw`, one stream per
chunk of ``per_class`` images of every test class, so a larger gallery extends a smaller
one) and embeds them with a setting's trained old and new models. Each chunk is cached
(artifact kind ``"embeddings"``, keyed by both models' specs, the dataset options, the
stream and the chunk size, plus the code versions), so the cost is paid once: about
1 ms per image on 2 cores (0.25 ms rendering, 0.7 ms for the two ResNet-18s), about
2 minutes for 100,000 items and 16 for 1,000,000. Queries come from streams of their
own (:data:`QUERY_DRAWS`), never shared with a gallery chunk.

:func:`ivf_curves` compares such embeddings with the real test split's under one IVF
index (recall@k against exact search, by ``nprobe``, at equal items per list).

Only the synthetic dataset can render more images; for another dataset the benchmark's
generated embeddings (:func:`backfill_utils.tools.bench.make_data`) remain.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import faiss
import numpy as np
import torch
from tqdm import tqdm

from .. import config as C
from .. import embed as E
from .. import train as TR
from ..cache import cached_arrays
from ..data import api as D

#: Stream of each query set (gallery chunks use streams 0, 1, 2, ...).
QUERY_DRAWS = {"test": 10_000, "val": 10_001}
MAX_DRAW = 9_999  # the last gallery stream: 10,000 chunks


def _check(cfg: dict, per_class: int) -> None:
    if cfg["dataset"] != "synthetic":
        raise ValueError(
            f"benchmark galleries of trained models' embeddings are rendered images of the synthetic dataset; "
            f"the profile's dataset is {cfg['dataset']!r}. Use the default profile, or the generated "
            "embeddings (--data generated)")
    _count(per_class, "per_class")


def _count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    return int(n)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Inside: torch on ``threads`` threads (``None``: unchanged); the earlier number after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunk_embeddings(cfg: dict, setting: str, draw: int, *, per_class: int = 100,
                     progress: bool = True) -> dict[str, np.ndarray]:
    """``old``, ``new`` (float32 ``(m, d)``) and ``labels`` of one chunk: ``per_class``
    new images of each test class of ``setting`` from stream ``draw``, embedded by the
    setting's old and new models (normalised as the profile says), cached."""
    _check(cfg, per_class)
    opts = dict(cfg.get("dataset_options") or {})
    classes = [int(c) for c in TR.setting_classes(cfg, setting)["test_classes"]]
    key = {"models": {r: E.embedding_spec(cfg, setting, r) for r in ("old", "new")}, "dataset": "synthetic",
           "options": opts, "draw": int(draw), "per_class": int(per_class), "classes": classes,
           "generator": D.SYNTHETIC_VERSION}

    def compute() -> dict[str, np.ndarray]:
        # the training normalisation (mean/std of the profile's own dataset), never the new images'
        info = D.dataset_info("synthetic", **opts)
        tf = D.test_transform("synthetic", info["image_size"], mean=info["mean"], std=info["std"])
        args = D.split_options("test", opts)
        args["per_class"] = int(per_class)
        images, targets = D.make_synthetic_draw(int(draw), "test", **args)
        ds = D.subset_by_classes(D.SyntheticDataset(images, targets, tf), classes, require_prefix=False)
        out = {}
        for role in ("old", "new"):
            model = TR.train(TR.model_spec(cfg, setting, role), data_root=cfg.get("data_root"), progress=progress,
                             download=bool(cfg.get("download")))
            out[role] = E.extract(model, ds, device="cpu", progress=False, normalize=C.normalize_embeddings(cfg))
        out["labels"] = np.asarray(ds.targets, dtype=np.int64)
        return out

    return cached_arrays("embeddings", key, compute,
                         what=f"benchmark chunk {draw} of the {setting} setting's old and new embeddings")


def _stack(chunks: list[dict], n: int) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.concatenate([c[k] for c in chunks])[:n]) for k in ("old", "new", "labels")}


def gallery_embeddings(cfg: dict, setting: str, n: int, *, per_class: int = 100, progress: bool = True,
                       threads: int | None = None) -> dict[str, np.ndarray]:
    """The first ``n`` items of the benchmark gallery: chunks 0, 1, ... of
    :func:`chunk_embeddings` (``n`` rounded up to whole chunks, then cut);
    ``threads``: torch threads while embedding (default: unchanged)."""
    _check(cfg, per_class)
    n = _count(n, "n")
    per_chunk = len(TR.setting_classes(cfg, setting)["test_classes"]) * per_class
    n_chunks = -(-n // per_chunk)
    if n_chunks - 1 > MAX_DRAW:
        raise ValueError(f"n={n} needs {n_chunks} chunks of {per_chunk}; at most {MAX_DRAW + 1} (raise per_class)")
    with _torch_threads(threads):
        chunks = [chunk_embeddings(cfg, setting, d, per_class=per_class, progress=False)
                  for d in tqdm(range(n_chunks), desc=f"gallery embeddings ({n_chunks} x {per_chunk})",
                                disable=not progress)]
    return _stack(chunks, n)


def query_embeddings(cfg: dict, setting: str, which: str, n: int, *, progress: bool = True,
                     threads: int | None = None) -> dict[str, np.ndarray]:
    """``n`` query items (``which``: ``"test"`` or ``"val"``, disjoint streams), as
    :func:`gallery_embeddings`' items; at most one chunk per class of 10,000 images."""
    if which not in QUERY_DRAWS:
        raise ValueError(f"which must be one of {sorted(QUERY_DRAWS)}, got {which!r}")
    n = _count(n, "n")
    n_classes = len(TR.setting_classes(cfg, setting)["test_classes"])
    per_class = -(-n // n_classes)
    if per_class > 10_000:
        raise ValueError(f"at most {10_000 * n_classes} {which} queries, got n={n}")
    with _torch_threads(threads):
        chunk = chunk_embeddings(cfg, setting, QUERY_DRAWS[which], per_class=per_class, progress=progress)
    return _stack([chunk], n)


def ivf_recall(gallery: np.ndarray, queries: np.ndarray, nlist: int, nprobes, *, k: int = 10,
               seeds=(0, 1, 2)) -> dict[int, float]:
    """Recall@k of one ``IVF<nlist>,Flat`` index against exact search (``IndexFlatL2``)
    at each ``nprobe``, the mean over k-means seeds: the fraction of each query's exact
    top-k found, averaged over the queries."""
    gallery, queries = (np.ascontiguousarray(a, dtype=np.float32) for a in (gallery, queries))
    d = gallery.shape[1]
    flat = faiss.IndexFlatL2(d)
    flat.add(gallery)
    truth = flat.search(queries, k)[1]
    out = {int(p): 0.0 for p in nprobes}
    for seed in seeds:
        quantizer = faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, int(nlist))
        index.cp.seed = int(seed)
        index.train(gallery)
        index.add(gallery)
        for p in out:
            index.nprobe = int(p)
            found = index.search(queries, k)[1]
            hit = (truth[:, :, None] == found[:, None, :]).any(axis=2)
            out[p] += float(hit.mean()) / len(seeds)
    return out


def ivf_curves(real: dict, bench: dict, psi, *, items_per_list: int = 125, n_queries: int = 500,
               nprobes=(1, 2, 4, 8, 16), seed: int = 0) -> list[dict]:
    """Recall@10 by ``nprobe`` of one IVF index over the real embeddings and over the
    benchmark's, at equal items per list: for each, ``n_queries`` items held out as
    queries and the rest (at most as many as the real set's) as the gallery;
    ``old->old``, ``new->new`` and ``psi(new)->old`` (``psi``: a callable on float32 arrays).

    ``real`` and ``bench``: dicts with ``old`` and ``new`` of the same items."""
    n_real = len(real["old"])
    if n_real <= n_queries:
        raise ValueError(f"the real set has {n_real} items; it needs more than n_queries={n_queries}")
    rows = []
    for source, emb in (("real", real), ("benchmark", bench)):
        perm = np.random.default_rng(seed).permutation(len(emb["old"]))[:n_real]
        q, g = perm[:n_queries], perm[n_queries:]
        nlist = max(1, round(len(g) / items_per_list))
        pairs = {"old->old": (emb["old"][q], emb["old"][g]), "new->new": (emb["new"][q], emb["new"][g]),
                 "psi(new)->old": (psi(np.ascontiguousarray(emb["new"][q])), emb["old"][g])}
        for pair, (xq, xg) in pairs.items():
            curve = ivf_recall(xg, xq, nlist, nprobes)
            rows += [{"source": source, "pair": pair, "gallery": len(g), "nlist": nlist, "nprobe": p,
                      "recall_at_10": r} for p, r in curve.items()]
    return rows


def model_inputs(cfg: dict, setting: str, method: str, n: int, n_queries: int, n_val: int, *,
                 threads: int | None = None, progress: bool = True, fidelity: bool = False) -> dict:
    """What the serving benchmark serves: the gallery (``old``, ``new``: :func:`gallery_embeddings`),
    test and validation queries (``q_new``, ``q_val``: their new embeddings) and the trained
    method's ``query_transform`` (psi) and ``new_transform`` (rho), loaded from the cache or
    trained; with ``fidelity``, :func:`ivf_curves` of the real test split against the gallery
    (``"fidelity"``), else ``[]``. Methods that search with two passes or transform the gallery
    are refused."""
    from ..backfill import experiments as X
    from ..backfill import registry as MM
    from ..serve.from_method import index_arguments
    from ..serve.transform import Transform

    m = MM.get(method)
    kwargs = index_arguments(m, X.train_method(cfg, setting, method, progress=progress) if m.trainable
                             else MM.Trained())
    if kwargs["two_pass"] or kwargs["gallery_transform"] is not None:
        raise ValueError(f"the serving benchmark serves methods with psi and rho only; {method!r} "
                         "searches with two passes or transforms the gallery")
    g = gallery_embeddings(cfg, setting, n, progress=progress, threads=threads)
    q = query_embeddings(cfg, setting, "test", n_queries, progress=progress, threads=threads)
    v = query_embeddings(cfg, setting, "val", n_val, progress=progress, threads=threads)
    out = {"old": g["old"], "new": g["new"], "q_new": q["new"], "q_val": v["new"],
           "query_transform": kwargs["query_transform"], "new_transform": kwargs["new_transform"], "fidelity": []}
    if fidelity:
        real = X.SettingData(cfg, setting, progress=progress)
        psi = Transform(kwargs["query_transform"], "psi", g["new"].shape[1])
        out["fidelity"] = ivf_curves({"old": real.test("old"), "new": real.test("new")}, g, psi)
    return out
