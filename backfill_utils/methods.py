"""Every method of PAPER.md section 3 as an online-backfilling system.

For one profile and one setting this module

1. gets the cached test embeddings of the old, new and BCT backbones and the
   cached (augmented) train-split embeddings of the old and new backbones;
2. trains the compatibility modules on the train embeddings (psi with L_rev,
   psi with CMCL and its variants, psi + rho, FCT's h, FastFill) and caches
   what evaluation needs (their outputs on the test split, FastFill's order,
   parameter counts, training histories);
3. builds a :class:`~backfill_utils.backfill.BackfillSystem` per method and
   evaluates all of them with the engine, caching the curves.

Method names (the ``method`` column of every table):

========================  ==================================================
old, new                  old/old and new/new (flat references)
offline                   old until r = 1, then new
naive                     phi_new query vs the mixed gallery
BCT                       BCT-trained new model vs the mixed gallery
FCT                       phi_new query; old items hold h(phi_old)
FastFill                  FCT + uncertainty, backfilled by descending sigma
RM                        rank merge of old/old and new/new (2 query passes)
RM+psi                    merge of {psi(phi_new), phi_old} and {phi_new, phi_new}
RM+psi+CMCL               the same with psi trained by joint CMCL + L_rev
Ours                      + learnable new embedding rho (psi, rho joint)
CMCL-single               psi trained with the backward system's loss only (L_A)
CMCL-separate             psi and rho, each system's loss with its own negatives only
                          (the joint variant of the same pair is Ours)
CMCL w/o L_rev            joint CMCL (psi only) with lambda_rev = 0
========================  ==================================================
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd
import torch

from . import backfill as B
from . import compat as K
from . import embed as E
from . import io
from . import metrics as MT
from . import models as M
from . import train as T

MAIN_METHODS = ["old", "new", "offline", "naive", "BCT", "FCT", "FastFill",
                "RM", "RM+psi", "RM+psi+CMCL", "Ours"]
# single / separate / joint CMCL. With a frozen new model (no rho) the separate variant
# gives psi exactly the gradient of the single one (L_B has no parameter), so the
# separate and joint variants are compared with rho trained, i.e. joint = Ours.
VARIANT_METHODS = ["CMCL-single", "CMCL-separate", "Ours"]
ABLATION_METHODS = ["RM", "RM+psi", "RM+psi+CMCL", "CMCL w/o L_rev", "Ours"]
ALL_METHODS = list(dict.fromkeys(MAIN_METHODS + VARIANT_METHODS + ABLATION_METHODS))

# compatibility module recipes: method name -> keyword arguments of compat.train_reverse
REVERSE_RECIPES = {
    "RM+psi": dict(use_cmcl=False),
    "RM+psi+CMCL": dict(use_cmcl=True, variant="joint"),
    "Ours": dict(use_cmcl=True, variant="joint", learn_new=True),
    "CMCL-single": dict(use_cmcl=True, variant="single"),
    "CMCL-separate": dict(use_cmcl=True, variant="separate", learn_new=True),
    "CMCL w/o L_rev": dict(use_cmcl=True, variant="joint", lambda_rev=0.0),
}
QUERY_PASSES = {"RM": 2}

# Code versions of the artifacts computed here (io.KINDS; README "Cache versions"). Bump
# COMPAT_VERSION when compat.py or losses.py change what the modules learn (until compat.py
# carries its own), CURVES_VERSION when the engine (metrics.py, backfill.py) or the curve
# code below changes a number, EXPERIMENTS_VERSION for the order study and the query cost.
COMPAT_VERSION = 1
CURVES_VERSION = 1
EXPERIMENTS_VERSION = 1


def ratios(cfg: dict) -> np.ndarray:
    return np.linspace(0.0, 1.0, int(cfg["eval"]["num_ratios"]))


def _frame_to_arrays(df: pd.DataFrame) -> dict:
    out = {}
    for c in df.columns:
        v = df[c].to_numpy()
        out[f"col::{c}"] = v.astype(str) if v.dtype == object else v  # stored without pickle
    out["columns"] = np.array(list(df.columns))
    return out


def _arrays_to_frame(arrays: dict) -> pd.DataFrame:
    return pd.DataFrame({str(c): arrays[f"col::{c}"] for c in arrays["columns"]})


def setting_embeddings(cfg: dict, setting: str, *, progress: bool = True) -> dict:
    """Test embeddings of old/new/BCT and train embeddings of old/new for ``setting``."""
    passes = int(cfg["embed"]["train_passes"])
    out = {}
    for role in ("old", "new", "bct"):
        out[f"{role}_test"] = E.get_embeddings(cfg, setting, role, "test", progress=progress)
    for role in ("old", "new"):
        out[f"{role}_train"] = E.get_embeddings(cfg, setting, role, "train", passes=passes, progress=progress)
    return out


def _compat_key(cfg: dict, setting: str, method: str) -> dict:
    return {
        "old": T.model_spec(cfg, setting, "old"), "new": T.model_spec(cfg, setting, "new"),
        "passes": int(cfg["embed"]["train_passes"]), "compat": cfg["compat"],
        "method": method, "recipe": REVERSE_RECIPES.get(method), "seed": int(cfg["seed"]),
    }


def compat_outputs(cfg: dict, setting: str, method: str, *, emb: dict | None = None,
                   progress: bool = True) -> dict:
    """Train (or load from the cache) the compatibility module(s) of ``method``.

    Returns arrays: ``query_old`` (psi(phi_new) on the test split) and, for
    Ours, ``new_test`` (rho(phi_new)); for FCT/FastFill ``gallery_old``
    (h(phi_old)) and, for FastFill, ``order``; always ``n_params`` and the
    training history (``history_frame(...)``).
    """
    if method not in REVERSE_RECIPES and method not in ("FCT", "FastFill"):
        raise ValueError(f"{method!r} has no compatibility module; choose one of "
                         f"{sorted(REVERSE_RECIPES) + ['FCT', 'FastFill']}")

    def compute():
        e = emb if emb is not None else setting_embeddings(cfg, setting, progress=progress)
        c = dict(cfg["compat"])
        common = dict(epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
                      seed=int(cfg["seed"]), disable=not progress)
        old_tr, new_tr = e["old_train"]["emb"], e["new_train"]["emb"]
        labels = e["new_train"]["labels"]
        if method in REVERSE_RECIPES:
            kw = dict(tau=c["tau"], hard_negatives=c["hard_negatives"],
                      samples_per_class=c["samples_per_class"], lambda_rev=c["lambda_rev"],
                      distance=c["distance"])
            kw.update(REVERSE_RECIPES[method])
            psi, rho, hist = K.train_reverse(new_tr, old_tr, labels, **common, **kw)
            out = {"query_old": K.apply(psi, e["new_test"]["emb"]),
                   "n_params": np.int64(sum(p.numel() for p in psi.parameters()))}
            if rho is not None:
                out["new_test"] = K.apply(rho, e["new_test"]["emb"])
                out["n_params"] = out["n_params"] + sum(p.numel() for p in rho.parameters())
        else:
            trainer = K.train_fct if method == "FCT" else K.train_fastfill
            model, hist = trainer(old_tr, new_tr, **common)
            out = {"gallery_old": K.apply(model, e["old_test"]["emb"]),
                   "n_params": np.int64(sum(p.numel() for p in model.parameters()))}
            if method == "FastFill":
                out["order"] = K.fastfill_order(model, e["old_test"]["emb"])
        out.update({f"history::{k}": v for k, v in _frame_to_arrays(hist).items()})
        return out

    return io.cached_arrays("compat", _compat_key(cfg, setting, method), compute,
                            what=f"the compatibility module of {method} ({setting} setting)")


def history_frame(outputs: dict) -> pd.DataFrame:
    """The training history stored in ``compat_outputs``' arrays."""
    return _arrays_to_frame({k[len("history::"):]: v for k, v in outputs.items()
                             if k.startswith("history::")})


def build_systems(cfg: dict, setting: str, methods=None, *, progress: bool = True):
    """Systems for ``methods`` (default: all but old/new/offline) and the references.

    Returns ``(systems, refs)``; ``refs`` has ``labels``, ``old``/``new`` test
    embeddings, and ``extra_params`` per method.
    """
    methods = [m for m in (methods or ALL_METHODS) if m not in ("old", "new", "offline")]
    e = setting_embeddings(cfg, setting, progress=progress)
    old, new, bct = e["old_test"]["emb"], e["new_test"]["emb"], e["bct_test"]["emb"]
    labels = e["new_test"]["labels"]
    seed = int(cfg["eval"]["order_seed"])
    order = B.random_order(len(labels), seed)
    systems, extra = {}, {}
    for m in methods:
        passes = QUERY_PASSES.get(m, 1)
        if m == "naive":
            s = B.BackfillSystem.mixed(m, new, old, new, order=order)
        elif m == "BCT":
            s = B.BackfillSystem.mixed(m, bct, old, bct, order=order)
        elif m == "RM":
            s = B.BackfillSystem.merge(m, old, old, new, new, order=order, query_passes=passes)
        elif m in ("FCT", "FastFill"):
            o = compat_outputs(cfg, setting, m, emb=e, progress=progress)
            s = B.BackfillSystem.mixed(m, new, o["gallery_old"], new,
                                       order=o["order"] if m == "FastFill" else order)
            extra[m] = int(o["n_params"])
        elif m in REVERSE_RECIPES:
            o = compat_outputs(cfg, setting, m, emb=e, progress=progress)
            new_side = o.get("new_test", new)
            s = B.BackfillSystem.merge(m, o["query_old"], old, new_side, new_side, order=order)
            extra[m] = int(o["n_params"])
        else:
            raise ValueError(f"unknown method {m!r}; known: {ALL_METHODS}")
        systems[m] = s
        extra.setdefault(m, 0)
    refs = {"labels": labels, "old": old, "new": new, "extra_params": extra}
    return systems, refs


def evaluate_setting(cfg: dict, setting: str, methods=None, *, progress: bool = True):
    """Curves (long table) and summary (one row per method) of ``setting``; cached."""
    methods = list(methods or ALL_METHODS)
    key = {"compat": [_compat_key(cfg, setting, m) for m in methods], "methods": methods,
           "bct": T.model_spec(cfg, setting, "bct"), "eval": cfg["eval"]}

    def compute():
        systems, refs = build_systems(cfg, setting, methods, progress=progress)
        labels = refs["labels"]
        old_ref = MT.evaluate_retrieval(refs["old"], labels, refs["old"], labels,
                                        exclude_self=True, return_per_query=True)
        new_ref = MT.evaluate_retrieval(refs["new"], labels, refs["new"], labels,
                                        exclude_self=True, return_per_query=True)
        r = ratios(cfg)
        curves, rows = [], []
        for m in methods:
            if m in ("old", "new"):
                ref = old_ref if m == "old" else new_ref
                c = pd.DataFrame({"ratio": r, "mAP": ref["mAP"], "top1": ref["top1"],
                                  "top5": ref["top5"], "negative_flips": 0.0})
                passes = 1
            elif m == "offline":
                c = B.offline_curve(old_ref, new_ref, r)
                passes = 1
            else:
                c = B.backfill_curve(systems[m], labels, labels, ratios=r, exclude_self=True,
                                     reference_correct=old_ref["correct_at_1"])
                passes = systems[m].query_passes
            c.insert(0, "method", m)
            curves.append(c)
            s = B.summarize_curve(c, old_ref, new_ref)
            rows.append({"method": m, "query_passes": passes,
                         "extra_params": refs["extra_params"].get(m, 0), **s})
        curves = pd.concat(curves, ignore_index=True)
        summary = pd.DataFrame(rows)
        out = {f"curves::{k}": v for k, v in _frame_to_arrays(curves).items()}
        out.update({f"summary::{k}": v for k, v in _frame_to_arrays(summary).items()})
        return out

    arrays = io.cached_arrays("curves", key, compute, what=f"the backfilling curves of the {setting} setting")
    split = lambda p: _arrays_to_frame({k[len(p):]: v for k, v in arrays.items() if k.startswith(p)})  # noqa: E731
    return split("curves::"), split("summary::")


# --------------------------------------------------------------------------- tables
MAIN_COLUMNS = ["dataset", "setting", "method", "query_passes", "auc_map", "auc_top1",
                "final_map", "final_top1", "rel_gain_map", "rel_gain_top1", "negative_flips_total"]


def gallery_quality(cfg: dict, *, progress: bool = True) -> pd.DataFrame:
    """old/old, new/new and BCT/BCT retrieval quality (leave-one-out) per setting."""
    rows = []
    for s in cfg["settings"]:
        for role in ("old", "new", "bct"):
            e = E.get_embeddings(cfg, s, role, "test", progress=progress)
            r = MT.evaluate_retrieval(e["emb"], e["labels"], e["emb"], e["labels"], exclude_self=True)
            rows.append({"dataset": cfg["dataset"], "setting": s, "model": f"{role}/{role}",
                         "trained_classes": T.model_spec(cfg, s, role)["num_classes"],
                         "test_classes": len(set(e["labels"].tolist())), "queries": len(e["labels"]),
                         "mAP": r["mAP"], "top1": r["top1"], "top5": r["top5"]})
    return pd.DataFrame(rows)


def evaluate_all(cfg: dict, *, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Curves of every setting (``{setting: curves}``) and the long summary table."""
    curves, summaries = {}, []
    for s in cfg["settings"]:
        c, summ = evaluate_setting(cfg, s, progress=progress)
        curves[s] = c
        summaries.append(summ.assign(dataset=cfg["dataset"], setting=s))
    return curves, pd.concat(summaries, ignore_index=True)


def main_comparison(summary: pd.DataFrame, methods=None) -> pd.DataFrame:
    """The ``main_comparison.csv`` table: one row per (setting, method)."""
    methods = list(methods or MAIN_METHODS)
    t = summary[summary["method"].isin(methods)].copy()
    t["order"] = t["method"].map({m: i for i, m in enumerate(methods)})
    return t.sort_values(["setting", "order"], kind="stable")[MAIN_COLUMNS].reset_index(drop=True)


def claims(curves: pd.DataFrame, summary: pd.DataFrame, *, tol_step: float = 0.5,
           tol_final: float = 0.5) -> pd.DataFrame:
    """The phenomena the paper shows (issue 4, point 4), checked on one setting.

    Returns one row per claim with the numbers it compares and whether it holds;
    rows with ``checked=False`` are reported for context, not required.
    """
    s = summary.set_index("method")
    rm = curves[curves["method"] == "RM"].sort_values("ratio")
    steps = np.diff(rm["mAP"].to_numpy())
    old, new = s.loc["old"], s.loc["new"]
    rows = [
        ("RM rises: no step down by more than %.1f mAP" % tol_step, float(steps.min()), -tol_step,
         bool(steps.min() >= -tol_step)),
        ("RM endpoints equal old/old and new/new (mAP)",
         float(abs(rm["mAP"].iloc[0] - old["final_map"]) + abs(rm["mAP"].iloc[-1] - new["final_map"])),
         0.0, bool(np.isclose(rm["mAP"].iloc[0], old["final_map"]) and np.isclose(rm["mAP"].iloc[-1], new["final_map"]))),
        ("RM+psi >= RM on AUC_mAP", s.loc["RM+psi", "auc_map"], s.loc["RM", "auc_map"],
         bool(s.loc["RM+psi", "auc_map"] >= s.loc["RM", "auc_map"])),
        ("RM+psi+CMCL > RM+psi on AUC_mAP", s.loc["RM+psi+CMCL", "auc_map"], s.loc["RM+psi", "auc_map"],
         bool(s.loc["RM+psi+CMCL", "auc_map"] > s.loc["RM+psi", "auc_map"])),
        ("Ours > RM+psi+CMCL on AUC_mAP", s.loc["Ours", "auc_map"], s.loc["RM+psi+CMCL", "auc_map"],
         bool(s.loc["Ours", "auc_map"] > s.loc["RM+psi+CMCL", "auc_map"])),
    ]
    for b in ("BCT", "FCT", "FastFill"):
        for k in ("auc_map", "auc_top1"):
            rows.append((f"Ours > {b} on {k}", s.loc["Ours", k], s.loc[b, k], bool(s.loc["Ours", k] > s.loc[b, k])))
    rows.append(("Ours final mAP >= new/new - %.1f" % tol_final, s.loc["Ours", "final_map"],
                 new["final_map"] - tol_final, bool(s.loc["Ours", "final_map"] >= new["final_map"] - tol_final)))
    if "CMCL-separate" in s.index:
        # negative flips against old/old (queries right under old/old, wrong now),
        # averaged over the ratios r > 0; the per-step total is reported beside it
        vs_old = lambda m: float(curves[(curves["method"] == m) & (curves["ratio"] > 0)]["negative_flips_vs_old"].mean())  # noqa: E731
        rows.append(("joint CMCL (Ours) flips less than separate: mean negative flips vs old/old",
                     vs_old("Ours"), vs_old("CMCL-separate"), bool(vs_old("Ours") < vs_old("CMCL-separate"))))
        rows.append(("(reported) joint vs separate: total of per-step negative flips",
                     s.loc["Ours", "negative_flips_total"], s.loc["CMCL-separate", "negative_flips_total"],
                     bool(s.loc["Ours", "negative_flips_total"] < s.loc["CMCL-separate", "negative_flips_total"])))
    out = pd.DataFrame(rows, columns=["claim", "value", "reference", "holds"])
    out.insert(1, "checked", ~out["claim"].str.startswith("(reported)"))
    return out


# ---- retrieval for illustrations
# Figures and tables of the render notebooks: the ranked lists behind a curve
# point (exactly the engine's ranking), positive/negative pair distances of the
# two systems of a merge, the query-side cost of every method, and small tables.

def backfilled_mask(system: B.BackfillSystem, ratio: float, *, seed: int = 0) -> np.ndarray:
    """(N,) bool: which gallery items hold ``gallery_new`` at ``ratio``.

    The first ``backfill.backfilled_count(ratio, N)`` items of ``system.order``
    (else ``backfill.random_order(N, seed)``, as :func:`backfill.backfill_curve`).
    """
    n = system.n_gallery
    order = system.order if system.order is not None else B.random_order(n, seed)
    mask = np.zeros(n, dtype=bool)
    mask[order[:B.backfilled_count(ratio, n)]] = True
    return mask


def retrieve_topk(system: B.BackfillSystem, ratio: float, k: int, *, queries=None,
                  exclude_self: bool = False, part: str = "merged", seed: int = 0,
                  chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items of ``queries`` at backfill ratio ``ratio``: ``(D, I)``.

    ``part="merged"`` (default) ranks the *mixed distance row* of the engine
    (:mod:`backfill_utils.backfill`): ``d(query_old, gallery_old_j)`` for items
    not yet backfilled and ``d(query_new, gallery_new_j)`` for backfilled ones
    (:func:`backfilled_mask`), squared Euclidean distances from
    :func:`metrics.pairwise_distances`, each side in its own precision and
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
    is_new = torch.from_numpy(backfilled_mask(system, ratio, seed=seed))
    dtype = torch.promote_types(torch.promote_types(system.query_old.dtype, system.gallery_old.dtype),
                                 torch.promote_types(system.query_new.dtype, system.gallery_new.dtype))
    D = np.full((len(q), k), np.inf)
    I = np.full((len(q), k), -1, dtype=np.int64)
    inf = torch.tensor(float("inf"), dtype=dtype)
    for s in range(0, len(q), chunk_size):
        qi = torch.from_numpy(q[s:s + chunk_size])
        if part == "merged":
            d_old = MT.pairwise_distances(system.query_old[qi], system.gallery_old).to(dtype)
            d_new = MT.pairwise_distances(system.query_new[qi], system.gallery_new).to(dtype)
            row = torch.where(is_new.unsqueeze(0), d_new, d_old)
        elif part == "old":
            row = MT.pairwise_distances(system.query_old[qi], system.gallery_old).to(dtype)
            row = row.masked_fill(is_new.unsqueeze(0), inf)
        else:
            row = MT.pairwise_distances(system.query_new[qi], system.gallery_new).to(dtype)
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


def retrieve_topk_over_ratios(system: B.BackfillSystem, ratios, k: int, *, queries=None,
                              exclude_self: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`retrieve_topk` at every ratio: ``distances``, ``indices`` and
    ``from_new`` (the result item holds its new embedding), each (R, Q, k)."""
    ratios = B.check_ratios(ratios)
    out = {"distances": [], "indices": [], "from_new": []}
    for r in ratios:
        D, I = retrieve_topk(system, r, k, queries=queries, exclude_self=exclude_self, seed=seed)
        out["distances"].append(D)
        out["indices"].append(I)
        out["from_new"].append(backfilled_mask(system, r, seed=seed)[np.clip(I, 0, None)] & (I >= 0))
    return {key: np.stack(v) for key, v in out.items()}


def changing_queries(system: B.BackfillSystem, labels, n: int = 3, k: int = 5, *,
                     exclude_self: bool = True, seed: int = 0) -> np.ndarray:
    """``n`` queries whose top-``k`` lists change the most for the better from ratio 0
    to ratio 1 (gain in correct results, then more correct at 1; ties by index)."""
    labels = np.asarray(labels)
    res = retrieve_topk_over_ratios(system, [0.0, 1.0], k, exclude_self=exclude_self, seed=seed)
    correct = (labels[res["indices"]] == labels[None, :, None]) & (res["indices"] >= 0)
    c0, c1 = correct[0].sum(1), correct[1].sum(1)
    key = np.lexsort((np.arange(len(c0)), -c1, -(c1 - c0)))
    return key[:n].astype(np.int64)


def mixed_source_query(system: B.BackfillSystem, labels, ratio: float = 0.5, k: int = 5, *,
                       exclude_self: bool = True, seed: int = 0) -> int:
    """A query for Fig. 1: its merged top-``k`` at ``ratio`` holds items of both parts,
    as balanced as possible, with as many correct results as possible (ties by index)."""
    labels = np.asarray(labels)
    _, I = retrieve_topk(system, ratio, k, exclude_self=exclude_self, seed=seed)
    new = backfilled_mask(system, ratio, seed=seed)[np.clip(I, 0, None)]
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

    ds = E._split_dataset(cfg, "test", T.setting_classes(cfg, setting)["test_classes"], augment=False)
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
        return (q[torch.from_numpy(i)] - g[torch.from_numpy(j)]).norm(dim=1).numpy()

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


_BACKBONE_QUERY = {"old": "old", "offline": "old", "BCT": "bct", "RM": None}


def query_side(method: str) -> list[tuple[str, list[str]]]:
    """The query-side forward of ``method``: ``[(backbone role, [modules on its output])]``.

    RM runs both backbones; a method with a reverse transform runs phi_new, psi
    and, if its recipe trains rho (``learn_new``), rho; FCT/FastFill run phi_new
    only (h is applied to the gallery); offline serves phi_old while backfilling.
    """
    if method == "RM":
        return [("old", []), ("new", [])]
    if method in REVERSE_RECIPES:
        return [("new", ["psi"] + (["rho"] if REVERSE_RECIPES[method].get("learn_new") else []))]
    if method in ("new", "naive", "FCT", "FastFill"):
        return [("new", [])]
    if method in _BACKBONE_QUERY:
        return [(_BACKBONE_QUERY[method], [])]
    raise ValueError(f"no query side known for {method!r}; known: {ALL_METHODS}")


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


def query_cost(cfg: dict, setting: str, methods=None, *, batch_size: int = 64, repeats: int = 5,
               warmup: int = 2) -> pd.DataFrame:
    """:func:`measure_query_cost`, measured once and cached (kind ``"experiments"``):
    a render notebook reads the times measured by the compute notebook."""
    methods = list(methods or ALL_METHODS)
    key = {"study": "query_cost", "setting": setting, "methods": methods, "batch_size": int(batch_size),
           "repeats": int(repeats), "warmup": int(warmup), "seed": int(cfg["seed"]),
           "models": {r: T.model_spec(cfg, setting, r) for r in ("old", "new", "bct")}}
    arrays = io.cached_arrays(
        "experiments", key, lambda: _frame_to_arrays(measure_query_cost(
            cfg, setting, methods, batch_size=batch_size, repeats=repeats, warmup=warmup)),
        what=f"the measured query cost of the {setting} setting")
    return _arrays_to_frame(arrays)


def measure_query_cost(cfg: dict, setting: str, methods=None, *, batch_size: int = 64, repeats: int = 5,
                       warmup: int = 2) -> pd.DataFrame:
    """The cost columns of Table 2, per method: forward passes per query, extra
    parameters, and measured time per query.

    Backbones are the cached trained models (``train.load_model``); psi/rho are
    freshly built modules of the trained architecture (the time does not depend
    on the weights). ``extra_params`` counts psi (+ rho), or FCT's h / FastFill's
    model, which run on the gallery side and cost no query time. Each component of
    a query side (:func:`query_side`) is timed once with :func:`time_query_forward`
    -- a backbone on a batch of ``batch_size`` test images, a module on the new
    model's embeddings of that batch -- and a method's time is the sum of its
    components. CPU wall-clock time: machine- and load-dependent.
    Columns: ``method, query_passes, query_side`` (backbone passes separated by
    ``;``, each with the modules applied to its output), ``extra_params,
    ms_per_query``.
    """
    methods = list(methods or ALL_METHODS)
    sides = {m: query_side(m) for m in methods}
    roles = sorted({r for side in sides.values() for r, _ in side} | {"new"})
    nets = {r: T.load_model(T.model_spec(cfg, setting, r)) for r in roles}
    ds = E._split_dataset(cfg, "test", T.setting_classes(cfg, setting)["test_classes"], augment=False)
    n = min(int(batch_size), len(ds))
    images = torch.stack([ds[i][0] for i in range(n)])
    d_new = int(T.model_spec(cfg, setting, "new")["model"]["embedding_dim"])
    d_old = int(T.model_spec(cfg, setting, "old")["model"]["embedding_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        modules = {"psi": K.ReverseTransform(d_new, d_old), "rho": K.LearnableEmbedding(d_new)}
        gallery_side = {"FCT": K.ForwardTransform(d_old, d_new), "FastFill": K.FastFillTransform(d_old, d_new)}
    with torch.no_grad():
        z_new = nets["new"].eval().embed(images)
    used = sorted({x for side in sides.values() for _, mods in side for x in mods})
    components = {r: ([(nets[r], [])], images) for r in roles}
    components.update({x: ([(torch.nn.Identity(), [modules[x]])], z_new) for x in used})
    # warm every component up first (the first forwards of a process are far slower), then time
    for passes, batch in components.values():
        time_query_forward(passes, batch, repeats=max(1, warmup), warmup=0)
    timed = {c: time_query_forward(passes, batch, repeats=repeats, warmup=warmup)
             for c, (passes, batch) in components.items()}
    rows = []
    for m, side in sides.items():
        parts = [r for r, _ in side] + [x for _, mods in side for x in mods]
        extra = (M.count_parameters(gallery_side[m]) if m in gallery_side
                 else sum(M.count_parameters(modules[x]) for _, mods in side for x in mods))
        label = " ; ".join(" + ".join([f"phi_{r}", *mods]) for r, mods in side)
        rows.append({"method": m, "query_passes": len(side), "query_side": label, "extra_params": int(extra),
                     "ms_per_query": 1e3 * sum(timed[p] for p in parts)})
    return pd.DataFrame(rows)


def order_comparison(cfg: dict, setting: str, methods=("RM", "Ours"), *,
                     progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random backfill order vs FastFill's uncertainty order (descending sigma).

    Curves of FCT (random order), FastFill (its own order), FastFill with the
    random order, and each of ``methods`` under both orders (names ``"<m>"`` and
    ``"<m> (sigma order)"``). Returns ``(curves, summary)`` like
    :func:`evaluate_setting`; cached (kind ``"experiments"``).
    """
    methods = list(methods)
    key = {"study": "order", "setting": setting, "methods": methods, "eval": cfg["eval"],
           "compat": [_compat_key(cfg, setting, m) for m in ("FCT", "FastFill", *methods)
                      if m in REVERSE_RECIPES or m in ("FCT", "FastFill")]}

    def compute():
        curves, summary = _order_comparison(cfg, setting, methods, progress=progress)
        out = {f"curves::{k}": v for k, v in _frame_to_arrays(curves).items()}
        out.update({f"summary::{k}": v for k, v in _frame_to_arrays(summary).items()})
        return out

    arrays = io.cached_arrays("experiments", key, compute,
                              what=f"the backfill-order study of the {setting} setting")
    split = lambda p: _arrays_to_frame({k[len(p):]: v for k, v in arrays.items() if k.startswith(p)})  # noqa: E731
    return split("curves::"), split("summary::")


def _order_comparison(cfg: dict, setting: str, methods, *, progress: bool = False):
    systems, refs = build_systems(cfg, setting, ["FCT", "FastFill", *methods], progress=progress)
    labels = refs["labels"]
    sigma_order = systems["FastFill"].order
    random = B.random_order(len(labels), int(cfg["eval"]["order_seed"]))
    variants = {"FCT": systems["FCT"], "FastFill": systems["FastFill"],
                "FastFill (random order)": dataclasses.replace(systems["FastFill"], name="FastFill (random order)",
                                                       order=random)}
    for m in methods:
        variants[m] = systems[m]
        variants[f"{m} (sigma order)"] = dataclasses.replace(systems[m], name=f"{m} (sigma order)", order=sigma_order)
    old_ref = MT.evaluate_retrieval(refs["old"], labels, refs["old"], labels, exclude_self=True,
                                    return_per_query=True)
    new_ref = MT.evaluate_retrieval(refs["new"], labels, refs["new"], labels, exclude_self=True,
                                    return_per_query=True)
    r = ratios(cfg)
    curves, rows = [], []
    for name, s in variants.items():
        c = B.backfill_curve(s, labels, labels, ratios=r, exclude_self=True,
                             reference_correct=old_ref["correct_at_1"])
        c.insert(0, "method", name)
        curves.append(c)
        order = "sigma" if np.array_equal(s.order, sigma_order) else "random"
        rows.append({"method": name, "order": order, **B.summarize_curve(c, old_ref, new_ref)})
    return pd.concat(curves, ignore_index=True), pd.DataFrame(rows)


TABLE1_METHODS = ["old", "new", "offline", "naive", "BCT", "FCT", "FastFill", "RM", "RM+psi",
                  "RM+psi+CMCL", "Ours"]


def table1(summary: pd.DataFrame, methods=None, *, layout: str = "long") -> pd.DataFrame:
    """Table 1: per (dataset, setting, method) AUC_mAP, AUC_CMC top-1 (trapezoid and
    plain mean of the points) and the relative gains in percent.

    ``layout="wide"``: one row per (dataset, method) with the trapezoid AUCs and
    gains of each setting side by side (columns ``"<setting> AUC_mAP"``, ...).
    """
    if layout not in ("long", "wide"):
        raise ValueError(f"layout must be 'long' or 'wide', got {layout!r}")
    methods = list(methods or TABLE1_METHODS)
    if layout == "wide":
        t = table1(summary, methods)
        settings = list(dict.fromkeys(t["setting"]))
        cols = ["AUC_mAP", "AUC_top1", "gain_mAP_%", "gain_top1_%"]
        wide = t.pivot_table(index=["dataset", "method"], columns="setting", values=cols, sort=False,
                             dropna=False)  # keep an undefined gain (NaN) of one setting
        wide.columns = [f"{s} {c}" for c, s in wide.columns]
        wide = wide[[f"{s} {c}" for s in settings for c in cols]].reset_index()
        wide["_o"] = wide["method"].map({m: i for i, m in enumerate(methods)})
        return wide.sort_values(["dataset", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)
    t = summary[summary["method"].isin(methods)].copy()
    t["_o"] = t["method"].map({m: i for i, m in enumerate(methods)})
    t["_s"] = t["setting"].map({s: i for i, s in enumerate(dict.fromkeys(summary["setting"]))})
    t = t.sort_values(["dataset", "_s", "_o"], kind="stable")
    out = pd.DataFrame({
        "dataset": t["dataset"], "setting": t["setting"], "method": t["method"],
        "query_passes": t["query_passes"],
        "AUC_mAP": t["auc_map"], "AUC_top1": t["auc_top1"],
        "mean_mAP": t["mean_map"], "mean_top1": t["mean_top1"],
        "gain_mAP_%": 100.0 * t["rel_gain_map"], "gain_top1_%": 100.0 * t["rel_gain_top1"],
    })
    return out.reset_index(drop=True)


def ablation_components(method: str, cfg: dict | None = None) -> dict[str, bool]:
    """Which components of PAPER.md section 2 ``method`` uses: ``psi``, ``CMCL``,
    ``L_rev`` (weight > 0: the recipe's ``lambda_rev``, else the profile's
    ``compat.lambda_rev``, default 1) and ``rho``; RM uses none."""
    if method == "RM":
        return dict(psi=False, CMCL=False, L_rev=False, rho=False)
    if method not in REVERSE_RECIPES:
        raise ValueError(f"{method!r} is not an ablation row; choose RM or one of {sorted(REVERSE_RECIPES)}")
    r = REVERSE_RECIPES[method]
    lam = r.get("lambda_rev", (cfg or {}).get("compat", {}).get("lambda_rev", 1.0))
    return dict(psi=True, CMCL=bool(r.get("use_cmcl")), L_rev=bool(lam > 0) or not r.get("use_cmcl"),
                rho=bool(r.get("learn_new")))


def table2_ablation(summary: pd.DataFrame, methods=None, cfg: dict | None = None) -> pd.DataFrame:
    """Table 2 (ablation): components used ("yes"/"-") and the AUCs, per setting
    (default rows: ``ABLATION_METHODS``)."""
    methods = list(methods or ABLATION_METHODS)
    t = summary[summary["method"].isin(methods)].copy()
    t["_o"] = t["method"].map({m: i for i, m in enumerate(methods)})
    t["_s"] = t["setting"].map({s: i for i, s in enumerate(dict.fromkeys(summary["setting"]))})
    t = t.sort_values(["dataset", "_s", "_o"], kind="stable")
    rows = []
    for _, r in t.iterrows():
        marks = {k: ("yes" if v else "-") for k, v in ablation_components(r["method"], cfg).items()}
        rows.append({"dataset": r["dataset"], "setting": r["setting"], "method": r["method"], **marks,
                     "AUC_mAP": r["auc_map"], "AUC_top1": r["auc_top1"],
                     "gain_mAP_%": 100.0 * r["rel_gain_map"], "flips_total": r["negative_flips_total"]})
    return pd.DataFrame(rows)
