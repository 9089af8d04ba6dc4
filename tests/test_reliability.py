"""Reliability statistics against values computed by hand (worked out in the comments)."""

import math

import pytest

from selftune.reliability import (bootstrap_ci, cohen_kappa, confusion, length_correlation, panel_agreement,
                                  retest_stats, spearman, swap_consistency)

A = [1, 1, 2, 2, 3, 3]
B = [1, 2, 2, 2, 3, 1]


def test_confusion_table():
    assert confusion(A, B, [1, 2, 3]) == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_kappa_unweighted_and_weighted_by_hand():
    # po = 4/6, rows [2,2,2], cols [2,3,1] -> pe = 12/36 = 1/3 -> kappa = (2/3-1/3)/(2/3) = 0.5
    assert cohen_kappa(A, B, [1, 2, 3]) == pytest.approx(0.5)
    # linear: observed disagreement (0.5 + 1)/6 = 0.25, expected 15/36 -> 1 - 0.6 = 0.4
    assert cohen_kappa(A, B, [1, 2, 3], "linear") == pytest.approx(0.4)
    # quadratic: observed 1.25/6, expected 10.5/36 -> 1 - 5/7 = 2/7
    assert cohen_kappa(A, B, [1, 2, 3], "quadratic") == pytest.approx(2 / 7)
    assert cohen_kappa(A, A, [1, 2, 3]) == pytest.approx(1.0)
    assert cohen_kappa([], [], [1, 2]) is None
    assert cohen_kappa([1, 1], [1, 1], [1, 2]) is None  # chance agreement already perfect


def test_kappa_matches_scikit_learn():
    from sklearn.metrics import cohen_kappa_score

    for w in ("linear", "quadratic"):
        assert cohen_kappa(A, B, [1, 2, 3], w) == pytest.approx(cohen_kappa_score(A, B, weights=w))


def test_ranks_and_spearman_with_ties():
    # ranks y = [1,2,3.5,5,3.5]; sxy = 8, sxx = 10, syy = 9.5 -> r = 8/sqrt(95)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None  # undefined
    assert length_correlation([0.1, 0.5, 0.9], [3, 10, 40]) == pytest.approx(1.0)


def test_test_retest_by_hand():
    r = retest_stats([0.2, 0.6, 0.9, 0.5], [0.4, 0.4, 0.9, 0.5])
    # one verdict flips (0.6 -> 0.4); squared diffs .04+.04 -> mean .02 -> sd sqrt(.01) = .1
    assert r == pytest.approx({"n": 4, "flip_rate": 0.25, "score_sd": 0.1, "mean_abs_diff": 0.1})
    assert retest_stats([], []) == {"n": 0.0}


def test_swap_consistency_counts_the_same_answer_winning():
    # A/B -> B/A keeps the winner; B/B changes it; tie/tie keeps; A/A changes
    assert swap_consistency(["A", "B", "tie", "A"], ["B", "B", "tie", "A"]) == 0.5
    assert swap_consistency([], []) is None


def test_bootstrap_interval_contains_the_statistic_and_is_seeded():
    x = [0.1, 0.4, 0.35, 0.8, 0.9, 0.75, 0.2, 0.6]
    y = [0.2, 0.3, 0.5, 0.7, 1.0, 0.6, 0.1, 0.7]
    stat = lambda idx: spearman([x[i] for i in idx], [y[i] for i in idx])  # noqa: E731
    lo, hi = bootstrap_ci(stat, len(x), seed=3)
    assert lo is not None and hi is not None and lo <= spearman(x, y) <= hi and hi <= 1.0
    assert bootstrap_ci(stat, len(x), seed=3) == (lo, hi)


def test_panel_agreement_by_hand():
    pairs = [(1.0, 0.75), (0.25, 0.75), (0.0, 0.0), (0.5, 0.25)]
    a = panel_agreement(pairs)
    # pass/fail (>= 0.5): agree, disagree, agree, disagree -> 2/4
    assert a["n"] == 4 and a["rate"] == 0.5 and a["disagreement_rate"] == 0.5
    assert a["mean_abs_diff"] == pytest.approx((0.25 + 0.5 + 0 + 0.25) / 4)
    # ranks x [4, 2, 1, 3], y [3.5, 3.5, 1, 2]: sxy 3, sxx 5, syy 4.5 -> 3 / sqrt(22.5)
    assert a["spearman"] == pytest.approx(3 / math.sqrt(22.5))
    assert panel_agreement([]) == {"n": 0.0}
    assert "spearman" not in panel_agreement([(1.0, 1.0), (1.0, 0.0), (1.0, 0.5)])  # one side constant
