import pytest

from backfill_utils import cache
from backfill_utils import config as C


@pytest.fixture(autouse=True)
def _compute_mode():
    """Every test starts and ends in compute mode (render mode is process-wide state)."""
    cache.set_mode("compute")
    yield
    cache.set_mode("compute")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty artifact cache for one test."""
    monkeypatch.setenv(C.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_profile(**overrides):
    """The smoke profile shrunk further: 4 classes, a few images, 3 epochs."""
    base = dict(
        dataset_options={"num_classes": 4, "train_per_class": 12, "test_per_class": 4},
        backbone={"arch": "resnet18", "width": 4, "small_stem": False},
        new_backbone={"arch": "resnet18", "width": 8, "small_stem": False},
        embedding_dim=8,
        train={"epochs": 3, "batch_size": 16},
    )
    base.update(overrides)
    return C.load_profile("smoke", **base)


@pytest.fixture(scope="module")
def smoke_extended(tmp_path_factory):
    """The smoke profile's extended setting (backbones trained 4 epochs, compatibility
    modules 2) in an artifact cache of the test module's own."""
    mp = pytest.MonkeyPatch()
    mp.setenv(C.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    mp.setenv("BACKFILL_THREADS", "1")
    yield C.load_profile("smoke", settings=["extended"], train={"epochs": 4}, compat={"epochs": 2})
    mp.undo()
