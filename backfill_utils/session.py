"""The set-up of a notebook of the series: one call instead of a pasted cell.

Every notebook starts with its ``parameters`` cell (literals only, papermill
injects values there) and then::

    from backfill_utils import session
    run = session.setup(profile, dataset, data_root, seed, overrides, download, kind="render")

:func:`setup` loads the profile with the parameters and ``overrides`` (the
profile's strict check: an unknown key is an error naming the known keys),
picks the run's results folder (``results/`` only for the default profile as it
is, :func:`config.output_dir`), puts the process in compute or render mode
(:mod:`backfill_utils.io`: a render notebook never trains or evaluates; a
missing artifact is an error naming the notebook to run first), applies the
figure style and prints one line saying what runs where.

The returned :class:`Run` saves figures and tables under the run's folder and
checks the paper's claims: asserted on the reference run of the default
profile (``run.strict``), reported on any other run (a line starting with
:data:`CLAIM_MARK` in the notebook's output, which the runner's summary
collects).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import pandas as pd

from . import cache
from . import config as C

CLAIM_MARK = "CLAIM DOES NOT HOLD on this run:"
# every check of claims prints one line starting with this and the number of claims it checked
# (the runner's summary adds them up: a run that checked none says so)
CHECKED_MARK = "claims checked on this run:"
KINDS = ("compute", "render")


@dataclasses.dataclass
class Run:
    """One notebook's run: configuration, output folder, claim policy."""

    cfg: dict
    out: Path
    strict: bool
    kind: str
    failed_claims: list = dataclasses.field(default_factory=list)
    own: str | None = None  # the name of a run on own embeddings (notebook 61), whose folder is ``out``

    def figure(self, fig, name: str, *, inline: str = "png") -> None:
        """Save ``fig`` as ``<out>/figures/<name>.{png,pdf}`` (deterministic files) and
        print where.

        ``inline="png"``: the figure stays open, so Jupyter's inline backend shows it
        under the cell (in JupyterLab and in the executed copy). ``inline="jpeg"``:
        shown now as a JPEG and closed (photo-like grids whose PNG would make the
        executed notebook large; the files are unchanged).
        """
        from .figures import style as ST

        if inline not in ("png", "jpeg"):
            raise ValueError(f"inline must be 'png' or 'jpeg', got {inline!r}")
        self._saved(ST.save_figure(fig, self.out / "figures", name))
        if inline == "jpeg":
            from IPython.display import display

            display(ST.jpeg_image(fig))
            import matplotlib.pyplot as plt

            plt.close(fig)

    def table(self, df: pd.DataFrame, name: str, **kwargs) -> None:
        """Save ``df`` as ``<out>/tables/<name>.{csv,md,tex}`` (``plots.save_table``) and print where."""
        from .figures import style as ST

        self._saved(ST.save_table(df, self.out / "tables", name, **kwargs))

    def _saved(self, paths: list[Path]) -> None:
        first = paths[0]
        try:
            first = first.relative_to(self.out)
        except ValueError:
            pass
        print(f"saved {first}" + "".join(f", {p.suffix}" for p in paths[1:]))

    def expect(self, holds: bool, claim: str, detail: object = "", *, asserted: bool = True) -> bool:
        """A claim of the paper: asserted when ``strict`` (and ``asserted``), otherwise reported.

        Prints one :data:`CHECKED_MARK` line. On a non-reference run, or for ``asserted=False``
        (a single-seed observation whose noise is unknown), a claim that does not hold prints
        one line starting with :data:`CLAIM_MARK` and the series goes on. Returns ``holds``.
        """
        holds = bool(holds)
        print(f"{CHECKED_MARK} 1 ({claim}: {'holds' if holds else 'does not hold'})")
        if not holds:
            line = f"{CLAIM_MARK} {claim}" + (f" ({detail})" if detail != "" else "")
            self.failed_claims.append(line)
            if self.strict and asserted:
                raise AssertionError(f"{line}; this is the reference run of the default profile, "
                                     "where every claim is asserted")
            print(line)
        return holds

    def optional(self, load):
        """``load()``, or ``None`` when it raises :class:`~backfill_utils.cache.MissingArtifactError`
        on a run other than the reference run (the message is printed: what is missing and
        the target that makes it). On the reference run of the default profile the error
        is raised: its outputs are committed."""
        try:
            return load()
        except cache.MissingArtifactError as exc:
            if self.strict:
                raise
            print(f"NOT RENDERED on this run: {exc}")
            return None

    def check_claims(self, claims: pd.DataFrame, asserted=None) -> pd.DataFrame:
        """Report every checked claim of a claims table (``claims.seed_claims``, or
        ``claims.over_seeds`` with a ``verdict`` over seeds) that does not hold, named by its
        text and its id; when ``strict``, assert the claims ``asserted``: a collection of claim
        or group ids (``claims.ASSERTED``; an unknown id is an error; in a table with a
        ``setting`` column, in ``claims.ASSERTED_SETTING`` only), or by default the
        table's ``asserted`` column (set from the ids of ``claims.ASSERTED``), or every row
        of a table without one. With verdicts, an asserted claim must hold by more than two
        standard deviations (``claims.HOLDS``). Prints one :data:`CHECKED_MARK` line with the
        number of checked rows. Returns the failed rows."""
        from .studies.claims import ASSERTED_SETTING, CLAIMS, HOLDS, check_asserted

        checked = claims["checked"].astype(bool)
        failed = claims[checked & ~claims["holds"].astype(bool)]
        if asserted is None:
            mask = (claims["asserted"].astype(bool) if "asserted" in claims.columns
                    else pd.Series(True, index=claims.index))
        else:
            ids = check_asserted(asserted)
            groups = {c.id: c.group for c in CLAIMS}
            mask = claims["id"].map(lambda i: i in ids or groups.get(i) in ids).astype(bool)
            if "setting" in claims.columns:
                mask &= claims["setting"] == ASSERTED_SETTING
        with_verdict = "verdict" in claims.columns
        fatal = []
        for i, row in claims[checked].iterrows():
            where = f"{row['setting']} setting: " if "setting" in row else ""
            named = f"{row['claim']} [{row['id']}]" if "id" in row else row["claim"]
            numbers = f"value {row['value']:.2f}, reference {row['reference']:.2f}"
            if with_verdict:
                numbers += f", difference {row['diff']:.2f} +- {row['diff_sd']:.2f} over {row['seeds']} seed(s)"
            ok = bool(row["holds"])
            if not ok:
                line = f"{CLAIM_MARK} {where}{named} ({numbers})"
                self.failed_claims.append(line)
                print(line)
            elif with_verdict and row["verdict"] != HOLDS:
                print(f"claim holds within noise only: {where}{named} ({numbers})")
            beyond = row["verdict"] == HOLDS if with_verdict else ok
            if self.strict and mask[i] and not beyond:
                fatal.append(f"{where}{named} ({row['verdict'] if with_verdict else 'fails'}; {numbers})")
        n = int(checked.sum())
        print(f"{CHECKED_MARK} {n} (" + ("all hold" if failed.empty else f"{len(failed)} do not hold") + ")")
        if fatal:
            raise AssertionError("on the reference run of the default profile every asserted claim must "
                                 "hold" + (" by more than two standard deviations" if with_verdict else "")
                                 + ":\n" + "\n".join(fatal))
        return failed


def describe(cfg: dict, out: Path, dataset: str | None = None) -> str:
    """One line: profile, dataset (``dataset``, else the profile's), seed, overrides and output folder."""
    try:
        where = out.relative_to(C.REPO_ROOT)
    except ValueError:
        where = out
    changes = {k: v for k, v in cfg.get("run_changes", {}).items() if k not in ("dataset", "seed")}
    return (f"profile={cfg['profile']} dataset={dataset or cfg['dataset']} seed={cfg['seed']} "
            f"overrides={changes or 'none'} -> {where}/")


def run_args(profile: str | None, params: Mapping) -> str:
    """The runner's arguments (``--profile``, ``-p name value``) for a notebook's
    parameters ``params``, shell-quoted; nothing for the default profile as it is.

    >>> print(run_args("smoke", {"seed": 3, "overrides": {"train": {"epochs": 1}}}))
     --profile smoke -p seed 3 -p overrides '{"train": {"epochs": 1}}'
    """
    import json
    import shlex

    args = [] if profile in (None, "default") else ["--profile", str(profile)]
    for name, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif not isinstance(value, str):
            value = json.dumps(value, default=str)  # JSON is YAML, the runner's -p values
        args += ["-p", name, value]
    return "".join(" " + shlex.quote(a) for a in args)


def missing_inputs_note(reads=None) -> str | None:
    """For a render notebook that reads artifacts of the kinds ``reads`` (default: all
    of :data:`io.KINDS`): when the cache holds none of some of them (a fresh clone), the
    lines that say so and give the runner's command that computes them
    (:func:`io.compute_command`, with this notebook's parameters); else ``None``."""
    absent = cache.absent_kinds(reads)
    if not absent:
        return None
    return (f"INPUTS NOT COMPUTED YET: this notebook only renders, and the artifact cache ({C.cache_dir()}) holds "
            f"no {', '.join(absent)} yet. Compute them first (the compute notebooks, with these parameters):\n"
            f"    {cache.compute_command(cache.producers(absent))}\n"
            "then run this notebook again.")


def setup(profile: str | None = None, dataset: str | None = None, data_root: str | None = None,
          seed: int | None = None, overrides: Mapping | str | None = None, download: bool = False,
          *, kind: str = "render", style: bool = True, reads=None, own: str | None = None) -> Run:
    """Load the run's configuration and set the notebook up (see the module docstring).

    ``kind``: ``"compute"`` (may train and evaluate, writes to the cache) or
    ``"render"`` (reads the cache only). Prints one line (:func:`describe`); before it,
    for a render notebook whose inputs are not computed yet, the command that computes
    them (:func:`missing_inputs_note`; ``reads``: the artifact kinds it reads, default
    all of :data:`io.KINDS`; ``()`` for one that reads no cache). ``own``: the name of a
    run on own embeddings (``own_models.own_run_name``): its outputs go to
    ``<run folder>/own_models/<own>/``, apart from the series', the line names the
    dataset ``own:<own>``, and no claim is asserted.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = C.load_profile(profile, dataset=dataset, data_root=data_root, seed=seed,
                         overrides=overrides, download=bool(download))
    from .data.api import check_dataset_options

    check_dataset_options(cfg["dataset"], cfg.get("dataset_options"))
    out = C.output_dir(cfg)
    strict = cfg["run_name"] == "default" and own is None
    if own is not None:
        own = str(own)
        if not own or Path(own).name != own or own in (".", ".."):
            raise ValueError(f"own must be a plain folder name, got {own!r}")
        out = out / "own_models" / own
    params = {k: v for k, v in dict(profile=cfg["profile"], dataset=dataset, data_root=data_root,
                                    seed=seed, overrides=overrides).items() if v not in (None, "", {})}
    given = {k: v for k, v in params.items() if k != "profile"}
    if download:
        given["download"] = True
    cache.set_mode(kind, hint="with the same parameters (" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")",
                run_args=run_args(cfg["profile"] if C.profile_name(profile) == cfg["profile"] else profile, given))
    note = missing_inputs_note(reads) if kind == "render" else None
    if note:
        print(note)
    if style:
        from .figures import style as ST

        ST.style()
    policy = "claims asserted" if strict else "claims reported, not asserted"
    line = describe(cfg, out, f"own:{own}" if own is not None else None)
    print(f"{line} ({kind} notebook; {policy}; CPU code path {C.code_path()})")
    return Run(cfg=cfg, out=out, strict=strict, kind=kind, own=own)
