"""Metric functions against hand-computed values (and scikit-learn when it is installed)."""

from __future__ import annotations

import numpy as np
import pytest

from poisonscan.eval import metrics as M


Y = np.array([1, 0, 1, 1, 0, 0, 0, 1])
S = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1])


def test_precision_recall_f1_by_hand() -> None:
    out = M.precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (2, 1, 1, 1)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["removed"] == 3
    empty = M.precision_recall_f1([1, 0], [0, 0])
    assert empty["precision"] == 0.0 and empty["recall"] == 0.0 and empty["f1"] == 0.0


def test_auroc_by_hand_and_ties() -> None:
    # positives at 0.9, 0.7, 0.6, 0.1; negatives 0.8, 0.5, 0.4, 0.3
    # pairs won: 0.9 -> 4, 0.7 -> 3, 0.6 -> 3, 0.1 -> 0 = 10 of 16
    assert M.auroc(Y, S) == pytest.approx(10 / 16)
    # a tie between a positive and a negative counts one half
    assert M.auroc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.auroc([1, 1, 0], [1.0, 0.2, 0.2]) == pytest.approx((1 + 0.5) / 2)
    assert M.auroc([1, 1], [0.1, 0.2]) is None


def test_roc_and_tpr_at_fpr() -> None:
    fpr, tpr, thr = M.roc_curve(Y, S)
    assert fpr[0] == 0 and tpr[0] == 0 and np.isinf(thr[0])
    assert fpr[-1] == 1 and tpr[-1] == 1
    # before the first negative (0.8) one positive is found: TPR 1/4 at FPR 0
    assert M.tpr_at_fpr(Y, S, 0.0) == pytest.approx(0.25)
    # FPR <= 0.25 allows the negative at 0.8: positives at 0.9, 0.7, 0.6 -> 3/4
    assert M.tpr_at_fpr(Y, S, 0.25) == pytest.approx(0.75)
    assert M.tpr_at_fpr(Y, S, 1.0) == pytest.approx(1.0)


def test_average_precision_by_hand() -> None:
    # recall steps at ranks 1, 3, 4, 8 with precision 1, 2/3, 3/4, 4/8
    expected = 0.25 * (1 + 2 / 3 + 3 / 4 + 4 / 8)
    assert M.average_precision(Y, S) == pytest.approx(expected)
    assert M.average_precision([0, 0], [1, 2]) is None
    precision, recall, thr = M.precision_recall_curve(Y, S)
    assert precision[0] == 1.0 and recall[-1] == 1.0 and thr[0] == 0.9


def test_precision_at_k_with_ties() -> None:
    assert M.precision_at_k(Y, S, 4) == pytest.approx(3 / 4)
    assert M.precision_at_k(Y, S, 1) == pytest.approx(1.0)
    # k = 2 cuts a tie of one positive and one negative: expected 1 + 0.5 of 2 slots
    assert M.precision_at_k([1, 1, 0], [2.0, 1.0, 1.0], 2) == pytest.approx(0.75)
    assert M.precision_at_k([1, 0], [1.0, 0.0], 0) is None


def test_boxes_iou_catch_rate() -> None:
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 5, 10, 10]])
    assert M.box_intersection(a, b)[0] == 25
    assert M.box_iou(a, b)[0] == pytest.approx(25 / 175)
    assert M.box_catch_rate([2, 2, 4, 4], [0, 0, 10, 10])[0] == pytest.approx(1.0)
    assert M.box_catch_rate([8, 8, 4, 4], [0, 0, 10, 10])[0] == pytest.approx(4 / 16)
    # touching edges do not overlap
    assert M.box_intersection([0, 0, 5, 5], [5, 0, 5, 5])[0] == 0


def test_topk_trigger_accuracy() -> None:
    windows = np.array([[0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 10, 10], [0, 0, 4, 4]], dtype=float)
    truth = np.array([[5, 5, 10, 10], [0, 0, 5, 5], [np.nan] * 4, [0, 0, 2, 2]], dtype=float)
    out = M.topk_trigger_accuracy(windows, truth, ks=(1, 2, 4, 10))
    assert out[1]["accuracy"] == 1.0 and out[1]["mean_iou"] == pytest.approx(25 / 175)
    assert out[1]["catch_rate"] == pytest.approx(0.25)
    assert out[2]["accuracy"] == 0.5
    assert out[4]["accuracy"] == 0.5 and out[4]["poisoned"] == 3
    assert out[4]["catch_rate"] == pytest.approx((0.25 + 0 + 0 + 1.0) / 4)
    assert out[10]["n"] == 4


def test_confusion_fp_asr() -> None:
    conf = M.confusion_matrix([0, 0, 1, 1, 2, 2], [0, 2, 1, 2, 2, 0], n_classes=3)
    assert conf.tolist() == [[1, 0, 1], [0, 1, 1], [1, 0, 1]]
    assert M.accuracy_from_confusion(conf) == pytest.approx(0.5)
    assert M.target_false_positives(conf, 2) == 2
    # 4 non-target images, 2 predicted as the target
    assert M.attack_success_rate(conf, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.confusion_matrix([0, 3], [0, 1], n_classes=3)


def test_poison_cluster_purity() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    poisoned = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0])
    out = M.poison_cluster_purity(labels, poisoned, top=2)
    # clusters 0 and 1 hold 2 poisons each; cluster 1 is purer so it ranks first
    assert [c["cluster"] for c in out["clusters"]] == [1, 0]
    assert out["purity"] == pytest.approx(4 / 5)
    assert out["poison_share"] == pytest.approx(4 / 5)
    assert M.poison_cluster_purity(labels, np.zeros(10, int))["purity"] is None


def test_against_sklearn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))
    pred = s > 0.5
    assert M.precision_recall_f1(y, pred)["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert np.array_equal(M.confusion_matrix(y, pred.astype(int), 2), skm.confusion_matrix(y, pred))
