"""Every on-disk layout end to end, offline.

For each layout written by ``tests/data/layout_files.py`` -- Tiny-ImageNet, ImageNet and
Places-365 as torchvision expects them, Places-365 and plain ImageFolder
``train/`` + ``val/`` (with images of different sizes, greyscale and CMYK files
and an empty class folder) -- the data notebook runs under papermill with
``dataset``, ``data_root`` and ``overrides`` as a user passes them, then one
training epoch of a tiny backbone, the test embeddings and one backfilling
curve run through the package's functions. For CIFAR-100's python archive the
whole series runs through the runner (``backfill_utils.tools.run.run_series``) under
the ``paper`` profile shrunk by ``overrides``. The ImageNet layout without
``meta.bin`` is the same reader as with it (only the class names differ) and is
covered by tests/data/test_layouts.py.

Everything is written to temporary folders (``BACKFILL_RESULTS``,
``BACKFILL_CACHE``); the repository's ``results/`` is checked to be untouched.
Claims of the paper are reported, not asserted, on such runs: the runs must not
fail on them.

Speed: a fresh kernel pays about 5 s of imports (torch, torchvision), more than
most notebooks' own work on these sizes, so every notebook here runs in one
shared kernel (:class:`SharedKernel`): papermill executes each notebook, with
its parameters injected as usual, after a first cell that clears the namespace
and sets the run's ``BACKFILL_*`` variables. That every notebook also runs in a
kernel of its own is what nbval checks in ``make test``; with
``BACKFILL_E2E_FRESH_KERNELS=1`` the CIFAR-100 series runs through the runner
unchanged, a fresh kernel per notebook (about 3 minutes more on 2 cores).
"""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill
import pytest

from backfill_utils import config as C
from backfill_utils import embed as E
from backfill_utils import train as TR
from backfill_utils.backfill import experiments as X
from backfill_utils.figures import illustrate as IL
from backfill_utils.retrieval import metrics as MT
from backfill_utils.tools import run as R
from layout_files import (class_colours, make_image, save_image, write_cifar100, write_imagefolder, write_imagenet,
                     write_places365, write_tinyimagenet)

pytestmark = pytest.mark.slow  # every test here trains or runs end to end

# The smallest datasets every notebook accepts: the open setting needs 5 classes (open_fraction
# 0.2 leaves one test-only class), leave-one-out retrieval 2 test images per class.
CLASSES, PER_CLASS, TEST_PER_CLASS = 5, 8, 4
# The paper profile (ResNet-18 -> ResNet-50, CIFAR stem) shrunk to seconds, as a user passes it.
SERIES_OVERRIDES = ("{backbone: {width: 4}, new_backbone: {width: 4}, embedding_dim: 8, "
                    "train: {epochs: 1, batch_size: 8, num_workers: 0}, embed: {train_passes: 1}, "
                    "compat: {epochs: 1, batch_size: 16, fct_epochs: 1, fct_warmup_epochs: 0, "
                    "fastfill_epochs: 1, fastfill_warmup_epochs: 0}, eval: {num_ratios: 5}}")
# The other layouts: the same, with torchvision's standard stem (their images are 64 or 224 pixels).
LAYOUT_OVERRIDES = ("{backbone: {width: 4, small_stem: false}, embedding_dim: 8, "
                    "train: {epochs: 1, batch_size: 8, num_workers: 0}, eval: {num_ratios: 5}}")
EMPTY_CLASS = "class_02_empty"
FRESH_KERNELS = os.environ.get("BACKFILL_E2E_FRESH_KERNELS", "") not in ("", "0")


# ----------------------------------------------------------------------------- one kernel for every notebook


_PRELUDE = """get_ipython().run_line_magic("reset", "-f")
__spec__ = None  # %reset removes it; spawned worker processes ($BACKFILL_WORKERS > 1) read it
import os as _os, matplotlib.pyplot as _plt
_plt.close("all")
_os.environ.update({env!r})
for _k in {unset!r}:
    _os.environ.pop(_k, None)
del _os, _plt"""


class SharedKernel:
    """One Jupyter kernel in which papermill runs notebook after notebook.

    :meth:`execute_notebook` has papermill's signature (the runner calls it in its
    place); it prepends a cell that clears the namespace, closes the figures and
    gives the kernel the ``BACKFILL_*`` variables of the calling process (as a kernel
    started now would inherit them).
    """

    def __init__(self):
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_client.utils import run_sync

        class Manager(AsyncKernelManager):
            """Remembers the clients nbclient makes (it leaves them open on a kernel it does not own)."""

            def client(self, **kwargs):
                kc = super().client(**kwargs)
                self.clients.append(kc)
                return kc

        self._run_sync = run_sync
        self.km = Manager(kernel_name="python3")
        self.km.clients = []
        run_sync(self.km.start_kernel)(cwd=str(C.NOTEBOOKS_DIR))

    def execute_notebook(self, input_path, output_path, parameters=None, **kwargs):
        nb = nbformat.read(str(input_path), as_version=4)
        env = {k: v for k, v in os.environ.items() if k.startswith("BACKFILL_")}
        unset = [k for k in (C.RESULTS_ENV, C.CACHE_ENV, C.DATA_ENV, C.PROFILE_ENV, C.THREADS_ENV) if k not in env]
        nb.cells.insert(0, nbformat.v4.new_code_cell(_PRELUDE.format(env=env, unset=unset)))
        kwargs.pop("kernel_name", None)
        kwargs.pop("cwd", None)
        kwargs.setdefault("execution_timeout", 300)
        try:
            return _papermill_execute(nb, str(output_path), parameters=parameters, km=self.km, **kwargs)
        finally:
            while self.km.clients:
                self.km.clients.pop().stop_channels()

    def close(self):
        self._run_sync(self.km.shutdown_kernel)(now=True)


_papermill_execute = papermill.execute_notebook


@pytest.fixture(scope="module")
def kernel():
    k = SharedKernel()
    yield k
    k.close()


def results_snapshot() -> dict:
    """Every file under the repository's results/: size and modification time."""
    return {str(p.relative_to(C.RESULTS_DIR)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(C.RESULTS_DIR.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def untouched_results():
    """The state of results/ before this module runs anything."""
    return results_snapshot()


def stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")


# ----------------------------------------------------------------------------- the layouts


def _imagefolder_with_edge_cases(root: Path):
    """ImageFolder with images of different sizes, a greyscale PNG, a CMYK JPEG and an
    empty class folder (in train/ and val/): converted, resized, skipped with a warning."""
    w = write_imagefolder(root, CLASSES, PER_CLASS, TEST_PER_CLASS, size=24, vary_size=True, ext=".jpg")
    rng = np.random.default_rng(1)
    colours = class_colours(CLASSES)
    save_image(root / "train" / w.classes[0] / "grey.png", make_image(colours[0], 20, rng), mode="L")
    save_image(root / "train" / w.classes[1] / "cmyk.jpg", make_image(colours[1], 30, rng), mode="CMYK")
    w.train_counts[0] += 1
    w.train_counts[1] += 1
    for split in ("train", "val"):
        (root / split / EMPTY_CLASS).mkdir()
        (root / split / EMPTY_CLASS / "notes.txt").write_text("not an image")
    return w


WRITERS = {
    "tinyimagenet": lambda r: write_tinyimagenet(r, CLASSES, PER_CLASS, TEST_PER_CLASS, size=16, vary_size=True),
    "imagenet": lambda r: write_imagenet(r, CLASSES, PER_CLASS, TEST_PER_CLASS, size=24, vary_size=True),
    "places365": lambda r: write_places365(r, CLASSES, PER_CLASS, TEST_PER_CLASS, size=24, vary_size=True),
    "places365_imagefolder": lambda r: write_imagefolder(r, CLASSES, PER_CLASS, TEST_PER_CLASS, size=24,
                                                         name="places365"),
    "imagefolder": _imagefolder_with_edge_cases,
}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def layout(request, tmp_path_factory):
    """(layout name, what its writer wrote) -- one dataset per layout, shared by its tests."""
    return request.param, WRITERS[request.param](tmp_path_factory.mktemp(request.param))


def test_data_notebook_reads_every_layout(layout, kernel, untouched_results, tmp_path_factory, monkeypatch):
    """00_data under papermill with -p dataset / data_root / overrides: the dataset's table
    counts what was written, the class splits of the three settings, the sample grid."""
    key, w = layout
    out = tmp_path_factory.mktemp(f"results_{key}")
    monkeypatch.setenv(C.RESULTS_ENV, str(out))
    monkeypatch.setenv(C.CACHE_ENV, str(out / "cache"))
    params = {"profile": "paper", "dataset": w.name, "data_root": str(w.root), "overrides": LAYOUT_OVERRIDES}
    nb = kernel.execute_notebook(C.NOTEBOOKS_DIR / "00_data.ipynb", out / "00_data.ipynb", parameters=params,
                                 progress_bar=False)
    info = pd.read_csv(out / "tables" / "dataset_info.csv").iloc[0]
    assert (info["dataset"], info["classes"]) == (w.name, len(w.classes))
    assert (info["train_images"], info["test_images"]) == (sum(w.train_counts), sum(w.test_counts))
    splits = pd.read_csv(out / "tables" / "class_splits.csv").set_index(["setting", "group"])
    assert splits.loc[("extended", "new"), "train_images"] == sum(w.train_counts)
    assert splits.loc[("open", "test"), "classes"] == 1  # the last class is test-only
    assert splits.loc[("open", "test"), "test_images"] == w.test_counts[-1]
    assert (out / "figures" / "data_samples.png").is_file()
    text = stream_text(nb)
    assert "per row instead of 8" in text  # 4 test images per class: the grid degrades, it does not fail
    if key == "imagefolder":
        assert text.count(EMPTY_CLASS) >= 2  # skipped with a warning naming it, in train/ and val/
    assert results_snapshot() == untouched_results


@pytest.mark.filterwarnings("ignore::backfill_utils.data.layout_folders.EmptyClassFolderWarning")  # asserted above
def test_one_epoch_embeddings_and_a_backfilling_curve(layout, tmp_path_factory, monkeypatch):
    """Train the old and new backbones one epoch on the layout, embed its train split (every
    image decoded: greyscale, CMYK, any size) and its test split, and compute RM's backfilling
    curve, whose ends are old/old and new/new as the engine evaluates them directly. (Not
    against scikit-learn here: a backbone trained one epoch puts images a few 1e-7 apart,
    an order decided by the arithmetic's last bits; tests/retrieval/test_metrics.py checks the engine
    against scikit-learn.)"""
    key, w = layout
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path_factory.mktemp(f"cache_{key}")))
    cfg = C.load_profile("paper", dataset=w.name, data_root=str(w.root), overrides=LAYOUT_OVERRIDES)
    curve, row = X.method_curve(cfg, "extended", "RM", progress=False)
    embs = {}
    for role, classes in (("old", CLASSES // 2), ("new", CLASSES)):
        spec = TR.model_spec(cfg, "extended", role)
        assert spec["num_classes"] == classes and len(TR.load_history(spec)) == 1  # one epoch
        embs[role] = E.get_embeddings(cfg, "extended", role, "test", progress=False)
        emb, labels = embs[role]["emb"], embs[role]["labels"]
        assert emb.shape == (sum(w.test_counts), cfg["embedding_dim"]) and np.isfinite(emb).all()
        assert np.bincount(labels, minlength=CLASSES).tolist() == w.test_counts
    # the training images are the train split (what models train on) and the validation split held out of it
    # (val_fraction): together every image, each decoded once
    train = E.get_embeddings(cfg, "extended", "new", "train", progress=False)
    val = E.get_embeddings(cfg, "extended", "new", "val", progress=False)
    assert train["emb"].shape[0] == 1 and np.isfinite(train["emb"]).all() and np.isfinite(val["emb"]).all()
    assert train["emb"].shape[1] + val["emb"].shape[0] == sum(w.train_counts)
    assert (np.bincount(train["labels"], minlength=CLASSES)
            + np.bincount(val["labels"], minlength=CLASSES)).tolist() == w.train_counts
    shown = IL.gallery_images(cfg, "extended", [0, len(labels) - 1])  # what figures 40 and 41 show
    assert shown.shape[0] == 2 and shown.shape[-1] == 3 and shown.dtype == np.uint8
    assert len(curve) == cfg["eval"]["num_ratios"]
    assert curve["n_backfilled"].iloc[0] == 0 and curve["n_backfilled"].iloc[-1] == sum(w.test_counts)
    assert np.all(np.diff(curve["n_backfilled"]) >= 0)
    for end, role in ((0, "old"), (-1, "new")):
        emb, labels = embs[role]["emb"], embs[role]["labels"]
        ref = MT.evaluate_retrieval(emb, labels, emb, labels, exclude_self=True)
        for metric in ("mAP", "top1", "top5"):
            assert curve[metric].iloc[end] == pytest.approx(ref[metric], abs=1e-9), (role, metric)


# ----------------------------------------------------------------------------- CIFAR-100: the whole series


@pytest.fixture(scope="module")
def cifar_series(request, untouched_results, tmp_path_factory):
    """The runner over every notebook of the series: paper profile, the CIFAR-100 archive."""
    w = write_cifar100(tmp_path_factory.mktemp("cifar"), CLASSES, PER_CLASS, TEST_PER_CLASS)
    out = tmp_path_factory.mktemp("results_cifar")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(C.RESULTS_ENV, str(out))
        mp.setenv(C.CACHE_ENV, str(out / "cache"))
        if not FRESH_KERNELS:
            mp.setattr(papermill, "execute_notebook", request.getfixturevalue("kernel").execute_notebook)
        params = {"data_root": str(w.root), "overrides": SERIES_OVERRIDES}
        table = R.run_series("paper", params)
        cfg = R.resolve("paper", params)
        yield w, out, cfg, table


def test_whole_series_on_the_cifar100_archive(cifar_series, untouched_results):
    w, out, cfg, table = cifar_series
    books = [b.name for b in R.list_notebooks()]
    assert table["notebook"].tolist() == books + ["TOTAL"]
    assert sorted(p.name for p in (out / "executed").glob("*.ipynb")) == books
    assert cfg["dataset"] == "cifar100" and not cfg["reference_run"]
    info = pd.read_csv(out / "tables" / "dataset_info.csv").iloc[0]
    assert (info["classes"], info["train_images"]) == (CLASSES, sum(w.train_counts))
    # the paper's backbones, shrunk: ResNet-18 -> ResNet-50 (heterogeneous), one epoch each
    for setting in cfg["settings"]:
        for role in TR.ROLES:
            spec = TR.model_spec(cfg, setting, role)
            assert spec["model"]["arch"] == ("resnet50" if setting == "heterogeneous" and role != "old" else "resnet18")
            assert len(TR.load_history(spec)) == 1
    summary = pd.read_csv(out / "tables" / "summary_all_methods.csv")
    assert set(summary["setting"]) == set(cfg["settings"])
    for name in ("figures/backfill_animation.gif", "tables/table1.csv", "tables/table2_ablation.csv",
                 "tables/table1_your_own_method.csv", "executed/runtimes.csv"):
        assert (out / name).is_file(), name
    assert results_snapshot() == untouched_results


def test_claims_are_reported_not_asserted_on_the_series(cifar_series):
    """Every claims.csv row that does not hold was printed by 31_backfill (which went on)
    and is in the runner's closing summary."""
    w, out, cfg, table = cifar_series
    claims = pd.read_csv(out / "tables" / "claims.csv")
    failed = claims[claims["checked"].astype(bool) & ~claims["holds"].astype(bool)]
    printed = stream_text(nbformat.read(out / "executed" / "31_backfill.ipynb", as_version=4))
    listed = R.failed_claims(out, out / "executed")
    assert set(claims["setting"]) == set(cfg["settings"]) and claims["checked"].astype(bool).any()
    for r in failed.itertuples():
        assert f"{r.setting} setting: {r.claim}" in printed
        assert any(line.startswith(f"claims.csv: {r.setting} setting: {r.claim}") for line in listed)
