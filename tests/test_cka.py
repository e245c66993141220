"""CKA / unbiased CKA / mutual-kNN: invariances, independence, numerical safety, agreement with reference forms."""

from __future__ import annotations

import numpy as np
import pytest

from align.eval.cka import (hsic1, knn_indices, linear_cka, linear_cka_gram, mutual_knn, similarity_scores,
                            unbiased_cka)


@pytest.fixture(scope="module")
def feats():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))   # correlated columns
    return rng, X


def _naive_hsic1(X, Y):
    """Song et al. (2012) HSIC_1 written with n×n kernels, straight from the formula."""
    K, L = X @ X.T, Y @ Y.T
    n = len(K)
    np.fill_diagonal(K, 0)
    np.fill_diagonal(L, 0)
    one = np.ones(n)
    return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))


@pytest.mark.parametrize("fn", [linear_cka, unbiased_cka])
def test_identical_rotated_scaled_give_one(feats, fn):
    rng, X = feats
    Q = np.linalg.qr(rng.normal(size=(32, 32)))[0]
    assert fn(X, X) == pytest.approx(1.0, abs=1e-10)
    assert fn(X, X @ Q) == pytest.approx(1.0, abs=1e-10)                  # rotation
    assert fn(X, 7.5 * X) == pytest.approx(1.0, abs=1e-10)                # isotropic scaling
    assert fn(X, 0.01 * X @ Q + 40.0) == pytest.approx(1.0, abs=1e-10)    # all three + offset
    # a non-orthogonal map is NOT an invariance: CKA must notice it
    A = np.diag(np.linspace(0.1, 10, 32))
    assert fn(X, X @ A) < 0.99


def test_independent_features_score_near_zero():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(4000, 16)), rng.normal(size=(4000, 24))
    assert linear_cka(X, Y) < 0.01                                        # biased: ~ d/n, small
    assert abs(unbiased_cka(X, Y)) < 0.003                                # unbiased: centred on 0
    assert mutual_knn(X, Y, k=10) < 0.01                                  # chance = k/(n-1)
    # the unbiased estimator really removes the small-n bias that the plain estimator has
    Xs, Ys = X[:60], Y[:60]
    assert linear_cka(Xs, Ys) > 0.15 and abs(unbiased_cka(Xs, Ys)) < 0.1


def test_fp32_and_fp64_agree_on_badly_centred_inputs(feats):
    rng, X = feats
    Y = np.tanh(X[:, :20]) + 0.5 * rng.normal(size=(500, 20))
    X64, Y64 = X + 1e3, Y - 1e3                                           # huge common offsets
    X32, Y32 = X64.astype(np.float32), Y64.astype(np.float32)
    for fn in (linear_cka, unbiased_cka):
        a, b = fn(X64, Y64), fn(X32, Y32)
        assert abs(a - b) < 1e-5, (fn.__name__, a, b)
        assert fn(X, Y) == pytest.approx(a, abs=1e-9)                     # offsets removed exactly
    # the faster float32-product option: centring in float64 is what matters
    assert abs(linear_cka(X32, Y32, products="float32") - linear_cka(X64, Y64)) < 1e-5
    # the failure mode the centring avoids: HSIC_1 of uncentred float32 kernels is off by orders of magnitude
    naive32 = _naive_hsic1(X32, Y32)
    assert abs(naive32 - hsic1(X, Y)) > 0.5 * abs(hsic1(X, Y))


def test_matches_reference_formulas():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 12)) + 3.0
    Y = X[:, :5] ** 2 + rng.normal(size=(80, 5))
    assert linear_cka(X, Y) == pytest.approx(linear_cka_gram(X, Y), abs=1e-12)
    assert hsic1(X, Y) == pytest.approx(_naive_hsic1(X, Y), rel=1e-9)     # offset-invariant, needs no centring
    # fewer items than features: the n×n branch gives the same answer as the reference
    Xw, Yw = rng.normal(size=(10, 50)), rng.normal(size=(10, 70))
    assert linear_cka(Xw, Yw) == pytest.approx(linear_cka_gram(Xw, Yw), abs=1e-12)
    assert unbiased_cka(Xw, Yw) == pytest.approx(
        _naive_hsic1(Xw - Xw.mean(0), Yw - Yw.mean(0))
        / np.sqrt(_naive_hsic1(Xw - Xw.mean(0), Xw - Xw.mean(0)) * _naive_hsic1(Yw - Yw.mean(0), Yw - Yw.mean(0))),
        abs=1e-9)


def test_mutual_knn_hand_case():
    # points on a line: neighbours of 0 are {1}, of 1 {0 or 2 -> tie broken by topk}, use distinct gaps
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    Y = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert knn_indices(X, 1)[:, 0].tolist() == [1, 0, 3, 2]
    assert knn_indices(Y, 1)[:, 0].tolist() == [2, 3, 0, 1]
    assert mutual_knn(X, Y, k=1) == 0.0
    assert mutual_knn(X, X * 3.0, k=1) == 1.0
    assert mutual_knn(X, Y[[0, 2, 1, 3]], k=1) == 1.0


def test_input_validation():
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(np.ones((5, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        unbiased_cka(np.full((5, 2), np.nan), np.ones((5, 2)))
    with pytest.raises(ValueError, match="need at least 6"):
        mutual_knn(np.ones((5, 2)), np.ones((5, 2)), k=5)
    assert linear_cka(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 3))) == 0.0   # constant input
    s = similarity_scores(np.eye(6), np.eye(6), k=2)
    assert set(s) == {"linear_cka", "unbiased_cka", "mutual_knn"} and s["linear_cka"] == pytest.approx(1.0)
