"""Small synthetic problems shared by the compatibility tests (not a test module)."""

import numpy as np
import pytest
import torch

from backfill_utils.models import CosineClassifier


def unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_per_class=24, n_classes=6, d_new=16, d_old=8, seed=0, noise=0.6):
    """Class clusters in the new space; old = a random rotation of new, truncated to
    d_old dimensions, plus noise (a weaker, incompatible model). Returns
    ``(new, old, labels, centers)`` with unit-length embeddings and class centres."""
    g = np.random.default_rng(seed)
    centers = g.normal(size=(n_classes, d_new))
    y = np.repeat(np.arange(n_classes), n_per_class)
    new = centers[y] + noise * g.normal(size=(len(y), d_new))
    q, _ = np.linalg.qr(g.normal(size=(d_new, d_new)))
    old = (new @ q)[:, :d_old] + noise * g.normal(size=(len(y), d_old))
    return unit(new), unit(old), y, centers


def center_classifier(centers, scale=16.0):
    """A frozen cosine classifier whose class weights are the true class centres: the
    known answer for "which class does a new-space embedding belong to"."""
    clf = CosineClassifier(centers.shape[1], centers.shape[0], scale=scale)
    with torch.no_grad():
        clf.weight.copy_(torch.as_tensor(centers, dtype=torch.float32))
    return clf.requires_grad_(False)


def accuracy(classifier, emb, y):
    with torch.no_grad():
        logits = classifier(torch.as_tensor(emb))
    return float((logits.argmax(1).numpy() == y).mean())


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: one torch thread is faster (and immune to a loaded machine); the
    previous count is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
