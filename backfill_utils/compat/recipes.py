"""Training recipes of the compatibility modules: one frozen dataclass per recipe.

A recipe holds every hyperparameter of one way of training a compatibility module, as
plain fields that a tuner can vary one at a time (``dataclasses.replace`` or
:meth:`Recipe.replace`), and nothing else: combinations that make no sense cannot be
written down. Recipes are validated on construction (the error names the field), are
JSON-able (:meth:`Recipe.to_dict`, inverted by :func:`recipe_from_dict`) so that they can
go into cache keys, and are trained by the ``fit_*`` functions of
:mod:`backfill_utils.compat.fit`.

=====================  ==================================================  ===============
recipe                 what it trains                                      trained by
=====================  ==================================================  ===============
``RevPsiRecipe``       psi with L_rev only (the RM+psi baseline)           ``fit_reverse``
``CMCLPsiRecipe``      psi with L_CMCL (``joint``/``single``) + lambda     ``fit_reverse``
                       L_rev, the new model frozen
``CMCLPsiRhoRecipe``   psi and rho with L_CMCL (``joint``/``separate``)    ``fit_reverse``
                       + lambda L_rev (the paper's full method)
``FCTRecipe``          FCT's h, old -> new, squared error (the authors'    ``fit_fct``
                       transformation and schedule by default)
``FastFillRecipe``     h + uncertainty head, regression + mu * CE through  ``fit_fastfill``
                       the frozen new classifier, uncertainty-weighted
``BiCTRecipe``         h, old -> BCT-new space, regression + CE through    ``fit_bict``
                       the frozen BCT classifier
=====================  ==================================================  ===============

Shared fields (every recipe): ``epochs``, ``batch_size``, ``lr``, ``optimizer`` (``adam``
or ``sgd`` with momentum 0.9), ``weight_decay``, ``hidden`` (hidden width of the trained
MLP, ``None`` = twice its input dimension), ``depth`` (number of hidden layers, each
``Linear -> BatchNorm1d -> ReLU``), ``normalize`` (L2-normalise the cached embeddings
first, and the trained modules' inputs and outputs; the profile key
``normalize_embeddings``), ``warmup_epochs`` (a linear warm-up of the learning rate over that
many epochs before the cosine decay, ``0``: cosine from the start), ``bn_eval_half``
(BatchNorm layers in eval mode for the second half of the epochs, as FCT's authors train)
and ``seed``. The defaults are the package's defaults before recipes existed
(``COMPAT_VERSION`` 1), so ``CMCLPsiRhoRecipe()`` trains exactly what the old flag
interface ``train_reverse(use_cmcl=True, learn_new=True)`` trained (checked when the
recipes were introduced, commit 8a7b616; the flag interface is gone).

>>> r = CMCLPsiRhoRecipe(tau=0.05)
>>> r.to_dict()["recipe"], r.to_dict()["tau"]
('cmcl_psi_rho', 0.05)
>>> recipe_from_dict(r.to_dict()) == r
True
>>> CMCLPsiRecipe(variant="separate")
Traceback (most recent call last):
...
ValueError: CMCLPsiRecipe.variant must be one of ('joint', 'single'), got 'separate'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

from .losses import DISTANCES, REGRESSIONS

__all__ = [
    "Recipe",
    "RevPsiRecipe",
    "CMCLPsiRecipe",
    "CMCLPsiRhoRecipe",
    "FCTRecipe",
    "FastFillRecipe",
    "AUTHORS_FCT",
    "BiCTRecipe",
    "RECIPES",
    "recipe_from_dict",
]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """Fields shared by every recipe (see the module docstring); not used directly."""

    name: ClassVar[str] = ""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    hidden: int | None = None
    depth: int = 1
    normalize: bool = True
    warmup_epochs: int = 0
    bn_eval_half: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise TypeError(f"Recipe is the shared base; use one of {sorted(RECIPES)}")
        self._validate()

    # -- validation helpers: coerce in place (frozen), name the field on error -------- #
    def _fail(self, field: str, what: str) -> None:
        raise ValueError(f"{type(self).__name__}.{field} must be {what}, "
                         f"got {getattr(self, field)!r}")

    def _int(self, field: str, lo: int, none_ok: bool = False) -> None:
        v = getattr(self, field)
        if v is None and none_ok:
            return
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            self._fail(field, f"an integer >= {lo}" + (" or None" if none_ok else ""))
        object.__setattr__(self, field, int(v))

    def _float(self, field: str, lo: float, *, open_lo: bool = False, hi: float | None = None) -> None:
        v = getattr(self, field)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            self._fail(field, "a finite number")
        bad = (v <= lo) if open_lo else (v < lo)
        if bad or (hi is not None and v >= hi):
            span = f"{'>' if open_lo else '>='} {lo}" + (f" and < {hi}" if hi is not None else "")
            self._fail(field, f"a number {span}")
        object.__setattr__(self, field, float(v))

    def _choice(self, field: str, choices: tuple) -> None:
        if getattr(self, field) not in choices:
            self._fail(field, f"one of {choices}")

    def _validate(self) -> None:
        self._int("epochs", 1)
        self._int("batch_size", 2)
        self._float("lr", 0.0, open_lo=True)
        self._choice("optimizer", OPTIMIZERS)
        self._float("weight_decay", 0.0)
        self._int("hidden", 1, none_ok=True)
        self._int("depth", 1)
        for flag in ("normalize", "bn_eval_half"):
            if not isinstance(getattr(self, flag), bool):
                self._fail(flag, "True or False")
        self._int("warmup_epochs", 0)
        if self.warmup_epochs >= self.epochs:
            self._fail("warmup_epochs", f"smaller than epochs ({self.epochs})")
        self._int("seed", 0)

    # -- public ------------------------------------------------------------------------ #
    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"recipe": name, field: value, ...}``; :func:`recipe_from_dict`
        rebuilds the recipe."""
        return {"recipe": self.name, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RevPsiRecipe(Recipe):
    """psi (new -> old) trained with L_rev only, on shuffled batches; needs no labels."""

    name: ClassVar[str] = "rev_psi"


@dataclass(frozen=True)
class _CMCLRecipe(Recipe):
    """Fields of the CMCL recipes: the loss ``L_CMCL + lambda_rev * L_rev`` on
    class-balanced batches of ``samples_per_class`` samples per class."""

    tau: float = 0.1
    hard_negatives: int | None = None
    samples_per_class: int = 4
    lambda_rev: float = 1.0
    distance: str = "euclidean"

    def _validate(self) -> None:
        super()._validate()
        self._float("tau", 0.0, open_lo=True)
        self._int("hard_negatives", 1, none_ok=True)
        self._int("samples_per_class", 1)
        if self.batch_size // self.samples_per_class < 2:
            raise ValueError(
                f"{type(self).__name__}.batch_size={self.batch_size} with samples_per_class="
                f"{self.samples_per_class} leaves fewer than 2 classes per batch (no negatives): "
                f"batch_size must be >= 2 * samples_per_class"
            )
        self._float("lambda_rev", 0.0)
        self._choice("distance", DISTANCES)


@dataclass(frozen=True)
class CMCLPsiRecipe(_CMCLRecipe):
    """psi trained with CMCL against the frozen new model: ``variant="joint"`` (the
    paper's loss, RM+psi+CMCL) or ``"single"`` (the backward system only).
    ``lambda_rev=0`` ablates L_rev. (``"separate"`` needs rho: with a frozen new model
    it gives psi exactly the gradient of ``"single"``.)"""

    name: ClassVar[str] = "cmcl_psi"
    variant: str = "joint"

    def _validate(self) -> None:
        super()._validate()
        self._choice("variant", ("joint", "single"))


@dataclass(frozen=True)
class CMCLPsiRhoRecipe(_CMCLRecipe):
    """psi and rho trained jointly with CMCL, the new system being ``rho(phi_new)``:
    ``variant="joint"`` (the paper's full method, "Ours") or ``"separate"``. ``rho_hidden``
    / ``rho_depth`` size rho as ``hidden`` / ``depth`` size psi."""

    name: ClassVar[str] = "cmcl_psi_rho"
    variant: str = "joint"
    rho_hidden: int | None = None
    rho_depth: int = 1

    def _validate(self) -> None:
        super()._validate()
        self._choice("variant", ("joint", "separate"))
        self._int("rho_hidden", 1, none_ok=True)
        self._int("rho_depth", 1)


#: FCT's transformation as its authors train it (apple/ml-fct ``configs/cifar100_transformation.yaml``,
#: ``train_transformation.py``): ``MLP_BN_SIDE_PROJECTION`` with ``inner_dim`` 2048, Adam at lr 5e-4
#: with weight decay 3.0517578125e-5, batch 1024, a cosine schedule after 5 warm-up epochs over 80
#: epochs, BatchNorm in eval mode for the second half, ``nn.MSELoss`` (the mean over dimensions).
AUTHORS_FCT = dict(epochs=80, batch_size=1024, lr=5e-4, optimizer="adam", weight_decay=3.0517578125e-5,
                   hidden=2048, depth=2, warmup_epochs=5, bn_eval_half=True, arch="side_projection",
                   regression="mean")
ARCHS = ("side_projection", "mlp")


@dataclass(frozen=True)
class _ForwardRecipe(Recipe):
    """Fields of FCT and FastFill: ``arch`` (``side_projection``: the authors'
    :class:`~backfill_utils.compat.modules.SideProjection` with ``hidden`` = its ``inner_dim`` and
    ``depth`` = the number of ``inner_dim`` blocks of its mixer; ``mlp``: this package's
    small MLP, ``hidden`` default twice the input dimension) and ``regression``
    (``mean``: the squared error averaged over the dimensions, ``nn.MSELoss`` of the
    authors' code; ``sum``: summed over them, ``d`` times larger on the same vectors).
    The defaults are the authors' values (:data:`AUTHORS_FCT`)."""

    epochs: int = AUTHORS_FCT["epochs"]
    batch_size: int = AUTHORS_FCT["batch_size"]
    lr: float = AUTHORS_FCT["lr"]
    weight_decay: float = AUTHORS_FCT["weight_decay"]
    hidden: int | None = AUTHORS_FCT["hidden"]
    depth: int = AUTHORS_FCT["depth"]
    warmup_epochs: int = AUTHORS_FCT["warmup_epochs"]
    bn_eval_half: bool = AUTHORS_FCT["bn_eval_half"]
    arch: str = AUTHORS_FCT["arch"]
    regression: str = AUTHORS_FCT["regression"]

    def _validate(self) -> None:
        super()._validate()
        self._choice("arch", ARCHS)
        self._choice("regression", REGRESSIONS)
        if self.arch == "side_projection" and self.hidden is None:
            self._fail("hidden", "the inner width of the side projection (an integer >= 1)")


@dataclass(frozen=True)
class FCTRecipe(_ForwardRecipe):
    """FCT's h (old -> new, no side information: the old embedding is its own side
    information, as in the authors' code without a side-information model) trained with
    the squared error to ``phi_new``; defaults: the authors' recipe."""

    name: ClassVar[str] = "fct"


@dataclass(frozen=True)
class FastFillRecipe(_ForwardRecipe):
    """FastFill (Jaeckle et al., ICLR 2023) as in its authors' code: per-sample
    ``regression + mu * CE(classifier_new(h(phi_old(x))), y)`` weighted by the predicted
    uncertainty, ``0.5 exp(-s) (...) + mu_uncertainty * s``, on FCT's transformation and
    training recipe.

    Authors' values: ``mu = 1`` (``mu_disc``), ``label_smoothing = 0.1``,
    ``mu_uncertainty = 0.5``, the element-wise MSE averaged over the dimensions
    (``regression = "mean"``, the class default). On unit-length embeddings that term is
    ``d`` times smaller than on the authors' unnormalised features (norm of order
    ``sqrt(d)``), which gives the cross-entropy far more weight than in their runs;
    ``regression = "sum"`` restores their balance up to a factor of order 1, and the
    registry's FastFill uses it when the profile normalises the embeddings
    (:func:`backfill_utils.backfill.builtin.fastfill_regression`; the tuning searches both).
    ``mu = 0``: no classification term.
    """

    name: ClassVar[str] = "fastfill"
    mu: float = 1.0
    label_smoothing: float = 0.1
    mu_uncertainty: float = 0.5

    def _validate(self) -> None:
        super()._validate()
        self._float("mu", 0.0)
        self._float("label_smoothing", 0.0, hi=1.0)
        self._float("mu_uncertainty", 0.0, open_lo=True)


@dataclass(frozen=True)
class BiCTRecipe(Recipe):
    """BiCT's forward transformation h (old -> the backward-compatible new model's
    space, Su et al., arXiv 2204.13919): ``feature_weight * ||h(phi_old) - phi_bct||^2 +
    ce_weight * CE(classifier_bct(h(phi_old(x))), y)``; at least one weight > 0."""

    name: ClassVar[str] = "bict"
    ce_weight: float = 1.0
    feature_weight: float = 1.0
    label_smoothing: float = 0.0

    def _validate(self) -> None:
        super()._validate()
        self._float("ce_weight", 0.0)
        self._float("feature_weight", 0.0)
        self._float("label_smoothing", 0.0, hi=1.0)
        if self.ce_weight == 0 and self.feature_weight == 0:
            raise ValueError("BiCTRecipe.ce_weight and BiCTRecipe.feature_weight are both 0: "
                             "nothing to train; set at least one > 0")


RECIPES: dict[str, type[Recipe]] = {
    cls.name: cls
    for cls in (RevPsiRecipe, CMCLPsiRecipe, CMCLPsiRhoRecipe, FCTRecipe, FastFillRecipe, BiCTRecipe)
}


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """Inverse of :meth:`Recipe.to_dict`; an unknown recipe or field is an error."""
    d = dict(d)
    name = d.pop("recipe", None)
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not one of {sorted(RECIPES)}")
    cls = RECIPES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for recipe {name!r}; its fields are "
                         f"{sorted(known)}")
    return cls(**d)
