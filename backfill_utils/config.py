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
``default``. A profile is the name of a file of ``params/`` or an absolute path
to a ``.yaml`` file; never a relative path.

Values given by a user (``overrides``, the runner's ``-p`` values) are YAML
without aliases (:func:`parse_yaml`), and every loaded configuration passes
:func:`validate` (types and ranges of the seed, counts, epochs and fractions),
the same rule for the runner and for a notebook's set-up, before anything runs.
"""
from __future__ import annotations

import copy
import hashlib
import json
import numbers
import os
import re
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

# One CPU code path for the math libraries on every x86-64 CPU with AVX2 (docs/reproducibility.md,
# "Reproducibility"): torch's own kernels and oneDNN (convolutions) on their AVX2
# branches, MKL (torch's BLAS) on its COMPATIBLE branch (its only branch, besides AUTO,
# that is the same on Intel and other vendors' CPUs), numpy's SIMD dispatch without
# AVX-512. The libraries read
# these when they load, so they must be in the environment before python starts
# (``python -m backfill_utils.tools.run --pin`` and ``make reproduce PIN=1`` set them).
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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows), for the
    machine line of a benchmark or an estimate."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


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


# --------------------------------------------------------------------------- user YAML and checks
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")
MAX_YAML_CHARS = 100_000
MAX_CONFIG_NODES = 100_000


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases (``*name``): a few characters of nested
    aliases expand to gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed here; write the "
                                              "values out", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str, what: str) -> Any:
    """A YAML/JSON value given by a user (``what`` names it in errors): no aliases, at most
    :data:`MAX_YAML_CHARS` characters; a malformed value is one ``ValueError`` line.

    >>> parse_yaml("{train: {epochs: 5}}", "overrides")
    {'train': {'epochs': 5}}
    >>> parse_yaml("[&a 1, *a]", "-p seed")
    Traceback (most recent call last):
    ValueError: -p seed is not valid YAML/JSON: aliases (*name) are not allowed here; write the values out (line 1, column 8)
    """
    if len(text) > MAX_YAML_CHARS:
        raise ValueError(f"{what} is {len(text)} characters long; at most {MAX_YAML_CHARS} are read")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a safe loader without aliases
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} is not valid YAML/JSON: {problem}{where}") from None


def _check_size(obj: Any, what: str) -> None:
    """Refuse a configuration of more than :data:`MAX_CONFIG_NODES` values (counted with
    repeats, as hashing and copying would visit them), in bounded time."""
    n, stack = 0, [obj]
    while stack:
        x = stack.pop()
        n += 1
        if n > MAX_CONFIG_NODES:
            raise ValueError(f"{what} holds more than {MAX_CONFIG_NODES} values (counting each repeat of a YAML "
                             "alias); write a smaller configuration")
        if isinstance(x, Mapping):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)


def _int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# (path of keys, minimum): counts and epochs, integers (absent or null keys are skipped)
COUNT_KEYS = [(("seed",), 0), (("embedding_dim",), 1), (("compat_seeds",), 1),
              (("train", "epochs"), 1), (("train", "batch_size"), 1), (("train", "num_workers"), 0),
              (("old_train", "epochs"), 1), (("old_train", "batch_size"), 1),
              (("embed", "train_passes"), 1), (("eval", "num_ratios"), 2), (("eval", "order_seed"), 0),
              (("compat", "epochs"), 1), (("compat", "batch_size"), 1), (("compat", "samples_per_class"), 1),
              (("compat", "fct_epochs"), 1), (("compat", "fct_warmup_epochs"), 0),
              (("compat", "fastfill_epochs"), 1), (("compat", "fastfill_warmup_epochs"), 0),
              (("tune", "trials"), 1), (("tune", "startup_trials"), 0), (("tune", "sampler_seed"), 0)]
# (path of keys, lowest, highest, whether the lowest is allowed): fractions
FRACTION_KEYS = [(("old_fraction",), 0.0, 1.0, False), (("open_fraction",), 0.0, 1.0, True),
                 (("val_fraction",), 0.0, 1.0, True)]
MAX_COUNT = 2 ** 31 - 1


def _get(cfg: Mapping, path: tuple) -> Any:
    for key in path:
        if not isinstance(cfg, Mapping) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def validate(cfg: Mapping) -> None:
    """Check the types and ranges of a configuration's seed, counts, epochs and fractions
    (:data:`COUNT_KEYS`, :data:`FRACTION_KEYS`) and the dataset's name: a ``ValueError``
    naming the key and saying what is allowed. The runner and :func:`session.setup` both
    call it through :func:`load_profile`, before anything runs.

    >>> validate({"seed": 0, "train": {"epochs": 2}})
    >>> validate({"seed": "/../x", "train": {"epochs": 2}})
    Traceback (most recent call last):
    ValueError: seed must be an integer >= 0, got '/../x' (str)
    """
    for path, low in COUNT_KEYS:
        v = _get(cfg, path)
        if v is None:
            continue
        name = ".".join(path)
        if not _int(v) or not low <= v <= MAX_COUNT:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r} ({type(v).__name__})")
    for path, low, high, closed in FRACTION_KEYS:
        v = _get(cfg, path)
        if v is None:
            continue
        name = ".".join(path)
        if not _number(v) or not (low <= v if closed else low < v) or not v < high:
            raise ValueError(f"{name} must be a number with {low:g} {'<=' if closed else '<'} {name} < {high:g}, "
                             f"got {v!r}")
    dataset = cfg.get("dataset")
    if dataset is not None and (not isinstance(dataset, str) or not _NAME.match(dataset)):
        raise ValueError(f"dataset must be a dataset name (letters, digits, '_', '-', '.'), got {dataset!r}")


def profile_path(name: str) -> tuple[str, Path]:
    """``(name, file)`` of a profile: a name of ``params/`` (``smoke``), or an absolute path
    to a ``.yaml`` file (its name is the file's stem). A relative path, or a name that
    leaves ``params/``, is an error."""
    text = str(name)
    if os.path.isabs(text) and text.endswith((".yaml", ".yml")):
        path = Path(text)
        stem = path.stem
        if not _NAME.match(stem):
            raise ValueError(f"profile file {path}: its name must be letters, digits, '_', '-', '.'")
        return stem, path
    if not _NAME.match(text) or text in (".", ".."):
        raise ValueError(f"profile {text!r} is neither a profile name of {PARAMS_DIR} "
                         f"({', '.join(available_profiles())}) nor an absolute path to a .yaml file")
    return text, PARAMS_DIR / f"{text}.yaml"


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
            overrides = parse_yaml(text, "overrides") if text.strip() else {}
        except ValueError as exc:
            raise ValueError(f"{exc}; write a mapping such as '{{train: {{epochs: 5}}}}'") from None
        overrides = {} if overrides is None else overrides
    if not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a mapping of profile keys, e.g. {{train: {{epochs: 5}}}}, "
                         f"got {type(overrides).__name__}: {str(overrides)[:200]!r}")
    _check_size(overrides, "overrides")
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
    name, path = profile_path(profile_name(name))
    if os.environ.get(THREADS_ENV):
        import torch

        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown profile {name!r}: {path} does not exist; "
            f"available profiles: {', '.join(available_profiles())}"
        )
    with open(path) as fh:
        base = yaml.safe_load(fh)
    if not isinstance(base, dict):
        raise ValueError(f"profile file {path} must contain a mapping, got {type(base).__name__}")
    _check_size(base, f"profile file {path}")
    _check_size(keys, "the parameters")
    try:
        cfg = deep_update(base, parse_overrides(overrides))
        cfg = deep_update(cfg, {k: v for k, v in keys.items() if v is not None})
    except KeyError as exc:
        raise KeyError(f"profile {name!r} ({path}): {exc.args[0]}") from None
    changes = {k: v for k, v in _changes(base, cfg).items() if k not in LOCATION_KEYS}
    cfg.update(profile=name, download=bool(download), run_changes=changes,
               run_name=run_name(name, changes), reference_run=not changes)
    normalize_embeddings(cfg)
    validate(cfg)
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
    name = str(cfg.get("run_name", cfg.get("profile", "default")))
    if name == "default":
        return RESULTS_DIR
    if not _NAME.match(name) or Path(name).name != name:
        raise ValueError(f"run name {name!r} is not a plain folder name; a run folder is always inside "
                         f"{RESULTS_DIR} (set ${RESULTS_ENV} to write elsewhere)")
    return RESULTS_DIR / name


def config_hash(obj: Any, length: int = 16) -> str:
    """A stable hash of a JSON-able object (key order does not matter).

    >>> config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
    True
    """
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
