"""Helpers of the figures: the ranked lists behind a curve point, test images, and the
pair distances of the two systems of a merge.

**One top-k path for figures.** :func:`retrieve_topk` ranks the *mixed distance row*
of :mod:`backfill_utils.backfill.systems` exactly as the evaluation engine does: squared
Euclidean distances from :func:`backfill_utils.retrieval.distances.squared_euclidean` (the
engine's arithmetic), which items are backfilled from
:meth:`BackfillSystem.backfilled <backfill_utils.backfill.systems.BackfillSystem.backfilled>`,
ties broken by gallery index. So a figure's top-1 is the result whose correctness
the backfilling curve counts (the notebooks assert it). It is dense (every distance
of the chosen queries) and meant for a few queries; a service searching a large
mixed gallery uses faiss (:mod:`backfill_utils.serve.index`), whose float arithmetic may
differ in the last bits and which does not promise this tie rule.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import embed as E
from .. import train as TR
from ..backfill import orders, systems as BS
from ..retrieval import distances as DS
from ..retrieval import metrics as MT

__all__ = ["retrieve_topk", "retrieve_topk_over_ratios", "changing_queries", "mixed_source_query",
           "gallery_images", "pair_distances", "system_pair_distances", "calibration_summary"]


def retrieve_topk(system: BS.BackfillSystem, ratio: float, k: int, *, queries=None,
                  exclude_self: bool = False, part: str = "merged", seed: int = 0,
                  chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items of ``queries`` at backfill ratio ``ratio``: ``(D, I)``.

    ``part="merged"`` (default) ranks the *mixed distance row* of the engine
    (:mod:`backfill_utils.backfill.systems`): ``d(query_old, gallery_old_j)`` for items
    not yet backfilled and ``d(query_new, gallery_new_j)`` for backfilled ones
    (:meth:`BackfillSystem.backfilled`), squared Euclidean distances from
    :func:`distances.squared_euclidean`, each side in its own precision and
    widened to a common dtype as the engine does; ties are broken by gallery
    index. So ``I[:, 0]`` is the top-1 result whose correctness
    :func:`backfill.backfill_curve` counts. ``part="old"`` / ``"new"``: the
    two searches before the merge (old query vs the not-yet-backfilled items;
    new query vs the backfilled items), Fig. 1's first two rows.

    ``queries``: query indices (default all). ``exclude_self``: query ``i`` is
    gallery item ``i`` and is left out. Returns ``D`` (squared distances,
    float64) and ``I`` (gallery indices, int64), each ``(len(queries), k)``;
    where fewer than ``k`` items are eligible, ``D = inf`` and ``I = -1``.
    The matrix product's last bits depend on the batch shape (here and between
    the engine's chunks alike), so two items whose distances differ only by that
    rounding may swap; exact ties are ordered by index as in the engine.
    """
    if part not in ("merged", "old", "new"):
        raise ValueError(f"part must be 'merged', 'old' or 'new', got {part!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude_self and system.n_queries != system.n_gallery:
        raise ValueError(f"exclude_self=True needs query i to be gallery item i, but system "
                         f"{system.name!r} has {system.n_queries} queries and {system.n_gallery} items")
    q = np.arange(system.n_queries) if queries is None else np.asarray(queries, dtype=np.int64).reshape(-1)
    if len(q) and (q.min() < 0 or q.max() >= system.n_queries):
        raise ValueError(f"queries must be indices in 0..{system.n_queries - 1}, got {q.tolist()[:10]}")
    is_new = torch.from_numpy(system.backfilled(ratio, seed=seed))
    dtype = torch.promote_types(torch.promote_types(system.query_old.dtype, system.gallery_old.dtype),
                                 torch.promote_types(system.query_new.dtype, system.gallery_new.dtype))
    D = np.full((len(q), k), np.inf)
    I = np.full((len(q), k), -1, dtype=np.int64)
    inf = torch.tensor(float("inf"), dtype=dtype)
    for s in range(0, len(q), chunk_size):
        qi = torch.from_numpy(q[s:s + chunk_size])
        if part == "merged":
            d_old = DS.squared_euclidean(system.query_old[qi], system.gallery_old).to(dtype)
            d_new = DS.squared_euclidean(system.query_new[qi], system.gallery_new).to(dtype)
            row = torch.where(is_new.unsqueeze(0), d_new, d_old)
        elif part == "old":
            row = DS.squared_euclidean(system.query_old[qi], system.gallery_old).to(dtype)
            row = row.masked_fill(is_new.unsqueeze(0), inf)
        else:
            row = DS.squared_euclidean(system.query_new[qi], system.gallery_new).to(dtype)
            row = row.masked_fill(~is_new.unsqueeze(0), inf)
        eligible = torch.ones_like(row, dtype=torch.bool)
        if part == "old":
            eligible &= ~is_new.unsqueeze(0)
        elif part == "new":
            eligible &= is_new.unsqueeze(0)
        if exclude_self:
            eligible[torch.arange(len(qi)), qi] = False
            row[torch.arange(len(qi)), qi] = inf
        # a stable sort: equal distances keep ascending gallery index
        idx = torch.sort(row, dim=1, stable=True).indices[:, :k]
        ok = eligible.gather(1, idx)
        dd = row.gather(1, idx).double()
        kk = idx.shape[1]
        D[s:s + len(qi), :kk] = torch.where(ok, dd, float("inf")).numpy()
        I[s:s + len(qi), :kk] = torch.where(ok, idx, -1).numpy()
    return D, I


def retrieve_topk_over_ratios(system: BS.BackfillSystem, ratios, k: int, *, queries=None,
                              exclude_self: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`retrieve_topk` at every ratio: ``distances``, ``indices`` and
    ``from_new`` (the result item holds its new embedding), each (R, Q, k)."""
    ratios = orders.check_ratios(ratios)
    out = {"distances": [], "indices": [], "from_new": []}
    for r in ratios:
        D, I = retrieve_topk(system, r, k, queries=queries, exclude_self=exclude_self, seed=seed)
        out["distances"].append(D)
        out["indices"].append(I)
        out["from_new"].append(system.backfilled(r, seed=seed)[np.clip(I, 0, None)] & (I >= 0))
    return {key: np.stack(v) for key, v in out.items()}


def changing_queries(system: BS.BackfillSystem, labels, n: int = 3, k: int = 5, *,
                     exclude_self: bool = True, seed: int = 0) -> np.ndarray:
    """``n`` queries whose top-``k`` lists change the most for the better from ratio 0
    to ratio 1 (gain in correct results, then more correct at 1; ties by index)."""
    labels = np.asarray(labels)
    res = retrieve_topk_over_ratios(system, [0.0, 1.0], k, exclude_self=exclude_self, seed=seed)
    correct = (labels[res["indices"]] == labels[None, :, None]) & (res["indices"] >= 0)
    c0, c1 = correct[0].sum(1), correct[1].sum(1)
    key = np.lexsort((np.arange(len(c0)), -c1, -(c1 - c0)))
    return key[:n].astype(np.int64)


def mixed_source_query(system: BS.BackfillSystem, labels, ratio: float = 0.5, k: int = 5, *,
                       exclude_self: bool = True, seed: int = 0) -> int:
    """A query for Fig. 1: its merged top-``k`` at ``ratio`` holds items of both parts,
    as balanced as possible, with as many correct results as possible (ties by index)."""
    labels = np.asarray(labels)
    _, I = retrieve_topk(system, ratio, k, exclude_self=exclude_self, seed=seed)
    new = system.backfilled(ratio, seed=seed)[np.clip(I, 0, None)]
    n_new = new.sum(1)
    balance = np.minimum(n_new, k - n_new)
    correct = (labels[I] == labels[:, None]).sum(1)
    key = np.lexsort((np.arange(len(I)), -correct, -balance))
    return int(key[0])


def gallery_images(cfg: dict, setting: str, indices=None, *, size: int | None = None) -> np.ndarray:
    """Raw test images of ``setting`` (uint8 ``(n, H, W, 3)``) in the order of the
    cached test embeddings (``setting_embeddings(...)['new_test']``); resized to
    ``size`` x ``size`` if given or if their sizes differ."""
    from PIL import Image

    ds = E._split_dataset(cfg, "test", TR.setting_classes(cfg, setting)["test_classes"], augment=False)
    idx = np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    imgs = [ds.raw_image(int(i)) for i in idx]
    if not imgs:
        raise ValueError("no indices given")
    target = (size, size) if size is not None else imgs[0].shape[:2]
    out = np.empty((len(imgs), target[0], target[1], 3), dtype=np.uint8)
    for j, img in enumerate(imgs):
        if img.shape[:2] != tuple(target):
            img = np.asarray(Image.fromarray(img).resize((target[1], target[0]), Image.BILINEAR))
        out[j] = img
    return out


def pair_distances(query, gallery, query_labels, gallery_labels=None, *, exclude_self: bool = True,
                   max_pairs: int | None = 200_000, seed: int = 0) -> pd.DataFrame:
    """Euclidean distances of positive and negative (query, gallery) pairs of one system.

    ``query`` (Q, d) and ``gallery`` (N, d) are the two sides of a retrieval
    system (e.g. ``psi(phi_new)`` and ``phi_old`` of the test split); a pair is
    positive if the labels agree. With ``exclude_self`` (query ``i`` is gallery
    item ``i``) the pairs ``(i, i)`` are left out, as in the evaluation. Every
    positive pair is used if there are at most ``max_pairs`` of them, else a
    seeded uniform sample of ``max_pairs``; negatives are a seeded uniform
    sample (with replacement) of as many pairs as positives are returned
    (``max_pairs`` if there are no positives). ``max_pairs=None``: no cap.
    Distances are ``||q - g||`` (the square root of the engine's squared
    distance; the same ranking). Returns columns ``pair`` ("positive" /
    "negative"), ``query``, ``gallery``, ``distance``.
    """
    q = MT.as_embedding_tensor(query, "query").double()
    g = MT.as_embedding_tensor(gallery, "gallery").double()
    ql = MT.as_label_array(query_labels, "query_labels")
    gl = ql if gallery_labels is None else MT.as_label_array(gallery_labels, "gallery_labels")
    if len(ql) != len(q) or len(gl) != len(g):
        raise ValueError(f"labels ({len(ql)}, {len(gl)}) must match the rows of query ({len(q)}) and gallery ({len(g)})")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query has dimension {q.shape[1]} but gallery has {g.shape[1]}; one system shares one space")
    if exclude_self and len(q) != len(g):
        raise ValueError("exclude_self=True needs query i to be gallery item i (as many queries as gallery items)")
    rng = np.random.default_rng(seed)
    qc, gc = MT.encode_labels(ql, gl)
    # all positive pairs, grouped by class
    by_class = {c: np.flatnonzero(gc == c) for c in np.unique(gc)}
    pi, pj = [], []
    for i, c in enumerate(qc):
        js = by_class.get(c, np.empty(0, np.int64))
        if exclude_self:
            js = js[js != i]
        pi.append(np.full(len(js), i, dtype=np.int64))
        pj.append(js)
    pi = np.concatenate(pi) if pi else np.empty(0, np.int64)
    pj = np.concatenate(pj) if pj else np.empty(0, np.int64)
    if max_pairs is not None and len(pi) > max_pairs:
        keep = np.sort(rng.choice(len(pi), size=int(max_pairs), replace=False))
        pi, pj = pi[keep], pj[keep]
    n_neg = len(pi) if len(pi) else int(max_pairs or len(q) * len(g))
    ni, nj = np.empty(0, np.int64), np.empty(0, np.int64)
    if (qc[:, None] != gc[None, :]).any():
        while len(ni) < n_neg:
            a = rng.integers(len(q), size=2 * n_neg)
            b = rng.integers(len(g), size=2 * n_neg)
            ok = qc[a] != gc[b]
            ni, nj = np.concatenate([ni, a[ok]]), np.concatenate([nj, b[ok]])
        ni, nj = ni[:n_neg], nj[:n_neg]

    def dist(i, j):
        if len(i) == 0:
            return np.empty(0)
        return DS.paired_euclidean(q[torch.from_numpy(i)], g[torch.from_numpy(j)]).numpy()

    return pd.DataFrame({
        "pair": np.array(["positive"] * len(pi) + ["negative"] * len(ni), dtype=object),
        "query": np.concatenate([pi, ni]), "gallery": np.concatenate([pj, nj]),
        "distance": np.concatenate([dist(pi, pj), dist(ni, nj)]),
    })


def system_pair_distances(systems: dict, labels, *, max_pairs: int | None = 200_000,
                          seed: int = 0) -> pd.DataFrame:
    """:func:`pair_distances` of both retrieval systems of each merge system.

    ``systems``: ``{method: BackfillSystem}`` whose queries are its gallery
    (leave-one-out). For each, the *backward* system ``{query_old, gallery_old}``
    (e.g. ``{phi_rev, phi_old}``) and the *new* system ``{query_new,
    gallery_new}`` (``{phi_new, phi_new}``, or ``{rho_new, rho_new}`` for
    Ours). Returns columns ``method, system, pair, query, gallery, distance``.
    """
    parts = []
    for m, s in systems.items():
        for name, qe, ge in (("backward", s.query_old, s.gallery_old), ("new", s.query_new, s.gallery_new)):
            df = pair_distances(qe, ge, labels, exclude_self=True, max_pairs=max_pairs, seed=seed)
            parts.append(df.assign(method=m, system=name))
    out = pd.concat(parts, ignore_index=True)
    return out[["method", "system", "pair", "query", "gallery", "distance"]]


def calibration_summary(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per method: how well one distance threshold separates positives from negatives
    *across both systems* (what a merge by distance needs).

    Columns: per system the median positive and negative distance, and
    ``pooled_auc``: the probability that a positive pair (of either system) is
    closer than a negative pair (of either system), ties counting 1/2, i.e. the
    ROC AUC of ``-distance`` over the pooled pairs; ``cross_auc``: the same
    probability for positives of one system against negatives of the *other*,
    averaged over the two directions (the paper's calibration across systems).
    """
    from sklearn.metrics import roc_auc_score

    def auc(pos, neg):
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        return float(roc_auc_score(y, -np.r_[pos, neg]))

    rows = []
    for m, df in pairs.groupby("method", sort=False):
        get = lambda s, p: df.loc[(df.system == s) & (df.pair == p), "distance"].to_numpy()  # noqa: E731
        row = {"method": m}
        for s in ("backward", "new"):
            row[f"{s}_pos_median"] = float(np.median(get(s, "positive")))
            row[f"{s}_neg_median"] = float(np.median(get(s, "negative")))
            row[f"{s}_auc"] = auc(get(s, "positive"), get(s, "negative"))
        row["cross_auc"] = 0.5 * (auc(get("backward", "positive"), get("new", "negative"))
                                  + auc(get("new", "positive"), get("backward", "negative")))
        row["pooled_auc"] = auc(df.loc[df.pair == "positive", "distance"].to_numpy(),
                                df.loc[df.pair == "negative", "distance"].to_numpy())
        rows.append(row)
    return pd.DataFrame(rows)
