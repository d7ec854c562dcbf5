"""Your own two models: their embeddings in ``.npy`` files, the paper's modules trained on them.

``notebooks/61_your_own_models.ipynb`` runs the package on embeddings that someone's own
old and new models made. Six files (:data:`FILES`), each a numpy ``.npy`` array:

==================  ============  ==================================================
name                shape         what
==================  ============  ==================================================
``old_train``       ``(N, d_o)``  the old model's embeddings of the training images
``new_train``       ``(N, d_n)``  the new model's embeddings of the same images
``train_labels``    ``(N,)``      their class labels (integers)
``old_test``        ``(M, d_o)``  the old model's embeddings of the test images
``new_test``        ``(M, d_n)``  the new model's embeddings of the same images
``test_labels``     ``(M,)``      their labels: the test set is gallery and queries
                                  (leave-one-out, as in the paper's protocol)
==================  ============  ==================================================

:func:`load_own_embeddings` checks everything **before any training**: a missing file,
an unreadable one, a wrong number of dimensions, mismatched lengths or embedding
dimensions, NaN or infinite values, non-integer labels, a test class with a single
image are errors that name the file and say what to do. Embeddings are L2-normalised
(the project's metric is the Euclidean distance of unit vectors; ``normalize=False``
keeps them as they are).

:func:`evaluate_own` trains every method of the registry's ``main`` group that needs
only the two models' embeddings (the paper's psi and rho, RM+psi, FCT, ...; a method
that needs a classifier or a backward-compatible backbone is listed as skipped) with
its default recipe of the profile, caches the trained modules by the content of the
training files, and evaluates every method's backfilling curve with the loop of
:mod:`backfill_utils.backfill.evaluate` (the one the profile's curves use; :class:`OwnData` is
the :class:`~backfill_utils.backfill.evaluate.EmbeddingSource` of own embeddings).
:func:`export_profile_embeddings` writes the profile's cached embeddings as such files
(the notebook's default, so that it runs offline). :func:`own_run_name` names the
folder of a run on own files (``<run folder>/own_models/<name>/``), apart from the
series' outputs.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from .. import cache, io
from ..backfill import evaluate as EV
from ..backfill import experiments as X
from ..backfill import orders
from ..backfill import registry as MM

__all__ = ["FILES", "own_run_name", "OwnEmbeddings", "NeedsClassifier", "OwnData", "load_own_embeddings", "check_own_embeddings",
           "export_profile_embeddings", "train_own", "evaluate_own", "export_modules", "served_index"]

FILES = ("old_train", "new_train", "train_labels", "old_test", "new_test", "test_labels")
_EMB = ("old_train", "new_train", "old_test", "new_test")
OWN_VERSION = 1  # in the cache keys of modules trained on own embeddings: bump when training here changes


# under <run folder>/own_models/: the outputs of the run on the profile's exported embeddings
RESERVED_NAMES = ("embeddings", "modules", "index_ours.npz")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


def own_run_name(paths: Mapping[str, Any], name: str | None = None) -> str | None:
    """The name of a run on own embeddings, which names its folder
    (``<run folder>/own_models/<name>/``, :func:`backfill_utils.session.setup`'s ``own``):
    ``name`` if given, else ``<folder of the files>_<hash of their paths>``; ``None`` when
    no path is given (the profile's exported embeddings, written with the series' outputs).
    Some paths but not all, or a name that is not a plain folder name, is an error.

    >>> own_run_name(dict.fromkeys(FILES)) is None
    True
    >>> own_run_name({n: f"/data/clip_vs_dino/{n}.npy" for n in FILES}).startswith("clip_vs_dino_")
    True
    >>> own_run_name({n: f"/data/x/{n}.npy" for n in FILES}, name="clip-v2")
    'clip-v2'
    """
    unknown = sorted(set(paths) - set(FILES))
    if unknown:
        raise ValueError(f"unknown file name(s) {unknown}; the files are {list(FILES)}")
    given = {n: paths.get(n) for n in FILES if paths.get(n) not in (None, "")}
    if not given:
        if name is not None:
            raise ValueError(f"name={name!r} names a run on your own embeddings: give the six paths too "
                             f"({list(FILES)})")
        return None
    if len(given) < len(FILES):
        raise ValueError(f"no path given for {[n for n in FILES if n not in given]}; give a .npy file for each of "
                         f"{list(FILES)} (or none: the profile's cached embeddings)")
    if name is not None:
        text = str(name)
        if not _RUN_NAME.match(text) or text in RESERVED_NAMES:
            raise ValueError(f"name {text!r} must be a plain folder name (letters, digits, '_', '-', '.', '+'), not "
                             f"one of {list(RESERVED_NAMES)}")
        return text
    full = [str(Path(given[n]).expanduser().resolve()) for n in FILES]
    parents = {str(Path(f).parent) for f in full}
    folder = Path(parents.pop()).name if len(parents) == 1 else "own"
    folder = re.sub(r"[^A-Za-z0-9_.+-]", "_", folder).lstrip("._+-")[:60] or "own"
    return f"{folder}_{hashlib.sha256(chr(0).join(full).encode()).hexdigest()[:8]}"


class NeedsClassifier(LookupError):
    """A method asked for a backbone's classifier, which own embeddings do not have."""


@dataclass
class OwnEmbeddings:
    """Checked own embeddings (:func:`load_own_embeddings`); float32 embeddings, int64 labels."""

    old_train: np.ndarray
    new_train: np.ndarray
    train_labels: np.ndarray
    old_test: np.ndarray
    new_test: np.ndarray
    test_labels: np.ndarray

    def digest(self, names=FILES) -> str:
        """SHA-256 of the arrays ``names`` (shapes, dtypes and bytes): the cache key of training."""
        h = hashlib.sha256()
        for n in names:
            a = np.ascontiguousarray(getattr(self, n))
            h.update(f"{n}{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
        return h.hexdigest()


MAX_ROWS = 20_000_000  # items per file
MAX_DIM = 8192  # embedding dimension: the compatibility modules' weights grow with its square
MMAP_BYTES = 256 << 20  # files larger than this are memory-mapped
MAX_EXACT_LABEL = 2 ** 53  # float labels beyond this are not exact integers


def _read(name: str, path: Any) -> np.ndarray:
    if path is None or str(path) == "":
        raise ValueError(f"{name}: no path given; give a .npy file for each of {list(FILES)}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file {p}; give the path of a .npy file ({FILES.index(name) + 1} "
                                f"of {list(FILES)})")
    size = p.stat().st_size
    with open(p, "rb") as fh:
        shape, _ = io.npy_header(fh, f"{name}: {p}", size)
    rows = shape[0] if shape else 0
    if rows > MAX_ROWS or (len(shape) == 2 and shape[1] > MAX_DIM):
        raise ValueError(f"{name}: {p} has shape {shape}; at most {MAX_ROWS} rows and embeddings of dimension "
                         f"<= {MAX_DIM} are read (reduce the dimension, e.g. by PCA, or subsample the items)")
    try:  # large files are memory-mapped: only what the checks and training touch is read
        return np.load(p, allow_pickle=False, mmap_mode="r" if size > MMAP_BYTES else None)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{name}: {p} is not a readable .npy array without pickled objects ({exc}); "
                         "write it with numpy.save(path, array)") from None


def _embedding(name: str, x: np.ndarray, where: str, normalize: bool) -> np.ndarray:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} ({where}) must be a non-empty (n, d) array of embeddings, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} ({where}) must hold numbers, got dtype {x.dtype}")
    if x.shape[1] > MAX_DIM:
        raise ValueError(f"{name} ({where}) has dimension {x.shape[1]}; at most {MAX_DIM} is supported (the "
                         "compatibility modules' weights grow with its square): reduce it, e.g. by PCA")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} ({where}) has NaN or infinite values in {int(bad.sum())} rows (first rows: "
                         f"{np.flatnonzero(bad)[:5].tolist()}); fix or drop those items in every file")
    if normalize:
        norm = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
        if (norm == 0).any():
            raise ValueError(f"{name} ({where}) has {int((norm == 0).sum())} all-zero rows (first: "
                             f"{np.flatnonzero(norm[:, 0] == 0)[:5].tolist()}), which cannot be L2-normalised")
        x = (x / norm).astype(np.float32)
    return np.ascontiguousarray(x)


def _labels(name: str, y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{name} ({where}) must be a 1-D array of class labels, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all() and (np.abs(y) <= MAX_EXACT_LABEL).all()):
            raise ValueError(f"{name} ({where}) holds float labels that are not exact integers (NaN, fractions or "
                             f"beyond +-2**53, e.g. {y[~np.isfinite(y) | (y != np.round(y)) | (np.abs(y) > MAX_EXACT_LABEL)][:3].tolist()}); "
                             "save integer class labels")
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} ({where}) must hold integer class labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def check_own_embeddings(arrays: Mapping[str, Any], *, sources: Mapping[str, str] | None = None,
                         normalize: bool = True) -> OwnEmbeddings:
    """Check six arrays (:data:`FILES`) and return them as :class:`OwnEmbeddings`.

    ``sources``: where each came from (named in the errors). Every check of the module
    docstring; nothing is trained or written.

    >>> rng = np.random.default_rng(0)
    >>> a = {"old_train": rng.random((8, 3)), "new_train": rng.random((8, 4)), "train_labels": np.arange(8) % 2,
    ...      "old_test": rng.random((4, 3)), "new_test": rng.random((4, 5)), "test_labels": [0, 0, 1, 1]}
    >>> check_own_embeddings(a)
    Traceback (most recent call last):
    ...
    ValueError: new_test has dimension 5 but new_train has 4: both must come from the same (new) model
    """
    missing = [n for n in FILES if n not in arrays]
    if missing:
        raise ValueError(f"missing {missing}: give all of {list(FILES)}")
    src = {n: (sources or {}).get(n, "array") for n in FILES}
    out = {n: _embedding(n, np.asarray(arrays[n]), src[n], normalize) for n in _EMB}
    out.update({n: _labels(n, np.asarray(arrays[n]), src[n]) for n in ("train_labels", "test_labels")})
    for split in ("train", "test"):
        names = (f"old_{split}", f"new_{split}", f"{split}_labels")
        lengths = {n: len(out[n]) for n in names}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"mismatched lengths in the {split} split: {lengths}; row i of each file must be the "
                             "same image")
    for model in ("old", "new"):
        d_tr, d_te = out[f"{model}_train"].shape[1], out[f"{model}_test"].shape[1]
        if d_tr != d_te:
            raise ValueError(f"{model}_test has dimension {d_te} but {model}_train has {d_tr}: both must come "
                             f"from the same ({model}) model")
    classes, counts = np.unique(out["test_labels"], return_counts=True)
    if (counts < 2).any():
        raise ValueError(f"test_labels: classes {classes[counts < 2][:5].tolist()} have a single test image, which "
                         "has no relevant item when it is the query (leave-one-out); drop them or add images")
    if len(np.unique(out["train_labels"])) < 2:
        raise ValueError("train_labels: a single class; contrastive training needs at least two")
    return OwnEmbeddings(**out)


def load_own_embeddings(paths: Mapping[str, Any], *, normalize: bool = True) -> OwnEmbeddings:
    """Read the six ``.npy`` files ``paths`` (keys :data:`FILES`) and check them
    (:func:`check_own_embeddings`); every file is read before anything is trained."""
    unknown = sorted(set(paths) - set(FILES))
    if unknown:
        raise ValueError(f"unknown file name(s) {unknown}; the files are {list(FILES)}")
    arrays = {n: _read(n, paths.get(n)) for n in FILES}
    return check_own_embeddings(arrays, sources={n: str(paths[n]) for n in FILES}, normalize=normalize)


def export_profile_embeddings(cfg: dict, setting: str, folder: Any, *, progress: bool = False) -> dict[str, Path]:
    """Write the profile's cached embeddings of ``setting`` as the six files in ``folder``
    (atomically): train split pass 0 (the clean one) and the test split; returns the paths."""
    data = X.SettingData(cfg, setting, progress=progress)
    arrays = {"old_train": data.embeddings("old")[0], "new_train": data.embeddings("new")[0],
              "train_labels": data.labels, "old_test": data.test("old"), "new_test": data.test("new"),
              "test_labels": data.test_labels}
    folder = Path(folder)
    return {n: io.atomic_write(folder / f"{n}.npy", lambda p, a=a: np.save(p, np.asarray(a)))
            for n, a in arrays.items()}


class OwnData:
    """Own embeddings as an :class:`~backfill_utils.backfill.evaluate.EmbeddingSource` (like the
    profile's :class:`~backfill_utils.backfill.experiments.SettingData`): ``embeddings("old" |
    "new")`` ``(N, d)`` and ``labels`` of the training files, ``test(role)`` and
    ``test_labels`` of the test files (split ``"test"``); ``classifier`` and any backbone
    other than old and new raise :class:`NeedsClassifier`."""

    split = "test"

    def __init__(self, emb: OwnEmbeddings, *, progress: bool = True, roles: tuple[str, ...] = ("old", "new")) -> None:
        self.emb, self.progress, self.roles = emb, progress, tuple(roles)

    def restricted(self, roles, seed: int | None = None) -> "OwnData":
        """The same embeddings limited to the backbones ``roles`` (``seed``: unused, the
        embeddings do not depend on it)."""
        return OwnData(self.emb, progress=self.progress, roles=tuple(roles))

    def _role(self, role: str) -> str:
        if role not in ("old", "new"):
            raise NeedsClassifier(f"own embeddings come from two models (old, new), not from a {role!r} backbone")
        return role

    def _train_role(self, role: str) -> str:
        if self._role(role) not in self.roles:
            raise ValueError(f"the {role!r} model is not among the backbones this method declared ({self.roles}); "
                             "add it to the method's train_roles")
        return role

    def embeddings(self, role: str) -> np.ndarray:
        return getattr(self.emb, f"{self._train_role(role)}_train")

    @property
    def labels(self) -> np.ndarray:
        return self.emb.train_labels

    def classifier(self, role: str):
        raise NeedsClassifier(f"own embeddings have no classifier of the {role!r} model")

    def test(self, role: str) -> np.ndarray:
        return getattr(self.emb, f"{self._role(role)}_test")

    @property
    def test_labels(self) -> np.ndarray:
        return self.emb.test_labels


def _own_key(emb: OwnEmbeddings, cfg: dict, name: str) -> dict:
    recipe, seed = X.resolve_recipe(cfg, name)
    return {"own_models": OWN_VERSION, "train": emb.digest(("old_train", "new_train", "train_labels")),
            "method": name, "version": int(MM.get(name).version), "recipe": MM.recipe_key(recipe), "seed": seed}


def train_own(emb: OwnEmbeddings, cfg: dict, name: str, *, progress: bool = True) -> MM.Trained:
    """Train method ``name`` (its default recipe of the profile ``cfg``) on own
    embeddings, or load it from the cache (key: the training arrays' content, the method,
    its recipe). Raises :class:`NeedsClassifier` for a method that needs more than the
    two models' embeddings."""
    m = MM.get(name)
    if m.fit is None:
        raise ValueError(f"method {name!r} has nothing to train")
    if set(m.train_roles) - {"old", "new"}:
        raise NeedsClassifier(f"{name} trains from the {m.train_roles} backbones")
    recipe, _ = X.resolve_recipe(cfg, name)

    def compute():
        trained = m.fit(OwnData(emb, progress=progress).restricted(m.train_roles), recipe)
        return X.trained_to_arrays(name, trained, m.slots)

    arrays = cache.cached_arrays("compat", _own_key(emb, cfg, name), compute,
                              what=f"the modules of {name} trained on own embeddings")
    return X.trained_from_arrays(arrays)


def _train_job(paths: dict, cfg: dict, name: str, normalize: bool) -> None:
    """A worker process's job (:mod:`backfill_utils.parallel`): read the files, train, cache."""
    try:
        train_own(load_own_embeddings(paths, normalize=normalize), cfg, name, progress=False)
    except NeedsClassifier:
        pass


def _pretrain(paths: Mapping[str, Any] | None, emb: OwnEmbeddings, cfg: dict, names, normalize: bool,
              progress: bool) -> None:
    """Train the package's own registrations of ``names`` in ``$BACKFILL_WORKERS`` worker
    processes (each reads ``paths``, the files ``emb`` came from), so that the caller's
    :func:`train_own` reads them from the cache; nothing happens with one worker."""
    from .. import parallel

    if paths is None or parallel.workers() < 2:
        return
    todo = [n for n in names if MM.get(n).trainable and MM.is_builtin(n)
            and not cache.cache_path("compat", _own_key(emb, cfg, n)).is_file()]
    if len(todo) > 1:
        jobs = [({k: str(v) for k, v in paths.items()}, cfg, n, normalize) for n in todo]
        parallel.run_jobs(_train_job, jobs, desc="train on own embeddings", progress=progress, labels=todo)


def _plan(names, emb: OwnEmbeddings) -> tuple[list[str], dict[str, str]]:
    """Methods of ``names`` that own embeddings can serve, and the skipped ones with why."""
    keep, skipped = [], {}
    d_old, d_new = emb.old_test.shape[1], emb.new_test.shape[1]
    for n in names:
        m = MM.get(n)
        if m.backbone not in ("old", "new"):
            skipped[n] = f"needs the {m.backbone!r} backbone (a backward-compatible new model)"
        elif (m.reference is None and not m.two_pass and not {"psi", "h"} & set(m.slots) and d_old != d_new):
            skipped[n] = f"compares new queries with old embeddings: needs d_old = d_new ({d_old} != {d_new})"
        else:
            keep.append(n)
    return keep, skipped


def evaluate_own(emb: OwnEmbeddings, cfg: dict, names=None, *, paths: Mapping[str, Any] | None = None,
                 normalize: bool = True, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict, dict]:
    """Curves and summary of ``names`` on own embeddings (default: the package's own
    registrations of the ``main`` group; a method registered in a notebook joins when
    named, so that one registered by another notebook of the same kernel does not).

    Returns ``(curves, summary, trained, skipped)``: the long curve table (``method``
    first, the columns of :func:`backfill_utils.backfill.experiments.method_curve`), one summary
    row per method (``query_passes``, ``extra_params`` and
    :func:`~backfill_utils.backfill.curves.summarize_curve`), ``{name: Trained}`` of the trained
    methods and ``{name: reason}`` of the skipped ones. Ratios and backfill order: the
    profile's (``eval``). ``paths`` (the files ``emb`` was read from, with ``normalize``
    as read): train in ``$BACKFILL_WORKERS`` processes first (the same modules as here).
    """
    keep, skipped = _plan(list(names or [n for n in MM.names("main") if MM.is_builtin(n)]), emb)
    _pretrain(paths, emb, cfg, keep, normalize, progress)
    data = OwnData(emb, progress=progress)
    refs, r, seed = EV.References(data), X.ratios(cfg), int(cfg["eval"]["order_seed"])
    trained: dict[str, MM.Trained] = {}

    def curve_of(n: str):
        m = MM.get(n)
        if m.trainable:
            try:
                trained[n] = train_own(emb, cfg, n, progress=progress)
            except NeedsClassifier as exc:
                skipped[n] = f"needs more than embeddings ({exc})"
                return None
        return EV.curve_and_row(m, data, refs, r, trained.get(n, MM.Trained()), seed)

    curves, summary = EV.evaluate_methods(keep, curve_of)
    return curves, summary, trained, skipped


def export_modules(trained: Mapping[str, MM.Trained], folder: Any) -> list[Path]:
    """Write every trained module as ``<folder>/<method>_<slot>.{pt,json}`` (state dict
    and config, :func:`backfill_utils.compat.modules.save_module`; ``compat.load_module`` reads
    it back). Characters other than letters, digits, ``-`` and ``_`` in a method's name
    become ``_``. Returns the ``.pt`` paths."""
    from ..compat import modules as K

    out = []
    for name, t in trained.items():
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        for slot, module in t.modules().items():
            out.append(K.save_module(module, Path(folder) / f"{stem}_{slot}")[0])
    return out


def served_index(emb: OwnEmbeddings, cfg: dict, name: str, trained: MM.Trained | None, ratio: float, **kwargs):
    """The :class:`~backfill_utils.serve.index.OnlineBackfillIndex` of method ``name`` over the
    own test gallery (ids = rows), backfilled to ``ratio`` in the method's order
    (:func:`backfill_utils.backfill.orders.method_order`, as in :func:`evaluate_own`); ``kwargs``: the index's (``factory``, ...)."""
    from ..serve.index import OnlineBackfillIndex
    from ..serve.from_method import index_arguments

    m = MM.get(name)
    index = OnlineBackfillIndex(emb.old_test.shape[1], emb.new_test.shape[1],
                                **index_arguments(m, trained or MM.Trained()), **kwargs)
    n = len(emb.test_labels)
    index.add_old(np.arange(n), emb.old_test)
    order = orders.method_order(m, trained or MM.Trained(), emb.old_test, int(cfg["eval"]["order_seed"]))
    batch = order[:orders.backfilled_count(ratio, n)]
    index.backfill(batch, emb.new_test[batch])
    return index
