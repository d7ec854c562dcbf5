"""make_synthetic_draw: new images of the same classes, from a stream of their own."""
import numpy as np
import pytest

from backfill_utils.data import synthetic as S
from backfill_utils.data.api import make_synthetic, make_synthetic_draw

SMALL = dict(num_classes=10, per_class=20, image_size=16)


def _class_means(images, targets, n):
    x = images.reshape(len(images), -1).astype(np.float64)
    return np.stack([x[targets == c].mean(axis=0) for c in range(n)])


def test_a_draw_is_new_images_with_the_same_labels():
    own, own_t = make_synthetic("test", **SMALL)
    a, a_t = make_synthetic_draw(0, **SMALL)
    b, b_t = make_synthetic_draw(1, **SMALL)
    assert a.shape == own.shape and a.dtype == own.dtype
    assert sorted(a_t.tolist()) == sorted(own_t.tolist()) == sorted(b_t.tolist())
    assert (a != own).mean() > 0.5 and (a != b).mean() > 0.5


def test_the_same_draw_gives_the_same_bytes_after_the_memo_is_cleared():
    a, a_t = make_synthetic_draw(3, **SMALL)
    a, a_t = a.copy(), a_t.copy()
    S._make_synthetic_cached.cache_clear()
    b, b_t = make_synthetic_draw(3, **SMALL)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a_t, b_t)


def test_the_split_itself_is_unchanged_after_a_draw():
    S._make_synthetic_cached.cache_clear()
    before = make_synthetic("test", **SMALL)[0].copy()
    S._make_synthetic_cached.cache_clear()
    make_synthetic_draw(2, **SMALL)
    np.testing.assert_array_equal(make_synthetic("test", **SMALL)[0], before)


def test_a_draw_shows_the_classes_of_its_seed():
    """Each class's mean image in a draw lies near the same class's mean in the test
    split (as near as the train split's, which shares the identities), far nearer than
    other classes' means; with another seed (other identities) it does not."""
    knobs = dict(SMALL, per_class=40)
    ref = _class_means(*make_synthetic("test", **knobs), 10)
    off = ~np.eye(10, dtype=bool)
    gap = {}
    for name, (images, targets) in {"draw": make_synthetic_draw(5, **knobs),
                                    "train": make_synthetic("train", **knobs),
                                    "other seed": make_synthetic("test", seed=1, **knobs)}.items():
        d = ((_class_means(images, targets, 10)[:, None] - ref[None]) ** 2).sum(-1)
        gap[name] = np.diag(d).mean() / d[off].mean()  # same class / other classes
    assert gap["draw"] < 0.5 and gap["train"] < 0.5
    assert gap["draw"] < 1.5 * gap["train"]
    assert gap["other seed"] > 0.8


@pytest.mark.parametrize("bad", [-1, True, 1.5, "0", None])
def test_a_bad_draw_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="draw must be an integer >= 0"):
        make_synthetic_draw(bad, **SMALL)
