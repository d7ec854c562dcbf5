"""Embedding extraction, cached.

Embeddings are stored in the artifact cache of :mod:`backfill_utils.io` under
the kind ``"embeddings"``; the key holds everything they depend on (the model's
full training spec and whether its output is L2-normalised, :func:`embedding_spec`;
the split, the classes, the number of augmented passes, the seed) and io adds the code versions (``train.TRAIN_VERSION``,
:data:`EMBED_VERSION`), so nothing stale is ever served. ``cached_arrays`` and
``cache_path`` are re-exported from :mod:`backfill_utils.io` for older callers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import config as C
from . import train as TR
from .cache import cache_path, cached_arrays
from .data import api as D

# Bump when a change of this module (extraction, the passes' seeding, the transforms it
# picks) changes the embeddings it returns.
EMBED_VERSION = 1


def embedding_spec(cfg: dict, setting: str, role: str) -> dict:
    """What the embeddings of model ``role`` depend on, for cache keys: the backbone's
    training spec (:func:`backfill_utils.train.model_spec`, the backbone's own key) plus
    ``normalize_embeddings: false`` when the profile turns normalisation off. With the
    default (normalised) it is the training spec itself, so keys made before the profile
    key existed stay valid; either way a change of the key changes the spec."""
    spec = TR.model_spec(cfg, setting, role)
    return spec if C.normalize_embeddings(cfg) else {**spec, "normalize_embeddings": False}


@torch.no_grad()
def extract(model: torch.nn.Module, dataset, *, batch_size: int = 512, device=None,
            progress: bool = True, desc: str = "embed", normalize: bool = True) -> np.ndarray:
    """Embed every item of ``dataset`` (in order) with ``model.embed`` (L2-normalised unless
    ``normalize=False``); float32 (N, d)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress):
        out.append(model.embed(x.to(device), normalize=normalize).float().cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)


#: Splits that can be embedded: ``train`` (the fit part of the training split), ``val`` (the
#: validation images held out of the training split, :mod:`backfill_utils.data.splits`), ``test``.
SPLITS = ("train", "val", "test")


def _split_dataset(cfg: dict, split: str, classes, augment: bool):
    """The items of ``split`` (:data:`SPLITS`) of the profile's dataset in ``classes``.

    ``train`` and ``val`` are the two parts of the dataset's training split
    (:func:`backfill_utils.data.splits.training_part` with the profile's ``val_fraction``);
    ``test`` is the dataset's test split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = cfg["dataset"]
    opts = cfg.get("dataset_options") or {}
    info = D.dataset_info(name, root=cfg.get("data_root"), **opts)
    tf = (D.train_transform if augment else D.test_transform)(
        name, info["image_size"], mean=info["mean"], std=info["std"])
    source = "test" if split == "test" else "train"
    full = D.get_dataset(name, source, root=cfg.get("data_root"), transform=tf,
                         download=bool(cfg.get("download")), **opts)
    if split == "test":
        # test classes of the open-class setting are not a prefix (no classifier reads them)
        return D.subset_by_classes(full, classes, require_prefix=False)
    part = "fit" if split == "train" else "val"
    return D.training_part(full, classes, part, **TR.holdout(cfg))


def _key(cfg: dict, setting: str, role: str, split: str, passes: int) -> tuple[list, int, dict]:
    """The classes, the number of passes and the cache key of :func:`get_embeddings`."""
    classes = TR.setting_classes(cfg, setting)
    cls = classes["test_classes"] if split == "test" else classes["new_classes"]
    n_pass = int(passes) if split == "train" else 1
    key = {"model": embedding_spec(cfg, setting, role), "split": split, "classes": list(map(int, cls)), "passes": n_pass,
           "seed": int(cfg["seed"]), "holdout": TR.holdout(cfg)}
    return cls, n_pass, key


def _prefetch_job(cfg: dict, setting: str, role: str, split: str, passes: int) -> None:
    get_embeddings(cfg, setting, role, split, passes=passes, progress=False)


def prefetch(cfg: dict, wanted, *, progress: bool = True, n_workers: int | None = None) -> int:
    """Compute the missing embeddings of ``wanted`` -- ``(setting, role, split, passes)``
    tuples -- in ``$BACKFILL_WORKERS`` worker processes, one job per distinct cache
    entry (two settings that share a model share its embeddings); returns the number of
    entries computed. Each extraction is seeded by its own arguments and runs with the
    same threads, so the arrays equal those of :func:`get_embeddings` called here; a
    later call of it reads them from the cache."""
    from . import parallel

    jobs, costs, labels, seen = [], [], [], set()
    for setting, role, split, passes in wanted:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        _, n_pass, key = _key(cfg, setting, role, split, passes)
        path = cache_path("embeddings", key)
        if path in seen or path.is_file():
            continue
        seen.add(path)
        model = TR.model_spec(cfg, setting, role)["model"]
        jobs.append((cfg, setting, role, split, int(passes)))
        costs.append(n_pass * (model.get("width", 64) / 16) ** 2 * (1.0 if split == "train" else 0.3))
        labels.append(f"{setting}/{role}/{split}")
    if jobs:
        parallel.run_jobs(_prefetch_job, jobs, cost=costs, n_workers=n_workers, desc="embed",
                          progress=progress, labels=labels)
    return len(jobs)


def get_embeddings(cfg: dict, setting: str, role: str, split: str, *,
                   passes: int = 1, progress: bool = True, device=None) -> dict[str, np.ndarray]:
    """Cached embeddings of model ``role`` of ``setting`` on ``split``.

    ``split="test"``: the setting's test classes, clean (test transform);
    returns ``emb`` (N, d) and ``labels`` (N,).
    ``split="val"``: the validation images held out of the training split (the new
    model's training classes, profile key ``val_fraction``), clean like the test split;
    ``emb`` (N, d). Hyperparameters are chosen on it, never on the test split.
    ``split="train"``: the rest of the training split of the new model's training
    classes (what the backbones trained on); pass 0 is clean and passes 1.. use the
    training augmentation (seeded per pass); returns ``emb`` (passes, N, d) and ``labels``.
    Embeddings are L2-normalised unless the profile's ``normalize_embeddings`` is false
    (then the embedding head's raw outputs).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if int(passes) < 1:
        raise ValueError(f"passes must be >= 1, got {passes!r}")
    spec = TR.model_spec(cfg, setting, role)
    cls, n_pass, key = _key(cfg, setting, role, split, passes)
    normalize = C.normalize_embeddings(cfg)

    def compute():
        model = TR.train(spec, data_root=cfg.get("data_root"), device=device, progress=progress,
                        download=bool(cfg.get("download")))
        embs = []
        for p in range(n_pass):
            ds = _split_dataset(cfg, split, cls, augment=p > 0)
            torch.manual_seed(int(cfg["seed"]) * 7919 + p)
            embs.append(extract(model, ds, device=device, progress=progress, normalize=normalize,
                                desc=f"embed {setting}/{role}/{split} pass {p}"))
        labels = np.asarray(ds.targets, dtype=np.int64)
        emb = np.stack(embs) if split == "train" else embs[0]
        return {"emb": emb, "labels": labels}

    what = f"the {split} embeddings of the {role} model of the {setting} setting"
    return cached_arrays("embeddings", key, compute, what=what)
