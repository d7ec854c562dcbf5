"""Running the registered methods (:mod:`backfill_utils.backfill.registry`) in one setting.

For a profile ``cfg`` and a setting:

1. :class:`SettingData` gives lazy access to what methods train from and are
   evaluated on: the cached test embeddings of the backbones, their cached
   (augmented) train-split embeddings with the training labels, and their frozen
   classifiers;
2. :func:`train_method` trains a method's modules with its default recipe from the
   profile, or with a ``recipe`` and ``seed`` given by the caller (a tuner, a seed
   study), and caches them (kind ``"compat"``: each module's ``config`` and
   ``state_dict``, and the training history);
3. :func:`build_system` / :func:`make_system` turn a method and its trained modules
   into a :class:`~backfill_utils.backfill.systems.BackfillSystem`;
4. :func:`method_curve` evaluates one method with the loop of
   :mod:`backfill_utils.backfill.evaluate` (cached per method, kind ``"curves"``, so adding a
   method computes only its own curve); :func:`evaluate_setting` /
   :func:`evaluate_all` enumerate the registry.

``CURVES_VERSION`` and ``EXPERIMENTS_VERSION`` go into cache keys (docs/reproducibility.md, "Cache
versions"); ``compat.COMPAT_VERSION`` versions the trained modules.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import cache, io
from .. import embed as E
from .. import train as TR
from ..compat import modules as K
from ..compat.recipes import Recipe
from ..retrieval import metrics as MT
from . import evaluate as EV
from . import registry as MM
from . import systems as BS
from .evaluate import make_system, reference_curve  # noqa: F401 - part of this module's interface

__all__ = ["CURVES_VERSION", "EXPERIMENTS_VERSION", "EVAL_SPLITS", "ratios", "SettingData", "resolve_recipe",
           "compat_key", "train_method", "make_system", "build_system", "build_systems",
           "method_curve", "evaluate_setting", "evaluate_all", "gallery_quality", "train_roles",
           "prefetch_embeddings", "cache_train_embeddings"]

# Bump CURVES_VERSION when the engine (retrieval/, backfill/curves.py) or the code below changes a
# curve or a summary number; EXPERIMENTS_VERSION for the order study and the query cost.
CURVES_VERSION = 1
EXPERIMENTS_VERSION = 2  # 2: the query cost has the gallery-side columns


def ratios(cfg: dict) -> np.ndarray:
    """The profile's backfill ratios: ``eval.num_ratios`` points from 0 to 1."""
    return np.linspace(0.0, 1.0, int(cfg["eval"]["num_ratios"]))


# --------------------------------------------------------------------------- data
#: The splits a method is evaluated on: the test split (reported), the validation split
#: (held out of the training images; hyperparameters are chosen on it).
EVAL_SPLITS = ("test", "val")


class SettingData:
    """Cached embeddings and classifiers of one setting, loaded on first use: the
    profile's :class:`~backfill_utils.backfill.evaluate.EmbeddingSource`.

    ``test(role)`` ``(N, d)`` and ``test_labels``: the gallery (= queries) a method is
    evaluated on, the test split or, with ``split="val"``, the validation split held out
    of the training images (:data:`EVAL_SPLITS`); ``embeddings(role)`` the train
    split, ``(P, N, d)`` for ``P = embed.train_passes`` passes (pass 0 clean), and
    ``labels`` (the new model's training-class labels, the same for every role);
    ``classifier(role)`` the frozen classifier of a backbone. A method's ``fit``
    receives a view restricted to its ``train_roles`` (:meth:`restricted`), so its
    cache key names every backbone it reads; ``seed`` is the training seed.
    """

    def __init__(self, cfg: dict, setting: str, *, progress: bool = True,
                 roles: tuple[str, ...] = MM.BACKBONES, seed: int | None = None, split: str = "test",
                 _store: dict | None = None) -> None:
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
        self.cfg, self.setting, self.progress, self.split = cfg, setting, progress, split
        self.roles = tuple(roles)
        self.seed = int(cfg["seed"]) if seed is None else int(seed)
        self._store = {} if _store is None else _store

    def restricted(self, roles, seed: int | None = None) -> "SettingData":
        """The same data (shared, loaded once) limited to the backbones ``roles``."""
        return SettingData(self.cfg, self.setting, progress=self.progress, roles=tuple(roles),
                           seed=self.seed if seed is None else seed, split=self.split, _store=self._store)

    def _check(self, role: str) -> None:
        if role not in self.roles:
            raise ValueError(f"the {role!r} backbone is not among the backbones this method declared "
                             f"({self.roles}); add it to the method's train_roles")

    def _get(self, key: tuple, load):
        if key not in self._store:
            self._store[key] = load()
        return self._store[key]

    def _train(self, role: str) -> dict:
        passes = int(self.cfg["embed"]["train_passes"])
        return self._get(("train", role), lambda: E.get_embeddings(
            self.cfg, self.setting, role, "train", passes=passes, progress=self.progress))

    def embeddings(self, role: str) -> np.ndarray:
        """Train-split embeddings of backbone ``role``: ``(P, N, d)``."""
        self._check(role)
        return self._train(role)["emb"]

    @property
    def labels(self) -> np.ndarray:
        """Training-class labels of the train-split embeddings ``(N,)``."""
        return self._train(self.roles[0])["labels"]

    def classifier(self, role: str) -> torch.nn.Module:
        """The frozen classifier of backbone ``role`` (e.g. FastFill's cross-entropy term)."""
        self._check(role)
        return self._get(("classifier", role), lambda: TR.get_model(
            self.cfg, self.setting, role, progress=self.progress).classifier.eval())

    def _eval(self, role: str) -> dict:
        return self._get((self.split, role), lambda: E.get_embeddings(
            self.cfg, self.setting, role, self.split, progress=self.progress))

    def test(self, role: str) -> np.ndarray:
        """Embeddings of backbone ``role`` on the evaluation split (``split``): ``(N, d)``."""
        return self._eval(role)["emb"]

    @property
    def test_labels(self) -> np.ndarray:
        """Labels of the evaluation split (``split``)."""
        return self._eval("new")["labels"]


def train_roles() -> list[str]:
    """The backbones whose train-split embeddings some registered method trains from."""
    used = {r for n in MM.names() for r in MM.get(n).train_roles}
    return [r for r in MM.BACKBONES if r in used]


def prefetch_embeddings(cfg: dict, *, progress: bool = True) -> int:
    """Compute the missing embeddings of every setting in worker processes
    (:func:`backfill_utils.embed.prefetch`): the test split of every backbone and the
    train split of :func:`train_roles`; returns how many were computed. The series'
    galleries notebook calls it first, then reads them as usual."""
    passes = int(cfg["embed"]["train_passes"])
    wanted = [(s, r, "test", 1) for s in cfg["settings"] for r in MM.BACKBONES]
    wanted += [(s, r, "train", passes) for s in cfg["settings"] for r in train_roles()]
    return E.prefetch(cfg, wanted, progress=progress)


def cache_train_embeddings(cfg: dict, setting: str, *, progress: bool = True) -> dict[str, tuple]:
    """Compute (or load) the train-split embeddings of every backbone of :func:`train_roles`;
    returns their shapes ``{role: (P, N, d)}``."""
    data = SettingData(cfg, setting, progress=progress)
    return {r: data.embeddings(r).shape for r in train_roles()}


# --------------------------------------------------------------------------- training
def resolve_recipe(cfg: dict, name: str, recipe: Any = None, seed: int | None = None) -> tuple[Any, int]:
    """The recipe and seed a training of ``name`` uses.

    No ``recipe``: the method's default from the profile (seeded with the profile's
    ``seed``). A :class:`~backfill_utils.compat.recipes.Recipe` keeps its own ``seed`` field
    unless ``seed`` is given, which then replaces it.
    """
    m = MM.get(name)
    if recipe is None:
        recipe = m.default_recipe(cfg)
        seed = int(cfg["seed"]) if seed is None else int(seed)
    elif seed is None:
        seed = int(getattr(recipe, "seed", cfg["seed"]))
    if isinstance(recipe, Recipe) and recipe.seed != seed:
        recipe = recipe.replace(seed=int(seed))
    return recipe, int(seed)


def compat_key(cfg: dict, setting: str, name: str, recipe: Any = None, seed: int | None = None) -> dict:
    """The cache key of a method's trained modules (everything they depend on)."""
    m = MM.get(name)
    recipe, seed = resolve_recipe(cfg, name, recipe, seed)
    return {"method": name, "version": int(m.version), "recipe": MM.recipe_key(recipe), "seed": seed,
            "train": {r: E.embedding_spec(cfg, setting, r) for r in m.train_roles},
            "passes": int(cfg["embed"]["train_passes"])}


def trained_to_arrays(name: str, trained: MM.Trained, slots: tuple[str, ...]) -> dict:
    """A method's trained modules (state dict + config per slot) and history as the arrays of a
    cache file; an error naming the method if a module cannot be rebuilt from its config."""
    if not isinstance(trained, MM.Trained):
        raise TypeError(f"the fit of {name!r} must return a methods.Trained, got {type(trained).__name__}")
    got = tuple(trained.modules())
    if set(got) != set(slots):
        raise ValueError(f"the fit of {name!r} returned modules for slots {got}, but the method declares "
                         f"slots={slots}")
    out = {}
    for slot, module in trained.modules().items():
        config = getattr(module, "config", None)
        try:
            K.build_module(config)
        except Exception as exc:  # noqa: BLE001 - any failure: the cache could not rebuild it
            raise ValueError(
                f"the {slot} module of {name!r} ({type(module).__name__}) cannot be rebuilt from its "
                f"config ({exc}); give it a `config` dict and register its class with "
                "compat.register_module") from None
        out[f"{slot}::config"] = np.array(json.dumps(config, sort_keys=True))
        for key, value in module.state_dict().items():
            out[f"{slot}::state::{key}"] = value.detach().cpu().numpy()
    if trained.history is not None:
        out.update(io.frame_to_arrays(trained.history, "history::"))
    return out


def trained_from_arrays(arrays: dict) -> MM.Trained:
    """The inverse of :func:`trained_to_arrays`: the modules rebuilt (eval mode) and the history."""
    modules = {}
    for slot in MM.SLOTS:
        if f"{slot}::config" not in arrays:
            continue
        module = K.build_module(json.loads(str(arrays[f"{slot}::config"])))
        prefix = f"{slot}::state::"
        module.load_state_dict({k[len(prefix):]: torch.from_numpy(np.array(v))
                                for k, v in arrays.items() if k.startswith(prefix)})
        modules[slot] = module.eval()
    history = io.arrays_to_frame(arrays, "history::") if "history::columns" in arrays else None
    return MM.Trained(**modules, history=history)


def train_method(cfg: dict, setting: str, name: str, *, recipe: Any = None, seed: int | None = None,
                 data: SettingData | None = None, progress: bool = True) -> MM.Trained:
    """Train (or load from the cache) the modules of method ``name`` in ``setting``.

    ``recipe``: the method's hyperparameters (default: :meth:`Method.default_recipe`
    of the profile); ``seed``: the training seed (see :func:`resolve_recipe`).
    Returns a :class:`~backfill_utils.backfill.registry.Trained` whose modules are rebuilt from
    the cache (eval mode), so a first call and a later one give the same modules.
    """
    m = MM.get(name)
    if m.fit is None:
        raise ValueError(f"method {name!r} has nothing to train; trainable methods: "
                         f"{[n for n in MM.names() if MM.get(n).trainable]}")
    recipe, seed = resolve_recipe(cfg, name, recipe, seed)

    def compute():
        d = (data or SettingData(cfg, setting, progress=progress)).restricted(m.train_roles, seed)
        return trained_to_arrays(name, m.fit(d, recipe), m.slots)

    arrays = cache.cached_arrays("compat", compat_key(cfg, setting, name, recipe, seed), compute,
                              what=f"the trained modules of {name} ({setting} setting)")
    return trained_from_arrays(arrays)


# --------------------------------------------------------------------------- systems
def build_system(cfg: dict, setting: str, name: str, *, recipe: Any = None, seed: int | None = None,
                 data: SettingData | None = None, progress: bool = True) -> BS.BackfillSystem:
    """The :class:`~backfill_utils.backfill.systems.BackfillSystem` of method ``name`` on the
    setting's test split (its modules trained or loaded by :func:`train_method`)."""
    m = MM.get(name)
    if m.reference is not None:
        raise ValueError(f"{name!r} is a reference curve ({m.reference}), not a backfilling system")
    data = data or SettingData(cfg, setting, progress=progress)
    trained = (train_method(cfg, setting, name, recipe=recipe, seed=seed, data=data, progress=progress)
               if m.trainable else MM.Trained())
    return EV.system_of(m, data, trained, int(cfg["eval"]["order_seed"]))


def build_systems(cfg: dict, setting: str, names=None, *, progress: bool = True):
    """Systems of ``names`` (default: every registered method but the references) and
    ``refs``: ``labels``, the ``old``/``new`` test embeddings, ``extra_params`` per method."""
    names = [n for n in (names or MM.names()) if MM.get(n).reference is None]
    data = SettingData(cfg, setting, progress=progress)
    systems = {n: build_system(cfg, setting, n, data=data, progress=progress) for n in names}
    extra = {n: (train_method(cfg, setting, n, data=data, progress=progress).n_params
                 if MM.get(n).trainable else 0) for n in names}
    refs = {"labels": data.test_labels, "old": data.test("old"), "new": data.test("new"),
            "extra_params": extra}
    return systems, refs


# --------------------------------------------------------------------------- curves
def _curve_key(cfg: dict, setting: str, name: str, recipe: Any, seed: int | None, split: str) -> dict:
    m = MM.get(name)
    roles = sorted({"old", "new", m.backbone})
    return {"setting": setting, "method": name, "version": int(m.version), "split": split,
            "test": {r: E.embedding_spec(cfg, setting, r) for r in roles},
            "trained": compat_key(cfg, setting, name, recipe, seed) if m.trainable else None,
            "eval": cfg["eval"]}


def method_curve(cfg: dict, setting: str, name: str, *, recipe: Any = None, seed: int | None = None,
                 split: str = "test", data: SettingData | None = None, progress: bool = True,
                 _refs: EV.References | None = None) -> tuple[pd.DataFrame, dict]:
    """The backfilling curve of one method and its summary row; cached per method
    (kind ``"curves"``), trained first if needed (:func:`train_method`).

    ``split``: the gallery (= queries, leave-one-out) it is evaluated on, ``"test"`` or
    ``"val"`` (the validation split held out of the training images, for tuning);
    ``data``, when given, must be of that split.

    Returns ``(curve, row)``: the curve with columns ``ratio, n_backfilled, mAP, top1,
    top5, negative_flips, negative_flips_vs_old`` (the references have fewer) and the
    row ``method, query_passes, extra_params`` plus
    :func:`~backfill_utils.backfill.curves.summarize_curve`'s numbers.
    """
    m = MM.get(name)
    if data is not None and data.split != split:
        raise ValueError(f"method_curve(split={split!r}) was given data of the {data.split!r} split")

    def compute():
        d = data or SettingData(cfg, setting, progress=progress, split=split)
        trained = (train_method(cfg, setting, name, recipe=recipe, seed=seed, data=d, progress=progress)
                   if m.trainable else MM.Trained())
        curve, row = EV.curve_and_row(m, d, _refs or EV.References(d), ratios(cfg), trained,
                                      int(cfg["eval"]["order_seed"]))
        return {**io.frame_to_arrays(curve, "curve::"), **io.frame_to_arrays(pd.DataFrame([row]), "row::")}

    arrays = cache.cached_arrays("curves", _curve_key(cfg, setting, name, recipe, seed, split), compute,
                              what=f"the backfilling curve of {name} in the {setting} setting"
                                   + (f" ({split} split)" if split != "test" else "")
                                   + (f" (seed {seed})" if seed is not None else ""))
    row = io.arrays_to_frame(arrays, "row::").iloc[0].to_dict()
    return io.arrays_to_frame(arrays, "curve::"), row


def evaluate_setting(cfg: dict, setting: str, names=None, *, seed: int | None = None, split: str = "test",
                     progress: bool = True):
    """Curves (long table, column ``method`` first) and summary (one row per method) of
    ``names`` (default: every registered method) in ``setting``; each curve cached.
    ``seed``: the training seed of the trained methods (default: the profile's);
    ``split``: the evaluation split (:data:`EVAL_SPLITS`)."""
    data = SettingData(cfg, setting, progress=progress, split=split)
    refs = EV.References(data)

    def curve_of(n: str):
        s = seed if MM.get(n).trainable else None
        return method_curve(cfg, setting, n, seed=s, split=split, data=data, progress=progress, _refs=refs)

    return EV.evaluate_methods(list(names or MM.names()), curve_of)


def evaluate_all(cfg: dict, names=None, *, seed: int | None = None,
                 progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Curves of every setting (``{setting: curves}``) and the long summary table
    (columns ``dataset`` and ``setting`` added); ``seed``: as in :func:`evaluate_setting`."""
    curves, summaries = {}, []
    for s in cfg["settings"]:
        c, summ = evaluate_setting(cfg, s, names, seed=seed, progress=progress)
        curves[s] = c
        summaries.append(summ.assign(dataset=cfg["dataset"], setting=s))
    return curves, pd.concat(summaries, ignore_index=True)


def gallery_quality(cfg: dict, *, progress: bool = True) -> pd.DataFrame:
    """old/old, new/new and BCT/BCT retrieval quality (leave-one-out) per setting."""
    rows = []
    for s in cfg["settings"]:
        for role in MM.BACKBONES:
            e = E.get_embeddings(cfg, s, role, "test", progress=progress)
            r = MT.evaluate_retrieval(e["emb"], e["labels"], e["emb"], e["labels"], exclude_self=True)
            rows.append({"dataset": cfg["dataset"], "setting": s, "model": f"{role}/{role}",
                         "trained_classes": TR.model_spec(cfg, s, role)["num_classes"],
                         "test_classes": len(set(e["labels"].tolist())), "queries": len(e["labels"]),
                         "mAP": r["mAP"], "top1": r["top1"], "top5": r["top5"]})
    return pd.DataFrame(rows)
