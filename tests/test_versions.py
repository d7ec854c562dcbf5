"""Code versions in cache keys: the synthetic generator's golden hash, and every kind's versions."""
import hashlib

import numpy as np

from backfill_utils import cache
from backfill_utils.data import api as D

# sha256 of a small sample of make_synthetic (both splits, images then int64 targets).
# The same on numpy's baseline (SSE4.2), AVX2 and AVX-512 code paths (measured on an AMD EPYC
# with NPY_DISABLE_CPU_FEATURES); larger samples can differ by one grey level on a rare pixel.
GOLDEN_SYNTHETIC = {1: "4eb9bfcf231a9842b941b3640c9c1cea9e4f5b4a1864bb1d61d72379cc0a3489"}


def synthetic_sample_hash() -> str:
    h = hashlib.sha256()
    for split in ("train", "test"):
        images, targets = D.make_synthetic(split, seed=3, num_classes=5, per_class=2, image_size=24)
        h.update(np.ascontiguousarray(images).tobytes())
        h.update(np.asarray(targets, dtype=np.int64).tobytes())
    return h.hexdigest()


def test_synthetic_generator_output_matches_its_version():
    version = D.SYNTHETIC_VERSION
    got = synthetic_sample_hash()
    assert version in GOLDEN_SYNTHETIC, (
        f"data.SYNTHETIC_VERSION is {version} but tests/test_versions.py has no golden hash for it; "
        f"record GOLDEN_SYNTHETIC[{version}] = {got!r}")
    assert got == GOLDEN_SYNTHETIC[version], (
        "the synthetic generator's output changed without a version bump: bump data.SYNTHETIC_VERSION "
        f"(now {version}) and record GOLDEN_SYNTHETIC[{version + 1}] = {got!r} in tests/test_versions.py "
        "(cached models and artifacts made from the old data are then never served)")


def test_every_kind_resolves_its_versions():
    for kind in cache.KINDS:
        versions = cache.code_versions(kind)
        assert versions and all(isinstance(v, int) and v >= 1 for v in versions.values()), kind
    # a kind's lineage: what invalidates embeddings invalidates everything computed from them
    for child, parent in (("compat", "embeddings"), ("curves", "compat"), ("experiments", "curves")):
        assert set(cache.code_versions(parent)) <= set(cache.code_versions(child))
