"""Paths, parameter profiles and configuration hashing.

Every path is resolved from the location of this package, never from the
working directory, so notebooks, tests and the batch runner agree on where the
cache and the results live wherever they are started from.

Profiles live in ``params/<name>.yaml`` (a run changes them with ``overrides``,
checked as strictly as the profiles; :func:`load_profile`):

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

# One CPU code path for the math libraries on every x86-64 CPU with AVX2 (README
# "Reproducibility"): torch's own kernels and oneDNN (convolutions) on their AVX2
# branches, MKL (torch's BLAS) on its COMPATIBLE branch (its only branch, besides AUTO,
# that is the same on Intel and other vendors' CPUs), numpy's SIMD dispatch without
# AVX-512. The libraries read
# these when they load, so they must be in the environment before python starts
# (``python -m backfill_utils.run --pin`` and ``make reproduce PIN=1`` set them).
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}


def code_path() -> str:
    """The CPU code path of this process: torch's kernel level and whether the
    math libraries are pinned (:data:`PINNED_ENV` in the environment)."""
    import torch

    pinned = all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
    return f"{torch.backends.cpu.get_cpu_capability()}, {'pinned' if pinned else 'not pinned'}"


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
REPLACE_KEYS = ("variants",)  # free-form and replaced whole by an override (the regime map's variants)


def deep_update(base: dict, updates: Mapping, *, strict: bool = True) -> dict:
    """Recursively merge ``updates`` into a copy of ``base``.

    A key of ``updates`` that ``base`` does not have is an error (a typo in an
    override must not be silently ignored), except below ``OPEN_KEYS``; a key of
    ``REPLACE_KEYS`` (the regime map's ``variants``) is replaced whole.

    >>> deep_update({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}})
    {'a': 1, 'b': {'c': 3}}
    """
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if strict and key not in out:
            raise KeyError(
                f"unknown configuration key {key!r}; known keys: {sorted(out)}"
            )
        if key in REPLACE_KEYS:
            out[key] = copy.deepcopy(value)
        elif isinstance(out.get(key), dict) and isinstance(value, Mapping):
            out[key] = deep_update(out[key], value, strict=strict and key not in OPEN_KEYS)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(overrides: Mapping | str | None) -> dict:
    """Overrides of profile keys as a mapping: a mapping, or a YAML/JSON string
    (e.g. ``"{train: {epochs: 5}}"``, the form papermill and the runner pass);
    ``None`` or an empty string is no override.

    >>> parse_overrides("{train: {epochs: 5}, compat: {epochs: 10}}")
    {'train': {'epochs': 5}, 'compat': {'epochs': 10}}
    >>> parse_overrides(None)
    {}
    """
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        text = overrides
        try:
            overrides = yaml.safe_load(text) if text.strip() else {}
        except yaml.YAMLError as exc:
            raise ValueError(f"overrides {text!r} is not valid YAML/JSON ({exc}); "
                             "write a mapping such as '{train: {epochs: 5}}'") from None
        overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping of profile keys, e.g. {{train: {{epochs: 5}}}}, "
                         f"got {type(overrides).__name__}: {overrides!r}")
    return copy.deepcopy(dict(overrides))


# keys that say where things are, not what is computed: they never name a run
LOCATION_KEYS = ("data_root",)


def _changes(base: Mapping, new: Mapping) -> dict:
    """The leaves of ``new`` that differ from ``base`` (nested mappings recursed)."""
    out = {}
    for key, value in new.items():
        old = base.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            sub = _changes(old, value)
            if sub:
                out[key] = sub
        elif key not in base or old != value:
            out[key] = copy.deepcopy(value)
    return out


def run_name(profile: str, changes: Mapping) -> str:
    """The name of a run: the profile for the profile as it is; otherwise
    ``<profile>[_<dataset>][_seed<k>][_<hash of the other changes>]``.

    >>> run_name("default", {})
    'default'
    >>> run_name("default", {"dataset": "cifar100", "seed": 3})
    'default_cifar100_seed3'
    >>> run_name("smoke", {"train": {"epochs": 1}}) == "smoke_" + config_hash({"train": {"epochs": 1}}, 8)
    True
    """
    name = profile
    rest = {k: v for k, v in changes.items() if k not in ("dataset", "seed") + LOCATION_KEYS}
    if "dataset" in changes:
        name += f"_{changes['dataset']}"
    if "seed" in changes:
        name += f"_seed{changes['seed']}"
    if rest:
        name += f"_{config_hash(rest, 8)}"
    return name


def load_profile(name: str | None = None, *, overrides: Mapping | str | None = None,
                 download: bool = False, **keys: Any) -> dict:
    """Load ``params/<name>.yaml`` and apply ``overrides`` then ``keys`` (``None`` values are ignored).

    Both use the profile's keys and the same strict merge (:func:`deep_update`:
    an unknown key is an error naming the known keys), e.g.
    ``load_profile("default", dataset="cifar100", overrides={"train": {"epochs": 5}})``.
    ``download``: torchvision datasets may be downloaded into ``data_root``.

    Added keys: ``profile``; ``download``; ``run_changes`` (what differs from the
    profile file, data_root aside); ``run_name`` (:func:`run_name`), which names
    the run's results folder (:func:`output_dir`); ``reference_run``: True only
    for a profile as it is (its own dataset and seed, no change), the run whose
    results are committed for the default profile and whose claims are asserted.
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
        base = yaml.safe_load(fh)
    if not isinstance(base, dict):
        raise ValueError(f"profile file {path} must contain a mapping, got {type(base).__name__}")
    try:
        cfg = deep_update(base, parse_overrides(overrides))
        cfg = deep_update(cfg, {k: v for k, v in keys.items() if v is not None})
    except KeyError as exc:
        raise KeyError(f"profile {name!r} ({path}): {exc.args[0]}") from None
    changes = {k: v for k, v in _changes(base, cfg).items() if k not in LOCATION_KEYS}
    cfg.update(profile=name, download=bool(download), run_changes=changes,
               run_name=run_name(name, changes), reference_run=not changes)
    normalize_embeddings(cfg)
    return cfg


def normalize_embeddings(cfg: Mapping) -> bool:
    """The profile key ``normalize_embeddings``: whether embeddings are L2-normalised before
    ranking and training (the backbones' embeddings, the compatibility modules' inputs and
    outputs, the recipes' cached inputs); an error naming the key unless it is true or false.

    >>> normalize_embeddings({"normalize_embeddings": False})
    False
    """
    if "normalize_embeddings" not in cfg:
        raise KeyError("the profile lacks the key normalize_embeddings; add "
                       "'normalize_embeddings: true' (see params/default.yaml)")
    value = cfg["normalize_embeddings"]
    if not isinstance(value, bool):
        raise ValueError(f"profile key normalize_embeddings must be true or false, got {value!r}; "
                         "write normalize_embeddings: true (the default) or false")
    return value


def output_dir(cfg: dict) -> Path:
    """Where a run's executed notebooks, figures, tables, curves and runtimes go:
    ``results/`` for the default profile as it is (the committed results),
    ``results/<run_name>/`` otherwise (e.g. ``results/smoke/``,
    ``results/default_cifar100/``, ``results/smoke_3f2a91c0/``), or
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
