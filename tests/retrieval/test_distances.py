"""backfill_utils.retrieval.distances: the one definition of the distances, against float64 brute force."""
import numpy as np
import pytest
import torch

from backfill_utils.retrieval import distances as DS
from backfill_utils.retrieval import metrics as MT

U32 = 2.0 ** -24  # unit roundoff of float32


def _brute(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def _bound(a, b):
    """Float32 error bound of |a|^2 + |b|^2 - 2 a.b in any summation order:
    gamma_(d+3) (|a| + |b|)^2 (Higham 3.1)."""
    n = a.shape[1] + 3
    norms = np.linalg.norm(np.asarray(a, np.float64), axis=1)[:, None] + np.linalg.norm(
        np.asarray(b, np.float64), axis=1)[None, :]
    return n * U32 / (1 - n * U32) * norms ** 2


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 16)).astype(np.float32), rng.normal(size=(11, 16)).astype(np.float32)


def test_squared_euclidean_matches_brute_force(data):
    a, b = data
    d = DS.squared_euclidean(a, b)
    assert d.dtype == torch.float32 and d.shape == (7, 11)
    assert (np.abs(d.numpy() - _brute(a, b)) <= _bound(a, b)).all()
    assert (DS.squared_euclidean(a, a) >= 0).all()  # clamped at 0 against rounding
    # float64 in, float64 out (promotion), same bound scaled to float64 is far tighter
    d64 = DS.squared_euclidean(a.astype(np.float64), b)
    assert d64.dtype == torch.float64
    np.testing.assert_allclose(d64.numpy(), _brute(a, b), rtol=0, atol=1e-10)


def test_squared_euclidean_is_the_engines_arithmetic(data):
    """The same operations as the engine's reference function (same process, same inputs):
    a top-k list ranked by it is the ranking the curves count."""
    a, b = data
    assert torch.equal(DS.squared_euclidean(a, b), MT.pairwise_distances(a, b))


def test_loss_distance_agrees_within_rounding(data):
    a, b = (torch.from_numpy(x) for x in data)
    sq = DS.pairwise_distance(a, b, "squared")
    assert (np.abs(sq.numpy() - _brute(a, b)) <= _bound(a.numpy(), b.numpy())).all()
    eu = DS.pairwise_distance(a, b, "euclidean")
    np.testing.assert_allclose(eu.numpy() ** 2, sq.numpy() + 1e-8, rtol=1e-5, atol=1e-6)
    a.requires_grad_(True)
    DS.pairwise_distance(a, a.detach(), "euclidean").sum().backward()
    assert torch.isfinite(a.grad).all()  # finite where a row meets itself (eps)


def test_paired_euclidean(data):
    a, b = data
    got = DS.paired_euclidean(a, b[:7]).numpy()
    np.testing.assert_allclose(got, np.linalg.norm(a.astype(np.float64) - b[:7], axis=1), rtol=1e-6)


def test_errors_name_the_input(data):
    a, b = data
    with pytest.raises(ValueError, match="query has dimension 16.*gallery has dimension 3"):
        DS.squared_euclidean(a, b[:, :3])
    with pytest.raises(ValueError, match="gallery must be a 2-D"):
        DS.squared_euclidean(a, b[0])
    with pytest.raises(ValueError, match="distance='cosine'"):
        DS.pairwise_distance(torch.from_numpy(a), torch.from_numpy(a), "cosine")
    with pytest.raises(ValueError, match="same shape"):
        DS.paired_euclidean(a, b)
