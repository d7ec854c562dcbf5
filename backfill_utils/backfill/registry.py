"""The method registry: one registration per online-backfilling method.

A method is one :class:`Method` object. It states everything the package needs to
train, evaluate, draw, tabulate and serve it:

* its ``name`` (the ``method`` column of every table), plot ``style``, a one-line
  ``description`` and the ``groups`` it belongs to (:data:`GROUPS`: Table 1 and the
  methods figure, the ablation, the CMCL variants, ...);
* how it is trained from the cached train-split embeddings: ``fit(data, recipe) ->
  Trained`` with a default ``recipe(cfg)`` built from the profile's ``compat`` keys
  (``fit=None``: nothing to train), and the backbones it trains from
  (``train_roles``);
* its system for a setting: the backbone of its new side (``backbone``: ``"new"``,
  or ``"bct"`` for a backward-compatible model), whether the query is also embedded
  by the old model (``two_pass``: rank merge), and the trained modules by **slot**:
  ``psi`` (query side: the new-model query mapped to the old gallery's space),
  ``rho`` (new side: queries and backfilled items) and ``h`` (gallery side: the old
  embeddings of the not-yet-backfilled items). From these a generic builder makes
  its :class:`~backfill_utils.backfill.systems.BackfillSystem` (``system=`` overrides it);
* its backfill ``order`` if it defines one (FastFill), else the seeded random order
  (:func:`backfill_utils.backfill.orders.method_order` applies this rule everywhere);
* its ``components`` for the ablation table (psi, CMCL, L_rev, rho);
* or, for the three references (old/old, new/new, offline backfilling), which
  ``reference`` curve it is.

The query-side cost follows from the same fields (:func:`query_side`): forward
passes (``two_pass``: phi_old and the new backbone), the modules on the query side
(psi, rho) and the extra parameters (every trained module, h included, which runs on
the gallery side). The serving index (``backfill_utils.serve.index``) takes the same slots:
``query_transform=psi``, ``new_transform=rho``, ``gallery_transform=h``.

Every table, figure, claim and notebook enumerates the registry (:func:`names`,
optionally by group). **Adding a method is one** :func:`register` **call** (docs/methods.md,
"Adding a method"; ``notebooks/60_your_own_method.ipynb``).

The paper's methods (PAPER.md section 3) and BiCT are registered in
:mod:`backfill_utils.backfill.builtin`, on the first use of the registry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch.nn as nn

from .. import config as C
from ..compat.recipes import Recipe


__all__ = ["Method", "Trained", "GROUPS", "SLOTS", "register", "unregister", "get", "names",
           "style", "query_side", "ends_at_new", "components", "recipe_from_profile", "recipe_key",
           "is_builtin", "mark_builtin", "COLORS"]

#: Groups a method can belong to, and what enumerates each.
GROUPS: dict[str, str] = {
    "main": "Table 1, the methods figure (43), main_comparison, the cost table",
    "fig2": "Fig. 2: rank merge against the references (42)",
    "ablation": "the ablation figure and table (44, Table 2)",
    "cmcl_variants": "single / separate / joint CMCL (45)",
    "distances": "pair-distance distributions of the two systems (46)",
    "flips": "negative flips (47)",
    "settings": "the heterogeneous and open-class settings (48)",
    "order_study": "the methods run under both orders in the backfill-order study (49)",
    "animation": "the curves of the backfilling animation (40)",
    "serving": "served by the faiss index while a backfill worker runs, under query load (54)",
}
#: Trained-module slots: psi (query -> old space), rho (new side), h (old gallery -> query space).
SLOTS = ("psi", "rho", "h")
REFERENCES = ("old", "new", "offline")
BACKBONES = ("old", "new", "bct")


@dataclass
class Trained:
    """What training one method produced: its modules by slot, and the history.

    ``psi``: applied to the new-model query, compared with the not-yet-backfilled
    items; ``rho``: applied to the new-model query and to the backfilled items; ``h``:
    applied to the old embeddings that not-yet-backfilled items hold. Each is a
    ``torch.nn.Module`` whose ``config`` :func:`backfill_utils.compat.modules.build_module`
    rebuilds (how the cache stores it), or ``None``.
    """

    psi: nn.Module | None = None
    rho: nn.Module | None = None
    h: nn.Module | None = None
    history: pd.DataFrame | None = None

    def modules(self) -> dict[str, nn.Module]:
        """``{slot: module}`` of the slots that hold a module."""
        return {s: getattr(self, s) for s in SLOTS if getattr(self, s) is not None}

    @property
    def n_params(self) -> int:
        """Parameters of every trained module (the "extra parameters" of Table 2)."""
        return int(sum(p.numel() for m in self.modules().values() for p in m.parameters()))


@dataclass(frozen=True)
class Method:
    """One online-backfilling method: a registration (see the module docstring).

    ``name``, ``style`` (matplotlib line keywords), ``description``, ``groups`` (keys of
    :data:`GROUPS`); ``backbone`` (the new side's model: ``"new"``, ``"bct"``, or
    ``"old"`` for the old references), ``two_pass`` (rank merge: the query is also
    embedded by phi_old); ``slots`` (the trained modules among :data:`SLOTS`),
    ``fit(data, recipe) -> Trained`` with ``data`` an
    :class:`~backfill_utils.backfill.experiments.SettingData` restricted to ``train_roles``,
    ``recipe(cfg)`` the default recipe from the profile; ``order(trained, old_gallery)
    -> permutation`` and its ``order_name`` if the method defines its backfill order;
    ``system(method, old, new, trained, order) -> BackfillSystem`` (``order``: the method's
    order, :func:`~backfill_utils.backfill.orders.method_order`) to replace the
    generic :func:`~backfill_utils.backfill.experiments.make_system`; ``components(recipe) ->
    {psi, CMCL, L_rev, rho}`` for the ablation; ``reference`` (``"old"``, ``"new"``,
    ``"offline"``) for a reference curve; ``version`` (in its cache keys: bump it when
    its training or system changes). Inconsistent fields are an error naming the method.
    """

    name: str
    style: Mapping[str, Any]
    description: str
    groups: tuple[str, ...] = ()
    backbone: str = "new"
    two_pass: bool = False
    slots: tuple[str, ...] = ()
    fit: Callable[[Any, Any], Trained] | None = None
    recipe: Callable[[dict], Any] | None = None
    train_roles: tuple[str, ...] = ()
    order: Callable[[Trained, np.ndarray], np.ndarray] | None = None
    order_name: str = ""
    system: Callable[..., Any] | None = None
    components: Callable[[Any], dict[str, bool]] | None = None
    reference: str | None = None
    version: int = 1

    def __post_init__(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"method {self.name!r}: {what}")
        if not isinstance(self.name, str) or not self.name or " (" in self.name:
            raise bad("name must be a non-empty string without ' (' (reserved for variants)")
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "slots", tuple(self.slots))
        object.__setattr__(self, "train_roles", tuple(self.train_roles))
        unknown = sorted(set(self.groups) - set(GROUPS))
        if unknown:
            raise bad(f"unknown group(s) {unknown}; known groups: {sorted(GROUPS)}")
        if self.backbone not in BACKBONES:
            raise bad(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if set(self.slots) - set(SLOTS):
            raise bad(f"slots must be among {SLOTS}, got {self.slots}")
        if set(self.train_roles) - set(BACKBONES):
            raise bad(f"train_roles must be among {BACKBONES}, got {self.train_roles}")
        if self.reference is not None:
            if self.reference not in REFERENCES:
                raise bad(f"reference must be one of {REFERENCES}, got {self.reference!r}")
            if self.fit or self.slots or self.two_pass or self.system:
                raise bad("a reference curve has no training, slots, second pass or system")
        if self.slots and self.fit is None:
            raise bad(f"slots {self.slots} need a fit function that trains them")
        if self.fit is not None and not self.train_roles:
            raise bad("a method with fit must name the backbones it trains from (train_roles)")
        if self.two_pass and ("psi" in self.slots or "h" in self.slots):
            raise bad("two_pass (rank merge) searches the old side with phi_old: no psi or h")
        if self.order is not None and not self.order_name:
            raise bad("a method that defines its backfill order names it (order_name)")

    @property
    def query_passes(self) -> int:
        """Backbone forward passes per query: 2 for rank merge, else 1."""
        return 2 if self.two_pass else 1

    @property
    def trainable(self) -> bool:
        return self.fit is not None

    def default_recipe(self, cfg: dict) -> Any:
        """The recipe of this method for the profile ``cfg`` (``None`` if it has none)."""
        return self.recipe(cfg) if self.recipe is not None else None

    def ablation(self, cfg: dict) -> dict[str, bool] | None:
        """Its ablation components (psi, CMCL, L_rev, rho) under the profile's recipe."""
        return None if self.components is None else dict(self.components(self.default_recipe(cfg)))


# --------------------------------------------------------------------------- the registry
_REGISTRY: dict[str, Method] = {}
#: The package's own registrations (what a worker process of :mod:`backfill_utils.parallel` knows).
_BUILTIN: dict[str, Method] = {}
_LOADING: list[bool] = []


def _registry() -> dict[str, Method]:
    """The registry, the package's own methods registered first (:mod:`.builtin`, imported on
    the first use: a lazy import, as builtin registers through this module)."""
    if not _LOADING:
        _LOADING.append(True)
        from . import builtin as MB
    return _REGISTRY


def mark_builtin() -> None:
    """Record the methods registered so far as the package's own (called once, by :mod:`.builtin`)."""
    _BUILTIN.update(_REGISTRY)


def is_builtin(name: str) -> bool:
    """Whether ``name`` is registered with the package's own registration (not replaced or
    added in a notebook): a worker process, which imports the package afresh, can train it.

    >>> is_builtin("Ours"), is_builtin("no such method")
    (True, False)
    """
    return name in _BUILTIN and _registry().get(name) is _BUILTIN[name]


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (at the end of the enumeration order).

    ``replace=True`` replaces a registered method of the same name in place (a
    notebook cell run twice); otherwise a taken name is an error.
    """
    if not isinstance(method, Method):
        raise TypeError(f"register takes a methods.Method, got {type(method).__name__}")
    if method.name in _registry() and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; pick another name "
                         "or pass replace=True")
    _registry()[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove and return the method ``name``."""
    get(name)
    return _registry().pop(name)


def get(name: str) -> Method:
    """The registered method ``name``; an unknown name is an error listing the known ones."""
    try:
        return _registry()[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {list(_registry())}") from None


def names(group: str | None = None) -> list[str]:
    """Registered method names in registration order, optionally only those of ``group``.

    >>> names("fig2")
    ['old', 'new', 'offline', 'RM']
    """
    if group is not None and group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known groups: {sorted(GROUPS)}")
    return [n for n, m in _registry().items() if group is None or group in m.groups]


#: The colour map of methods: one colour per method of the package, far apart in CIELAB (no two
#: closer than Delta E 20, ``tests/backfill/test_registry.py``). Every figure takes a method's colour from
#: here, through :func:`style` / :func:`color`; the registrations below give line styles only.
COLORS: dict[str, str] = {
    "old": "#7f7f7f", "new": "#000000", "offline": "#a6761d",
    "naive": "#bcbd22", "BCT": "#9467bd", "BiCT": "#008080",
    "FCT": "#8c564b", "FastFill": "#e377c2", "FCT-small": "#556b2f", "FastFill-small": "#ad1457",
    "RM": "#1f77b4", "RM+psi": "#2ca02c", "RM+psi+CMCL": "#ff7f0e", "Ours": "#d62728",
    "CMCL-single": "#17becf", "CMCL-separate": "#3f007d", "CMCL w/o L_rev": "#fdbf6f",
}
#: Colours for methods registered outside the package without a colour of their own, in
#: registration order (none of them is in :data:`COLORS`).
SPARE_COLORS = ("#1b9e77", "#e7298a", "#7570b3", "#66a61e", "#e6ab02", "#a6cee3")


def color(name: str) -> str | None:
    """The colour of a registered method: :data:`COLORS`, else the ``color`` of its own
    ``style``, else the next of :data:`SPARE_COLORS`; ``None`` for an unknown name.

    >>> color("Ours"), color("no such method")
    ('#d62728', None)
    """
    m = _registry().get(name)
    if m is None:
        return None
    if name in COLORS and is_builtin(name):
        return COLORS[name]
    if m.style.get("color"):
        return m.style["color"]
    others = [n for n, o in _registry().items() if not (n in COLORS and is_builtin(n)) and not o.style.get("color")]
    return SPARE_COLORS[others.index(name) % len(SPARE_COLORS)]


def style(name: str) -> dict:
    """Matplotlib line style of a registered method: its registered style with its colour
    (:func:`color`); empty for an unknown name."""
    m = _registry().get(name)
    return {**m.style, "color": color(name)} if m is not None else {}


def query_side(name: str) -> list[tuple[str, list[str]]]:
    """The query-side forward of a method: ``[(backbone role, [modules on its output])]``.

    >>> query_side("RM"), query_side("Ours"), query_side("BiCT")
    ([('old', []), ('new', [])], [('new', ['psi', 'rho'])], [('bct', [])])
    """
    m = get(name)
    side = [("old", [])] if m.two_pass else []
    return side + [(m.backbone, [s for s in ("psi", "rho") if s in m.slots])]


def ends_at_new(name: str) -> bool:
    """Whether the curve of ``name`` ends exactly at new/new: its backfilled items and
    queries are plain phi_new (backbone ``"new"``, no rho, not a reference). BCT and
    BiCT end at BCT/BCT, the paper's method at rho/rho.

    >>> [n for n in names("main") if ends_at_new(n)]
    ['naive', 'FCT', 'FastFill', 'FCT-small', 'FastFill-small', 'RM', 'RM+psi', 'RM+psi+CMCL']
    """
    m = get(name)
    return m.reference is None and m.backbone == "new" and "rho" not in m.slots


def components(name: str, cfg: dict) -> dict[str, bool]:
    """Ablation components of ``name`` under the profile ``cfg`` (error if it has none)."""
    m = get(name)
    if m.components is None:
        raise ValueError(f"{name!r} is not an ablation row; methods with components: "
                         f"{[n for n, x in _registry().items() if x.components is not None]}")
    return m.ablation(cfg)


# --------------------------------------------------------------------------- recipes
_SHARED_KEYS = ("epochs", "batch_size", "lr", "tau", "hard_negatives", "samples_per_class",
                "lambda_rev", "distance")


def recipe_from_profile(cls: type[Recipe], cfg: dict, prefix: str | None = None, *, shared: bool = True,
                        **fixed: Any) -> Recipe:
    """A recipe of type ``cls`` from the profile: the shared ``compat`` keys (epochs,
    batch_size, lr and the CMCL keys) that are fields of ``cls`` (unless ``shared=False``:
    a recipe whose defaults are its authors' values), the method's own keys
    ``compat.<prefix>_<field>`` (e.g. ``fastfill_mu``, ``fct_epochs``), ``seed`` and
    ``normalize`` (the profile key ``normalize_embeddings``) from the profile, then ``fixed``
    (what makes the method itself, e.g. ``variant="single"``)."""
    compat = cfg["compat"]
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: compat[k] for k in _SHARED_KEYS if shared and k in fields and k in compat}
    if prefix:
        kw.update({k[len(prefix) + 1:]: v for k, v in compat.items()
                   if k.startswith(prefix + "_") and k[len(prefix) + 1:] in fields})
    kw["seed"] = int(cfg["seed"])
    kw["normalize"] = C.normalize_embeddings(cfg)
    kw.update(fixed)
    return cls(**kw)


def recipe_key(recipe: Any) -> Any:
    """A JSON-able form of a recipe for cache keys: ``Recipe.to_dict()``, a mapping as a
    dict, or ``None``."""
    if recipe is None:
        return None
    if isinstance(recipe, Recipe):
        return recipe.to_dict()
    if isinstance(recipe, Mapping):
        return dict(recipe)
    raise TypeError(f"a recipe is a recipes.Recipe, a JSON-able mapping or None, got {type(recipe).__name__}")
