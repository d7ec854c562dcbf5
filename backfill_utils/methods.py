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
CMCL-single / -separate   psi trained with the single-system / separate variant
CMCL w/o L_rev            joint CMCL with lambda_rev = 0
========================  ==================================================
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from . import backfill as B
from . import compat as K
from . import embed as E
from . import metrics as MT
from . import train as T

MAIN_METHODS = ["old", "new", "offline", "naive", "BCT", "FCT", "FastFill",
                "RM", "RM+psi", "RM+psi+CMCL", "Ours"]
VARIANT_METHODS = ["CMCL-single", "CMCL-separate", "RM+psi+CMCL", "CMCL w/o L_rev"]
ALL_METHODS = MAIN_METHODS + [m for m in VARIANT_METHODS if m not in MAIN_METHODS]

# compatibility module recipes: method name -> keyword arguments of compat.train_reverse
REVERSE_RECIPES = {
    "RM+psi": dict(use_cmcl=False),
    "RM+psi+CMCL": dict(use_cmcl=True, variant="joint"),
    "Ours": dict(use_cmcl=True, variant="joint", learn_new=True),
    "CMCL-single": dict(use_cmcl=True, variant="single"),
    "CMCL-separate": dict(use_cmcl=True, variant="separate"),
    "CMCL w/o L_rev": dict(use_cmcl=True, variant="joint", lambda_rev=0.0),
}
QUERY_PASSES = {"RM": 2}


def ratios(cfg: dict) -> np.ndarray:
    return np.linspace(0.0, 1.0, int(cfg["eval"]["num_ratios"]))


def _frame_to_arrays(df: pd.DataFrame) -> dict:
    out = {f"col::{c}": df[c].to_numpy() for c in df.columns}
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

    return E.cached_arrays("compat", _compat_key(cfg, setting, method), compute)


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

    arrays = E.cached_arrays("curves", key, compute)
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

    Returns one row per claim with the numbers it compares and whether it holds.
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
        rows.append(("joint CMCL flips less than separate (total negative flips)",
                     s.loc["RM+psi+CMCL", "negative_flips_total"], s.loc["CMCL-separate", "negative_flips_total"],
                     bool(s.loc["RM+psi+CMCL", "negative_flips_total"] < s.loc["CMCL-separate", "negative_flips_total"])))
    return pd.DataFrame(rows, columns=["claim", "value", "reference", "holds"])
