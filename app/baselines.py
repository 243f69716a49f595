"""Evidence with its baselines: what a probe's F1 is worth next to chance, and how sure it is.

- chance F1: the F1 of predicting every test example positive (precision = the positive share
  p, recall 1): 2p / (1 + p). A probe's F1 reads against that, not against 0.
- an interval for a probe's F1 on a small test set: a bootstrap of the test set. The stored
  precision and recall and the test counts give the probe's confusion matrix (TP = recall x
  positives, FP = TP / precision - TP); resampling the test set with replacement is drawing
  the four cells from a multinomial with the test set's size, and the interval is the 2.5th
  and 97.5th percentiles of F1 over BOOTSTRAP_DRAWS draws (seeded: a page shows the same
  interval each time). A test set is small below SMALL_TEST_SET examples or SMALL_TEST_POSITIVES
  positives; larger ones get no interval.
"""

from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_DRAWS = 2000
SMALL_TEST_SET = 10_000
SMALL_TEST_POSITIVES = 1_000
SEED = 0


def chance_f1(test_pos: int | None, test_neg: int | None) -> float | None:
    """The F1 of predicting all positive on a test set with these counts (None if unknown)."""
    if not isinstance(test_pos, int) or not isinstance(test_neg, int) or test_pos < 0 or test_neg < 0:
        return None
    total = test_pos + test_neg
    if total == 0:
        return None
    p = test_pos / total
    return 2 * p / (1 + p)


def confusion(precision: float | None, recall: float | None, test_pos: int, test_neg: int) -> tuple[int, int, int, int] | None:
    """(TP, FP, FN, TN) of a probe from its precision and recall on the test set, or None if they
    do not fit the counts."""
    if precision is None or recall is None or not (math.isfinite(precision) and math.isfinite(recall)):
        return None
    tp = round(recall * test_pos)
    if tp == 0:
        fp = 0  # no true positive: precision 0 says nothing of FP, and F1 is 0 whatever it is
    elif precision <= 0:
        return None
    else:
        fp = round(tp / precision - tp)
    fn, tn = test_pos - tp, test_neg - fp
    if min(tp, fp, fn, tn) < 0:
        return None
    return tp, fp, fn, tn


def f1_interval(precision: float | None, recall: float | None, test_pos: int | None,
                test_neg: int | None) -> list[float] | None:
    """The bootstrap 95% interval of a probe's test F1, [low, high], on a small test set; None on
    a large one, or where the counts are unknown or do not fit."""
    if not isinstance(test_pos, int) or not isinstance(test_neg, int):
        return None
    n = test_pos + test_neg
    if n == 0 or (n >= SMALL_TEST_SET and test_pos >= SMALL_TEST_POSITIVES):
        return None
    cells = confusion(precision, recall, test_pos, test_neg)
    if cells is None:
        return None
    draws = np.random.default_rng(SEED).multinomial(n, np.asarray(cells, dtype=np.float64) / n, size=BOOTSTRAP_DRAWS)
    tp, fp, fn = draws[:, 0], draws[:, 1], draws[:, 2]
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
    low, high = np.percentile(f1, [2.5, 97.5])
    return [float(low), float(high)]
