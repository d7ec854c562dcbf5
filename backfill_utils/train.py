"""Training loops for the backbones: old, new and BCT models.

A *training spec* is a JSON-able dict that fixes everything a trained model
depends on (dataset, classes, architecture, recipe, seed, and for BCT the old
model's spec). Its hash names the checkpoint folder in the artifact cache, so a
changed parameter never serves a stale model.

Recipe: cross-entropy with label smoothing, SGD with momentum and a cosine
schedule (per iteration), seeded; mixed precision when CUDA is present.
Checkpoints are written atomically after every epoch, and an interrupted run
resumes from the last one and reaches the same weights as an uninterrupted run
(on CPU: data order and augmentation are re-seeded from (seed, epoch)).

Multi-GPU / multi-node: launch ``python -m backfill_utils.train`` under
``torchrun``; the loop uses DistributedDataParallel (NCCL on CUDA, gloo on CPU)
and a DistributedSampler; rank 0 writes the checkpoints. The global batch size
is split across processes.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import cache, io
from . import config as C
from .compat.losses import bct_influence_loss
from .data import api as D
from .models import EmbeddingNet, build_model

ROLES = ("old", "new", "bct")
SETTINGS = ("extended", "heterogeneous", "open")
# Bump when a change of this module, models.py or the BCT loss changes the trained
# weights: the model folders (model_dir) and every artifact computed from them change.
TRAIN_VERSION = 1


# --------------------------------------------------------------------------- specs
def _dataset_part(cfg: dict) -> dict:
    """The dataset's part of a training spec. For ``synthetic`` the generator's
    defaults are resolved into it, so that changing a default in code changes
    the cache key (nothing stale is served)."""
    options = dict(cfg.get("dataset_options") or {})
    part = {"name": cfg["dataset"], "options": options}
    if cfg["dataset"] == "synthetic":
        part["generator"] = {**D.synthetic_defaults(), **options}
        part["generator_version"] = int(D.SYNTHETIC_VERSION)
    else:  # two copies of one dataset in different folders never share models
        part["identity"] = D.dataset_identity(cfg["dataset"], cfg.get("data_root"), **options)
    return part


def setting_classes(cfg: dict, setting: str) -> dict:
    """Class lists (old, new, test) of a setting, from ``data.class_splits``."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose one of {SETTINGS}")
    info = D.dataset_info(cfg["dataset"], root=cfg.get("data_root"), **(cfg.get("dataset_options") or {}))
    split_setting = "open" if setting == "open" else "extended"
    return D.class_splits(
        info["num_classes"], setting=split_setting,
        old_fraction=cfg["old_fraction"], open_fraction=cfg["open_fraction"],
    )


def holdout(cfg: dict) -> dict:
    """The validation split of a profile: ``{"fraction": val_fraction, "seed": seed}``
    (:func:`backfill_utils.data.splits.validation_mask`); part of every model spec."""
    return {"fraction": float(cfg.get("val_fraction", 0.0)), "seed": int(cfg["seed"])}


def _partial(cfg: dict, key: str, base: dict) -> dict:
    """``base`` updated by the profile's optional mapping ``cfg[key]`` (``None``: unchanged);
    a key that ``base`` lacks is an error naming the known keys."""
    extra = cfg.get(key) or {}
    if not isinstance(extra, dict):
        raise ValueError(f"profile key {key} must be a mapping of keys to change or null, got {extra!r}")
    unknown = sorted(set(extra) - set(base))
    if unknown:
        raise ValueError(f"profile key {key}: unknown key(s) {unknown}; known keys: {sorted(base)}")
    return {**base, **extra}


def model_spec(cfg: dict, setting: str, role: str) -> dict:
    """The training spec of model ``role`` ("old", "new", "bct") in ``setting``.

    The old model uses ``backbone`` and ``train`` updated by the optional profile keys
    ``old_backbone`` / ``old_train`` (a weaker or stronger old model, e.g. ``{width: 8}``);
    every model trains on the ``"fit"`` part of the training split (``holdout``)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    classes = setting_classes(cfg, setting)
    arch_key = "new_backbone" if (setting == "heterogeneous" and role != "old") else "backbone"
    old_setting = "open" if setting == "open" else "extended"
    arch, recipe = dict(cfg[arch_key]), dict(cfg["train"])
    if role == "old":
        arch, recipe = _partial(cfg, "old_backbone", arch), _partial(cfg, "old_train", recipe)
    spec = {
        "dataset": _dataset_part(cfg),
        "num_classes": len(classes["old_classes"] if role == "old" else classes["new_classes"]),
        "model": dict(arch, embedding_dim=cfg["embedding_dim"]),
        "recipe": recipe,
        "seed": int(cfg["seed"]) + {"old": 0, "new": 1, "bct": 2}[role],
        "bct": None,
        "holdout": holdout(cfg),
    }
    if role == "old":
        # the old model does not depend on the new backbone: heterogeneous shares extended's
        spec["setting"] = old_setting
    else:
        spec["setting"] = setting
    if role == "bct":
        spec["bct"] = {"old": model_spec(cfg, old_setting, "old"), "weight": float(cfg["bct_weight"])}
    return spec


def model_dir(spec: dict) -> Path:
    """The cache folder of the model of ``spec``: a hash of the spec and of ``TRAIN_VERSION``
    (the synthetic generator's version is in the spec's dataset part)."""
    return C.cache_dir() / "models" / C.config_hash({"spec": spec, "train_version": TRAIN_VERSION})


def _describe(spec: dict) -> str:
    return f"the backbone of setting {spec['setting']!r} with {spec['num_classes']} classes (seed {spec['seed']})"


def is_trained(spec: dict) -> bool:
    """Whether the cache holds the finished model of ``spec`` and it matches its checksum
    (a corrupt one is reported and removed, :func:`io.verify_entry`, so it is trained again)."""
    path = model_dir(spec) / "model.pt"
    return path.is_file() and cache.verify_entry("models", _describe(spec), path) != "corrupt"


def _load_cached(spec: dict, device) -> EmbeddingNet | None:
    """The cached model of ``spec``, or ``None`` if it is absent or was corrupt (removed)."""
    folder = model_dir(spec)
    path = folder / "model.pt"
    if not path.is_file():
        return None
    state = cache.verify_entry("models", _describe(spec), path)
    if state == "corrupt":
        return None
    try:
        meta = json.loads((folder / "model.json").read_text())
        model = build_model(meta["config"])
        model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        cache.corrupt_entry("models", _describe(spec), path, f"it cannot be read ({type(exc).__name__}: {exc})")
        return None
    if state == "unchecked":
        io.record_checksum(path)
    return model.to(device).eval()


def load_model(spec: dict, device: str | torch.device = "cpu") -> EmbeddingNet:
    """Load a finished model from the cache (error if it was never trained; a corrupt one
    is an error naming the file and the notebook that trains it)."""
    model = _load_cached(spec, device)
    if model is None:
        raise cache.missing("models", _describe(spec), model_dir(spec) / "model.pt")
    return model


def load_history(spec: dict) -> pd.DataFrame:
    return pd.read_csv(model_dir(spec) / "history.csv")


# --------------------------------------------------------------------------- distributed
def _dist_setup(device):
    """Initialise torch.distributed when launched by torchrun; returns (rank, world, ddp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


# --------------------------------------------------------------------------- training
def build_train_dataset(spec: dict, data_root=None, download: bool = False):
    """The ``"fit"`` part of the training split of ``spec``'s dataset (its classes, the
    validation images of ``spec["holdout"]`` left out; :func:`backfill_utils.data.splits.training_part`)
    with the training augmentation; ``download``: torchvision datasets may be fetched into
    ``data_root``."""
    ds = spec["dataset"]
    info = D.dataset_info(ds["name"], root=data_root, **ds["options"])
    full = D.get_dataset(
        ds["name"], "train", root=data_root, download=download,
        transform=D.train_transform(ds["name"], info["image_size"], mean=info["mean"], std=info["std"]),
        **ds["options"],
    )
    hold = spec.get("holdout") or {"fraction": 0.0, "seed": 0}
    return D.training_part(full, list(range(spec["num_classes"])), "fit", **hold)


def _bct_teacher(spec: dict, data_root, device, progress: bool, download: bool):
    """The frozen old classifier of a BCT spec and its number of classes (or ``(None, 0)``)."""
    if not spec.get("bct"):
        return None, 0
    old = train(spec["bct"]["old"], data_root=data_root, device=device, progress=progress, download=download)
    old_classifier = old.classifier.eval()
    for p in old_classifier.parameters():
        p.requires_grad_(False)
    return old_classifier, int(spec["bct"]["old"]["num_classes"])


def _loader(spec: dict, dataset, world: int, rank: int, device: torch.device):
    """The distributed sampler and the loader of one process (drop_last batches)."""
    recipe = spec["recipe"]
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=int(spec["seed"]))
    per_proc_batch = max(1, recipe["batch_size"] // world)
    loader = DataLoader(
        dataset, batch_size=per_proc_batch, sampler=sampler, drop_last=True,
        num_workers=recipe.get("num_workers", 0), pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    if len(loader) == 0:
        raise ValueError(
            f"training set has {len(dataset)} samples, fewer than one batch of {per_proc_batch}; "
            "lower train.batch_size or use more data"
        )
    return sampler, loader


def _resume(ckpt_path: Path, parts: dict, device) -> tuple[int, list]:
    """Load a checkpoint into ``parts`` (model, optimizer, scheduler, scaler) if there is one;
    returns the first epoch to run and the history so far."""
    if not ckpt_path.is_file() or cache.verify_entry("models", "a training checkpoint", ckpt_path) == "corrupt":
        return 0, []
    try:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        cache.corrupt_entry("models", "a training checkpoint", ckpt_path, f"it cannot be read ({type(exc).__name__})")
        return 0, []  # nothing was loaded: train from the first epoch
    try:
        for name, obj in parts.items():
            obj.load_state_dict(state[name])
        return int(state["epoch"]) + 1, json.loads(state["history"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        cache.corrupt_entry("models", "a training checkpoint", ckpt_path, f"it does not fit ({type(exc).__name__})")
        raise RuntimeError(f"{ckpt_path} could not be resumed ({exc}); it was removed: run again to train "
                           "from the first epoch") from None


def _epoch(net, loader, parts: dict, spec: dict, teacher, device, use_amp: bool) -> tuple[float, float, float]:
    """One pass over ``loader``; returns the summed loss, correct count and sample count."""
    optimizer, scheduler, scaler = parts["optimizer"], parts["scheduler"], parts["scaler"]
    old_classifier, n_old_classes = teacher
    tot_loss = tot_correct = tot_n = 0.0
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            z, logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=spec["recipe"]["label_smoothing"])
            if old_classifier is not None:
                loss = loss + spec["bct"]["weight"] * bct_influence_loss(z.float(), y, old_classifier, n_old_classes)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        tot_loss += loss.item() * len(y)
        tot_correct += (logits.argmax(1) == y).sum().item()
        tot_n += len(y)
    return tot_loss, tot_correct, tot_n


def _save_final(folder: Path, model: EmbeddingNet, spec: dict, history: list) -> None:
    io.atomic_write_text(folder / "history.csv", pd.DataFrame(history).to_csv(index=False))
    io.atomic_write_text(folder / "model.json", json.dumps(
        {"config": model.config, "spec": spec, "train_version": TRAIN_VERSION}, indent=1))
    io.atomic_torch_save(model.state_dict(), folder / "model.pt")
    io.write_checksum(folder / "model.pt")
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    io.checksum_path(folder / "checkpoint.pt").unlink(missing_ok=True)


def train(
    spec: dict,
    *,
    data_root=None,
    device=None,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    download: bool = False,
) -> EmbeddingNet:
    """Train (or resume, or load) the model of ``spec``; returns it in eval mode.

    ``callback(epoch, row)`` is called after each epoch's checkpoint is written
    (used by the tests to simulate an interruption). In render mode
    (:func:`io.set_mode`) a model that is not trained is an error
    (:class:`io.MissingArtifactError`), never a training run.
    """
    folder = model_dir(spec)
    device = torch.device(device) if device is not None else _default_device()
    cached = _load_cached(spec, device)
    if cached is not None:
        return cached
    cache.require_compute("models", _describe(spec), folder / "model.pt")
    rank, world, ddp = _dist_setup(device)
    recipe, seed = spec["recipe"], int(spec["seed"])
    torch.manual_seed(seed)
    model = EmbeddingNet(num_classes=spec["num_classes"], **spec["model"]).to(device)
    teacher = _bct_teacher(spec, data_root, device, progress, download)
    sampler, loader = _loader(spec, build_train_dataset(spec, data_root, download), world, rank, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"], nesterov=True,
    )
    use_amp = device.type == "cuda"
    parts = {"model": model, "optimizer": optimizer,
             "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(loader) * recipe["epochs"]),
             "scaler": torch.amp.GradScaler("cuda", enabled=use_amp)}
    ckpt_path = folder / "checkpoint.pt"
    start_epoch, history = _resume(ckpt_path, parts, device)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        range(start_epoch, recipe["epochs"]), desc=f"train {spec['setting']}/{spec['num_classes']}cls",
        disable=not progress or rank != 0, initial=start_epoch, total=recipe["epochs"],
    )
    for epoch in bar:
        net.train()
        sampler.set_epoch(epoch)
        torch.manual_seed(seed * 100_003 + epoch * 1_009 + rank)  # augmentation stream
        t0 = time.perf_counter()
        totals = _epoch(net, loader, parts, spec, teacher, device, use_amp)
        if ddp:
            t = torch.tensor(totals, dtype=torch.float64, device=device)
            dist.all_reduce(t)
            totals = t.tolist()
        tot_loss, tot_correct, tot_n = totals
        row = {
            "epoch": epoch + 1, "loss": tot_loss / tot_n, "train_acc": 100.0 * tot_correct / tot_n,
            "lr": parts["scheduler"].get_last_lr()[0], "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.1f}")
        if rank == 0:
            io.atomic_torch_save({**{k: v.state_dict() for k, v in parts.items()}, "epoch": epoch,
                                  "history": json.dumps(history)}, ckpt_path)
            io.write_checksum(ckpt_path)
        if ddp:
            dist.barrier()
        if callback is not None:
            callback(epoch, row)
    if rank == 0:
        _save_final(folder, model, spec, history)
    if ddp:
        dist.barrier()
    return model.eval()


_ARCH_COST = {"resnet18": 1.0, "resnet34": 2.0, "resnet50": 2.3}


def _cost(spec: dict) -> float:
    """A rough relative cost of training ``spec`` (for the order of parallel jobs)."""
    m = spec["model"]
    return (spec["num_classes"] * _ARCH_COST.get(m["arch"], 1.0) * (m.get("width", 64) / 16) ** 2
            * spec["recipe"]["epochs"] * (1.2 if spec.get("bct") else 1.0))


def _train_job(spec: dict, data_root, download: bool) -> str:
    train(spec, data_root=data_root, progress=False, download=download)
    return str(model_dir(spec))


def train_many(specs, *, data_root=None, download: bool = False, progress: bool = True,
               n_workers: int | None = None) -> None:
    """Train every model of ``specs`` that is not trained yet, ``$BACKFILL_WORKERS`` at a time
    (:func:`backfill_utils.parallel.run_jobs`): a BCT model after its old model, the longest
    first. Each model trains alone in its process, so the weights equal a serial run's."""
    from . import parallel

    todo: dict[Path, dict] = {}
    for spec in specs:
        for s in ([spec["bct"]["old"]] if spec.get("bct") else []) + [spec]:
            if not is_trained(s):
                todo.setdefault(model_dir(s), s)
    if not todo:
        return
    cache.require_compute("models", _describe(next(iter(todo.values()))), next(iter(todo)) / "model.pt")
    dirs = list(todo)
    index = {d: i for i, d in enumerate(dirs)}
    after = {i: {index[model_dir(s["bct"]["old"])]} for i, s in enumerate(todo.values())
             if s.get("bct") and model_dir(s["bct"]["old"]) in index}
    jobs = [(s, data_root, download) for s in todo.values()]
    parallel.run_jobs(_train_job, jobs, after=after, cost=[_cost(s) for s in todo.values()],
                      desc="train backbones", progress=progress,
                      labels=[f"{s['setting']}/{s['model']['arch']}/{s['num_classes']}cls"
                              + ("/bct" if s.get("bct") else "") for s in todo.values()])


def get_model(cfg: dict, setting: str, role: str, *, device=None, progress=True) -> EmbeddingNet:
    """Train or load the model ``role`` of ``setting`` for profile ``cfg``."""
    return train(model_spec(cfg, setting, role), data_root=cfg.get("data_root"),
                 device=device, progress=progress, download=bool(cfg.get("download")))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Train one backbone of a profile (torchrun-compatible for DDP)."
    )
    parser.add_argument("--profile", default=None, help="params/<profile>.yaml (default: $BACKFILL_PROFILE or default)")
    parser.add_argument("--setting", default="extended", choices=SETTINGS)
    parser.add_argument("--role", default="new", choices=ROLES)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--spec", default=None, help="a JSON file with a full training spec (overrides profile/setting/role)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.spec:
        spec = json.loads(Path(args.spec).read_text())
    else:
        cfg = C.load_profile(args.profile, data_root=args.data_root)
        spec = model_spec(cfg, args.setting, args.role)
    train(spec, data_root=args.data_root, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(model_dir(spec))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
