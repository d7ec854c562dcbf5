"""The artifact cache: kinds, keys (parameters + code versions), checked entries, and the
read-only mode of render notebooks.

**The artifact cache.** An expensive array artifact is stored as
``<cache>/<kind>/<hash>.npz``; ``<hash>`` is :func:`config.config_hash` of the
caller's key (everything the artifact depends on: specs, classes, seeds) *and*
of the code versions of the artifact's kind (:func:`code_versions`). A changed
parameter or a bumped version is therefore a cache miss, never a stale hit. The
full key is stored beside the arrays (``<hash>.json``) for provenance.

**Checksums.** Every cache entry (the ``.npz`` arrays: embeddings, compatibility
modules, curves, experiments; a backbone's ``model.pt`` and training checkpoint)
has its SHA-256 written next to it (``<file>.sha256``) right after the entry. A
load checks it first (:func:`verify_entry`): an entry whose bytes do not match, or
that cannot be read (truncated), is reported with its path and removed, then
rebuilt by a compute notebook; a render notebook stops with
:class:`CorruptArtifactError` naming the notebook to rerun. An entry written
before checksums existed (no ``.sha256``) is read as before and, once it loaded,
gets its checksum recorded.

**Code versions.** Each producing module has an integer constant that is bumped
when a change of its code changes its output (docs/reproducibility.md, "Cache versions"):
``data.synthetic.SYNTHETIC_VERSION``, ``train.TRAIN_VERSION``, ``embed.EMBED_VERSION``,
``compat.modules.COMPAT_VERSION``, ``backfill.experiments.CURVES_VERSION`` and
``backfill.experiments.EXPERIMENTS_VERSION`` (:data:`VERSION_SOURCES`; the key holds
the version names and numbers, not the module paths, so moving a module changes no key). A kind's key holds the versions of its whole
lineage (:data:`KINDS`): curves are invalid when the embeddings they were computed
from are. DataFrames are stored as arrays (:func:`backfill_utils.io.frame_to_arrays`).

**Read-only (render) mode.** A render notebook calls ``set_mode("render")``
(through :func:`backfill_utils.session.setup`). From then on a cache miss, or a
backbone that is not trained, raises :class:`MissingArtifactError` at once,
naming the notebook that produces the artifact; nothing is trained or computed.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from . import config as C
from .io import atomic_write, atomic_write_text, checksum_path, file_sha256, record_checksum, write_checksum


# kind -> (the notebook that produces it, the code versions its artifacts depend on)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "models": ("10_train", ("train",)),
    "embeddings": ("20_galleries", ("train", "embed")),
    "compat": ("30_compat", ("train", "embed", "compat")),
    "convergence": ("30_compat", ("train", "embed", "compat", "curves")),
    "curves": ("31_backfill", ("train", "embed", "compat", "curves")),
    "experiments": ("32_experiments", ("train", "embed", "compat", "curves", "experiments")),
}
# version name -> (module below backfill_utils, dotted; constant); read when a key is built
VERSION_SOURCES: dict[str, tuple[str, str]] = {
    "synthetic": ("data.synthetic", "SYNTHETIC_VERSION"),
    "train": ("train", "TRAIN_VERSION"),
    "embed": ("embed", "EMBED_VERSION"),
    "compat": ("compat.modules", "COMPAT_VERSION"),
    "curves": ("backfill.experiments", "CURVES_VERSION"),
    "experiments": ("backfill.experiments", "EXPERIMENTS_VERSION"),
}
MODES = ("compute", "render")


class MissingArtifactError(FileNotFoundError):
    """A render notebook needs an artifact that is not in the cache."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of the traceback: the message is all a reader needs
        return [f"{type(self).__name__}: {self}"]


class CorruptArtifactError(MissingArtifactError):
    """A cache entry does not match its checksum or cannot be read (a render notebook's error)."""


class CorruptArtifactWarning(UserWarning):
    """A corrupt cache entry was found and removed; it is being rebuilt."""



def verify_entry(kind: str, what: str, path: str | os.PathLike) -> str:
    """Check the cache entry ``path`` (of ``kind``, described by ``what``) against its
    checksum: ``"ok"`` if it matches, ``"unchecked"`` if it has none (an entry written
    before checksums existed), else :func:`corrupt_entry` (``"corrupt"``, or raises in
    render mode)."""
    path = Path(path)
    side = checksum_path(path)
    if not side.is_file():
        return "unchecked"
    try:
        expected = side.read_text().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return corrupt_entry(kind, what, path, f"its checksum file {side.name} is unreadable")
    if file_sha256(path) != expected:
        return corrupt_entry(kind, what, path, f"its bytes do not match the SHA-256 in {side.name}")
    return "ok"



def corrupt_entry(kind: str, what: str, path: str | os.PathLike, why: str) -> str:
    """A corrupt cache entry: in render mode raise :class:`CorruptArtifactError` naming
    the notebook to rerun; otherwise warn (:class:`CorruptArtifactWarning`, naming the
    path), remove the entry and its checksum, and return ``"corrupt"`` (the caller rebuilds it)."""
    path = Path(path)
    if _STATE["mode"] == "render":
        hint = f" {_STATE['hint']}" if _STATE["hint"] else ""
        raise CorruptArtifactError(
            f"corrupt input: {what} ({path}: {why}). This notebook only renders: delete that file and run "
            f"notebooks/{producer(kind)}.ipynb again{hint} to rebuild it.")
    warnings.warn(f"corrupt cache entry {path} ({what}): {why}; removed, rebuilding it",
                  CorruptArtifactWarning, stacklevel=3)
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)
    return "corrupt"


# --------------------------------------------------------------------------- mode
_STATE = {"mode": "compute", "hint": "", "run_args": ""}


def set_mode(mode: str, hint: str = "", run_args: str = "") -> None:
    """``"compute"`` (default: a miss computes) or ``"render"`` (a miss is an error).

    ``hint`` is appended to the error, e.g. the parameters to run the producer with;
    ``run_args``: the runner's arguments for those parameters (e.g. `` --profile smoke``),
    put in the command the error gives (:func:`compute_command`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _STATE.update(mode=mode, hint=hint, run_args=run_args)


def get_mode() -> str:
    """The current mode: ``"compute"`` or ``"render"``."""
    return _STATE["mode"]


@contextlib.contextmanager
def mode(name: str, hint: str = "", run_args: str = "") -> Iterator[None]:
    """Context manager: :func:`set_mode` inside, the previous mode after."""
    before = dict(_STATE)
    set_mode(name, hint, run_args)
    try:
        yield
    finally:
        _STATE.update(before)


def producer(kind: str) -> str:
    """The notebook that computes artifacts of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known kinds: {sorted(KINDS)}")
    return KINDS[kind][0]


def producers(kinds) -> list[str]:
    """The notebooks that compute artifacts of ``kinds``, in the series' order.

    >>> producers(["curves", "models", "convergence", "compat"])
    ['10_train', '30_compat', '31_backfill']
    """
    return sorted({producer(k) for k in kinds})


def absent_kinds(kinds=None) -> list[str]:
    """The artifact kinds of ``kinds`` (default: all of :data:`KINDS`) of which the cache
    holds no entry at all (``<cache>/<kind>/*.npz``, a model's ``<cache>/models/*/model.pt``),
    as on a fresh clone. Cheap: it says
    nothing of whether the entries of a given configuration are there."""
    kinds = list(KINDS if kinds is None else kinds)
    producers(kinds)  # an unknown kind is an error
    root = C.cache_dir()
    return [k for k in kinds if not any((root / k).glob("*.npz")) and not any((root / k).glob("*/model.pt"))]


def compute_command(notebooks) -> str:
    """The runner's command that runs the compute ``notebooks`` (names or prefixes) with
    the parameters of the current mode (:func:`set_mode`'s ``run_args``).

    >>> compute_command(["10_train", "31_backfill"])
    'python -m backfill_utils.tools.run --only 10 31'
    """
    return f"python -m backfill_utils.tools.run{_STATE['run_args']} --only " + " ".join(n[:2] for n in notebooks)


def missing(kind: str, what: str, path: Path) -> MissingArtifactError:
    """The error of a render notebook that lacks ``what`` (of ``kind``) at ``path``; its
    command also runs the producers of the kinds of which the cache holds nothing
    (:func:`absent_kinds`: on a fresh clone, every compute notebook)."""
    hint = f" {_STATE['hint']}" if _STATE["hint"] else ""
    command = compute_command(producers({kind, *absent_kinds()}))
    return MissingArtifactError(
        f"missing input: {what} (not in the artifact cache: {path}). This notebook only renders and never "
        f"trains or evaluates: run notebooks/{producer(kind)}.ipynb first{hint} (`{command}`), or the whole "
        "series with `make reproduce` / `python -m backfill_utils.tools.run`."
    )


def missing_target(what: str, target: str, paths, cfg: Mapping) -> MissingArtifactError:
    """The error of a render notebook that lacks the committed outputs ``paths`` of a
    ``make`` target (``make tune``, ``make regimes``), naming the target to run."""
    arg = "" if cfg.get("run_name") == "default" else f" PROFILE={cfg.get('profile')}"
    return MissingArtifactError(
        f"missing input: {what} ({', '.join(str(p) for p in paths)}). This notebook only renders: run "
        f"`{target}{arg}` first (its outputs are committed under results/ for the default profile)."
    )


def require_compute(kind: str, what: str, path: Path) -> None:
    """Raise :class:`MissingArtifactError` if a missing artifact would be computed in render mode."""
    if _STATE["mode"] == "render":
        raise missing(kind, what, path)


# --------------------------------------------------------------------------- cache
def code_versions(kind: str) -> dict[str, int]:
    """The code versions that artifacts of ``kind`` depend on, e.g. ``{"train": 1, "embed": 1}``."""
    names = KINDS[kind][1] if kind in KINDS else None
    if names is None:
        raise ValueError(f"unknown artifact kind {kind!r}; known kinds: {sorted(KINDS)}")
    out = {}
    for name in names:
        module, attr = VERSION_SOURCES[name]
        out[name] = int(getattr(importlib.import_module(f"{__package__}.{module}"), attr))
    return out


def full_key(kind: str, key: Mapping) -> dict:
    """The key that is hashed: the caller's key plus the code versions of ``kind``."""
    return {"key": dict(key), "code": code_versions(kind)}


def cache_path(kind: str, key: Mapping) -> Path:
    """``<cache>/<kind>/<hash of full_key(kind, key)>.npz``."""
    return C.cache_dir() / kind / f"{C.config_hash(full_key(kind, key))}.npz"


def cached_arrays(
    kind: str, key: Mapping, compute: Callable[[], Mapping[str, np.ndarray]], *,
    refresh: bool = False, what: str | None = None,
) -> dict[str, np.ndarray]:
    """Return the arrays cached under ``(kind, key)``, computing and storing them on a miss.

    ``kind`` is one of :data:`KINDS`. Arrays are stored without pickle
    (an object array is an error before anything is written). In render mode a
    miss raises :class:`MissingArtifactError` naming the producing notebook
    (``what`` describes the artifact in that message).
    """
    path = cache_path(kind, key)
    what = what or f"this {kind} artifact"
    if path.is_file() and not refresh:
        loaded = _load_arrays(kind, what, path)
        if loaded is not None:
            return loaded
    require_compute(kind, what, path)
    arrays = {k: np.asarray(v) for k, v in compute().items()}
    bad = [k for k, v in arrays.items() if v.dtype == object]
    if bad:
        raise TypeError(f"cached_arrays({kind!r}): arrays {bad} have dtype object, which cannot be "
                        "stored without pickle; convert them to numbers or str first")
    atomic_write(path, lambda p: np.savez(p, **arrays))
    write_checksum(path)
    atomic_write_text(path.with_suffix(".json"),
                      json.dumps(full_key(kind, key), indent=1, sort_keys=True, default=str))
    return arrays


def _load_arrays(kind: str, what: str, path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of the entry ``path``, or ``None`` if it was corrupt (removed)."""
    state = verify_entry(kind, what, path)
    if state == "corrupt":
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        corrupt_entry(kind, what, path, f"it cannot be read ({type(exc).__name__}: {exc})")
        return None
    if state == "unchecked":
        record_checksum(path)
    return arrays
