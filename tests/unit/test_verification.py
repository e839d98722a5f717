"""10-fold verification accuracy and TAR@FAR against a known answer and an independent version."""

from __future__ import annotations

import numpy as np
import pytest

from adaface_client.verification import (
    cosine_scores,
    kfold_accuracy,
    roc_curve,
    threshold_at_far,
    verification_result,
)


def pairs_with_cosines(cosines: np.ndarray, dim: int = 64, seed: int = 0) -> np.ndarray:
    """Embeddings [2N, dim] whose consecutive rows have exactly these cosines; random norms."""
    rng = np.random.default_rng(seed)
    out = np.empty((2 * cosines.size, dim))
    for i, c in enumerate(cosines):
        a = rng.normal(size=dim)
        a /= np.linalg.norm(a)
        u = rng.normal(size=dim)
        u -= (u @ a) * a
        u /= np.linalg.norm(u)
        b = c * a + np.sqrt(1.0 - c * c) * u
        out[2 * i] = a * rng.uniform(5, 40)
        out[2 * i + 1] = b * rng.uniform(5, 40)
    return out


def insightface_style_kfold(embeddings: np.ndarray, issame: np.ndarray, n_folds: int = 10):
    """Written the way InsightFace's verification.calculate_roc works: squared L2 distance
    of normalised embeddings, thresholds arange(0, 4, 0.01), predict same when dist < t,
    sklearn KFold(shuffle=False) folds, argmax of train accuracy."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = np.sum(np.square(x[0::2] - x[1::2]), axis=1)
    thresholds = np.arange(0, 4, 0.01)
    n = len(issame)
    sizes = [n // n_folds + (1 if k < n % n_folds else 0) for k in range(n_folds)]
    starts = np.cumsum([0, *sizes])
    accs, best = [], []
    for k in range(n_folds):
        in_test = np.zeros(n, dtype=bool)
        in_test[starts[k] : starts[k + 1]] = True
        train_acc = []
        for t in thresholds:
            correct = np.count_nonzero((dist[~in_test] < t) == issame[~in_test])
            train_acc.append(correct / np.count_nonzero(~in_test))
        t_best = thresholds[int(np.argmax(train_acc))]
        correct = np.count_nonzero((dist[in_test] < t_best) == issame[in_test])
        accs.append(correct / np.count_nonzero(in_test))
        best.append(t_best)
    return np.array(accs), np.array(best)


def test_known_answer_separated_distributions() -> None:
    rng = np.random.default_rng(1)
    n = 600  # 10 folds of 60 pairs
    issame = np.arange(n) % 2 == 0
    cos = np.where(issame, rng.uniform(0.6123, 0.95, n), rng.uniform(-0.3, 0.2, n))
    # Outliers no threshold can fix: one same pair looks like a stranger in fold 0,
    # two different pairs look alike in fold 3.
    cos[::60] = 0.613  # every fold holds the lowest genuine score, so all pick one threshold
    cos[4] = -0.25
    cos[3 * 60 + 7] = 0.9
    cos[3 * 60 + 9] = 0.85
    emb = pairs_with_cosines(cos)
    acc, thr = kfold_accuracy(cosine_scores(emb), issame)
    expected = np.ones(10)
    expected[0] = 59 / 60
    expected[3] = 58 / 60
    np.testing.assert_allclose(acc, expected, atol=1e-12)
    # The first grid threshold (highest similarity) below every genuine score: 0.61.
    np.testing.assert_allclose(thr, 0.61, atol=1e-9)
    result = verification_result(cosine_scores(emb), issame)
    assert result.accuracy_mean == pytest.approx(1 - 3 / 600)
    assert result.accuracy_std == pytest.approx(np.sqrt(np.mean((expected - 1 + 3 / 600) ** 2)))
    assert result.best_threshold == pytest.approx(0.61)


@pytest.mark.parametrize("n_pairs", [600, 487])  # 487: uneven folds (7 of 49, 3 of 48)
def test_matches_insightface_style_reference_on_overlapping_pairs(n_pairs: int) -> None:
    rng = np.random.default_rng(n_pairs)
    issame = rng.random(n_pairs) < 0.5
    cos = np.clip(
        np.where(issame, rng.normal(0.45, 0.2, n_pairs), rng.normal(0.1, 0.2, n_pairs)), -0.99, 0.99
    )
    emb = pairs_with_cosines(cos, seed=n_pairs)
    acc, thr = kfold_accuracy(cosine_scores(emb), issame)
    ref_acc, ref_dist_thr = insightface_style_kfold(emb, issame)
    assert 0.6 < ref_acc.mean() < 0.95  # overlapping: the thresholds matter
    np.testing.assert_allclose(acc, ref_acc, atol=1e-12)
    np.testing.assert_allclose(thr, 1 - ref_dist_thr / 2, atol=1e-9)


def test_tar_at_far_counts() -> None:
    rng = np.random.default_rng(5)
    neg = rng.uniform(-0.5, 0.5, 2000)
    pos = rng.uniform(0.3, 1.0, 500)
    scores = np.concatenate([pos, neg])
    issame = np.concatenate([np.ones(500, bool), np.zeros(2000, bool)])
    t = threshold_at_far(scores, issame, 1e-3)
    # FAR 1e-3 of 2000 negatives allows 2 false accepts: the threshold is the 3rd highest.
    assert t == np.sort(neg)[-3]
    assert np.sum(neg > t) == 2
    result = verification_result(scores, issame, fars=(1e-3, 1e-4))
    tar, thr = result.at_far[1e-3]
    assert thr == t
    assert tar == pytest.approx(np.count_nonzero(pos > t) / 500)
    assert result.at_far[1e-4] is None  # 2000 negatives cannot measure 1 in 10,000


def test_roc_curve_ends() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3])
    issame = np.array([True, False, True, False, True, False])
    roc = roc_curve(scores, issame)
    assert roc.tar[0] == 0 and roc.far[0] == 0
    assert roc.tar[-1] == 1 and roc.far[-1] == 1
    at = list(roc.thresholds).index(0.7)
    assert roc.tar[at] == pytest.approx(2 / 3) and roc.far[at] == 0


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="shape"):
        cosine_scores(np.ones((3, 4)))
    with pytest.raises(ValueError, match="2 labels"):
        kfold_accuracy(np.ones(20), np.ones(2, bool))
    with pytest.raises(ValueError, match="at least 10 pairs"):
        kfold_accuracy(np.ones(5), np.ones(5, bool))
