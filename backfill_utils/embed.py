"""Embedding extraction and the artifact cache.

Every expensive array artifact is stored as ``<cache>/<kind>/<hash>.npz`` where
``<hash>`` is ``config_hash`` of a key that contains everything the artifact
depends on (for embeddings: the model's full training spec, the split, the
classes, the transform and the number of augmented passes). A changed
parameter therefore changes the key and is a cache miss: nothing stale is ever
served. Files are written to a temporary name and moved into place with
``os.replace``, so an interrupted write leaves no partial artifact. The key is
stored beside the arrays (``<hash>.json``) for provenance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import config as C
from . import data as D
from . import train as T


def cache_path(kind: str, key: Mapping) -> Path:
    return C.cache_dir() / kind / f"{C.config_hash(dict(key))}.npz"


def cached_arrays(
    kind: str, key: Mapping, compute: Callable[[], Mapping[str, np.ndarray]], *, refresh: bool = False
) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``(kind, key)``, computing and storing them on a miss."""
    path = cache_path(kind, key)
    if path.is_file() and not refresh:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    bad = [k for k, v in arrays.items() if v.dtype == object]
    if bad:
        raise TypeError(f"cached_arrays({kind!r}): arrays {bad} have dtype object, which cannot be "
                        "stored without pickle; convert them to numbers or str first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = path.with_suffix(".json")
    tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(dict(key), indent=1, sort_keys=True, default=str))
    os.replace(tmp_meta, meta)
    return arrays


@torch.no_grad()
def extract(model: torch.nn.Module, dataset, *, batch_size: int = 512, device=None,
            progress: bool = True, desc: str = "embed") -> np.ndarray:
    """Embed every item of ``dataset`` (in order) with ``model.embed``; float32 (N, d)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    out = []
    for x, _ in tqdm(loader, desc=desc, disable=not progress):
        out.append(model.embed(x.to(device)).float().cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def _split_dataset(cfg: dict, split: str, classes, augment: bool):
    name = cfg["dataset"]
    opts = cfg.get("dataset_options") or {}
    info = D.dataset_info(name, root=cfg.get("data_root"), **opts)
    tf = (D.train_transform if augment else D.test_transform)(
        name, info["image_size"], mean=info["mean"], std=info["std"])
    full = D.get_dataset(name, split, root=cfg.get("data_root"), transform=tf, **opts)
    # test classes of the open-class setting are not a prefix (no classifier reads them)
    return D.subset_by_classes(full, classes, require_prefix=split == "train")


def get_embeddings(cfg: dict, setting: str, role: str, split: str, *,
                   passes: int = 1, progress: bool = True, device=None) -> dict[str, np.ndarray]:
    """Cached embeddings of model ``role`` of ``setting`` on ``split``.

    ``split="test"``: the setting's test classes, clean (test transform);
    returns ``emb`` (N, d) and ``labels`` (N,).
    ``split="train"``: the new model's training classes; pass 0 is clean and
    passes 1.. use the training augmentation (seeded per pass); returns ``emb``
    (passes, N, d) and ``labels``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if int(passes) < 1:
        raise ValueError(f"passes must be >= 1, got {passes!r}")
    spec = T.model_spec(cfg, setting, role)
    classes = T.setting_classes(cfg, setting)
    cls = classes["test_classes"] if split == "test" else classes["new_classes"]
    n_pass = int(passes) if split == "train" else 1
    key = {"model": spec, "split": split, "classes": list(map(int, cls)), "passes": n_pass,
           "seed": int(cfg["seed"])}

    def compute():
        model = T.train(spec, data_root=cfg.get("data_root"), device=device, progress=progress)
        embs = []
        for p in range(n_pass):
            ds = _split_dataset(cfg, split, cls, augment=p > 0)
            torch.manual_seed(int(cfg["seed"]) * 7919 + p)
            embs.append(extract(model, ds, device=device, progress=progress,
                                desc=f"embed {setting}/{role}/{split} pass {p}"))
        labels = np.asarray(ds.targets, dtype=np.int64)
        emb = np.stack(embs) if split == "train" else embs[0]
        return {"emb": emb, "labels": labels}

    return cached_arrays("embeddings", key, compute)
