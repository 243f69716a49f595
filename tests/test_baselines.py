"""Evidence with its baselines (app/baselines.py): chance F1 and the bootstrap interval of a
probe's F1, checked against scikit-learn on explicit label arrays and an independent bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from app import baselines


@pytest.mark.parametrize("pos,neg", [(1, 0), (3, 97), (50, 50), (200, 5000), (0, 10)])
def test_chance_f1_is_sklearn_s_f1_of_predicting_all_positive(pos, neg):
    y = np.array([1] * pos + [0] * neg)
    want = f1_score(y, np.ones_like(y), zero_division=0)
    assert baselines.chance_f1(pos, neg) == pytest.approx(want, abs=1e-12)
    assert baselines.chance_f1(0, 0) is None and baselines.chance_f1(None, 3) is None


def arrays(tp: int, fp: int, fn: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.array([1] * tp + [0] * fp + [1] * fn + [0] * tn)
    y_pred = np.array([1] * tp + [1] * fp + [0] * fn + [0] * tn)
    return y_true, y_pred


@pytest.mark.parametrize("cells", [(40, 10, 20, 300), (8, 3, 5, 84), (150, 40, 30, 1200), (0, 0, 12, 88), (5, 0, 0, 20)])
def test_the_interval_is_a_bootstrap_of_the_test_set(cells):
    y_true, y_pred = arrays(*cells)
    precision = precision_score(y_true, y_pred, zero_division=0)
    recall = recall_score(y_true, y_pred, zero_division=0)
    pos, neg = int(y_true.sum()), int(len(y_true) - y_true.sum())
    assert baselines.confusion(precision, recall, pos, neg) == cells, "the cells come back from precision and recall"
    got = baselines.f1_interval(precision, recall, pos, neg)
    # an independent bootstrap: resample the examples, score each resample with scikit-learn
    rng = np.random.default_rng(12345)
    draws = [f1_score(y_true[i], y_pred[i], zero_division=0)
             for i in (rng.integers(0, len(y_true), len(y_true)) for _ in range(2000))]
    want = np.percentile(draws, [2.5, 97.5])
    assert got == pytest.approx(want, abs=0.03), (got, want)
    f1 = f1_score(y_true, y_pred, zero_division=0)
    assert got[0] <= f1 <= got[1]


def test_no_interval_on_a_large_test_set_or_unknown_counts():
    assert baselines.f1_interval(0.8, 0.7, 2000, 20000) is None  # 22,000 examples, 2,000 positives: not small
    assert baselines.f1_interval(0.8, 0.7, 500, 20000) is not None  # few positives: small
    assert baselines.f1_interval(0.8, 0.7, None, 10) is None
    assert baselines.f1_interval(None, 0.7, 10, 10) is None
    assert baselines.f1_interval(0.01, 1.0, 10, 10) is None, "precision and recall that do not fit the counts"
    assert baselines.f1_interval(0.5, 0.5, 10, 10) == baselines.f1_interval(0.5, 0.5, 10, 10), "seeded"
