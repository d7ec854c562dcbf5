"""Paths, parameter profiles and configuration hashing.

Every path is resolved from the location of this package, never from the
working directory, so notebooks, tests and the batch runner agree on where the
cache and the results live wherever they are started from.

Profiles live in ``params/<name>.yaml``:

* ``smoke``   -- tiny sizes for CI and nbval (the whole series in minutes);
* ``default`` -- the embedded offline run on the synthetic dataset (CPU);
* ``paper``   -- the paper's datasets and budgets, for a GPU machine.

The profile is chosen by an explicit argument, else by the environment variable
``BACKFILL_PROFILE`` (nbval cannot inject papermill parameters), else
``default``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = REPO_ROOT / "params"
RESULTS_DIR = REPO_ROOT / "results"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

PROFILE_ENV = "BACKFILL_PROFILE"
CACHE_ENV = "BACKFILL_CACHE"
DATA_ENV = "BACKFILL_DATA_ROOT"
RESULTS_ENV = "BACKFILL_RESULTS"
THREADS_ENV = "BACKFILL_THREADS"  # torch CPU threads (e.g. 1 on a machine shared with other jobs)


def results_dir(profile: str | None = None) -> Path:
    """Where rendered results go: ``results/`` for the default profile (committed),
    ``results/<profile>/`` for any other (not committed), or ``$BACKFILL_RESULTS``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser().resolve()
    name = profile_name(profile)
    return RESULTS_DIR if name == "default" else RESULTS_DIR / name


def cache_dir() -> Path:
    """Root of the artifact cache (``$BACKFILL_CACHE`` or ``<repo>/.cache``)."""
    return Path(os.environ.get(CACHE_ENV, REPO_ROOT / ".cache")).expanduser().resolve()


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Where datasets live: the argument, ``$BACKFILL_DATA_ROOT`` or ``<repo>/data``."""
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    return Path(os.environ.get(DATA_ENV, REPO_ROOT / "data")).expanduser().resolve()


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def profile_name(name: str | None = None) -> str:
    """The profile to use: ``name`` if given, else ``$BACKFILL_PROFILE``, else ``default``."""
    return name or os.environ.get(PROFILE_ENV) or "default"


OPEN_KEYS = ("dataset_options",)  # free-form: each dataset has its own options


def deep_update(base: dict, updates: Mapping, *, strict: bool = True) -> dict:
    """Recursively merge ``updates`` into a copy of ``base``.

    A key of ``updates`` that ``base`` does not have is an error (a typo in an
    override must not be silently ignored), except below ``OPEN_KEYS``.

    >>> deep_update({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}})
    {'a': 1, 'b': {'c': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if strict and key not in out:
            raise KeyError(
                f"unknown configuration key {key!r}; known keys: {sorted(out)}"
            )
        if isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = deep_update(out[key], value, strict=strict and key not in OPEN_KEYS)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_profile(name: str | None = None, **overrides: Any) -> dict:
    """Load ``params/<name>.yaml`` and apply ``overrides`` (``None`` values are ignored).

    Overrides use the profile's top-level keys, e.g. ``load_profile("default",
    dataset="cifar100", data_root="/data")``; nested keys take a dict.
    """
    name = profile_name(name)
    if os.environ.get(THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    path = PARAMS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown profile {name!r}: {path} does not exist; "
            f"available profiles: {', '.join(available_profiles())}"
        )
    with open(path) as fh:
        cfg = yaml.safe_load(fh)
    if not isinstance(cfg, dict):
        raise ValueError(f"profile file {path} must contain a mapping, got {type(cfg).__name__}")
    cfg["profile"] = name
    file_dataset = cfg.get("dataset")
    cfg = deep_update(cfg, {k: v for k, v in overrides.items() if v is not None})
    cfg["run_name"] = name if cfg.get("dataset") == file_dataset else f"{name}_{cfg['dataset']}"
    return cfg


def output_dir(cfg: dict) -> Path:
    """Where a run's figures, tables and curves go: ``results/`` for the default
    profile on its own dataset (the committed results), ``results/<run_name>/``
    otherwise (e.g. ``results/smoke/``, ``results/default_cifar100/``), or
    ``$BACKFILL_RESULTS``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser().resolve()
    name = cfg.get("run_name", cfg.get("profile", "default"))
    return RESULTS_DIR if name == "default" else RESULTS_DIR / name


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able object (key order does not matter).

    >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
