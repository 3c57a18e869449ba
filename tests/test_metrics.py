import numpy as np
import pytest

from fpc_ray.metrics import classification_report, expected_calibration_error, topk_accuracy

NAMES = ["a", "b", "c"]


def test_topk_and_report_on_a_worked_example():
    probs = np.array([
        [0.7, 0.2, 0.1],  # true a, top1 right
        [0.5, 0.4, 0.1],  # true b, top2 right
        [0.1, 0.2, 0.7],  # true c, right
        [0.2, 0.3, 0.5],  # true a, wrong twice
    ])
    labels = np.array([0, 1, 2, 0])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(0.5)
    assert topk_accuracy(probs, labels, 2) == pytest.approx(0.75)
    rep = classification_report(probs, labels, NAMES)
    assert rep["n"] == 4
    assert rep["confusion_matrix"] == [[1, 0, 1], [1, 0, 0], [0, 0, 1]]
    # a: P=1/2 R=1/2 F1=1/2; b: 0; c: P=1/2 R=1 F1=2/3.
    assert rep["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert rep["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert rep["macro_f1"] == pytest.approx((0.5 + 0 + 2 / 3) / 3)


def test_ece_is_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    # Always 90 % confident, right 90 % of the time: calibrated.
    right = rng.random(2000) < 0.9
    pred = np.where(right, labels, 1 - labels)
    probs = np.zeros((2000, 2))
    probs[np.arange(2000), pred] = 0.9
    probs[np.arange(2000), 1 - pred] = 0.1
    assert expected_calibration_error(probs, labels) < 0.02
    # 99 % confident but only 50 % right.
    pred = rng.integers(0, 2, 2000)
    probs = np.full((2000, 2), 0.01)
    probs[np.arange(2000), pred] = 0.99
    assert expected_calibration_error(probs, labels) > 0.4


def test_classes_without_support_do_not_count_in_macro_f1():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    rep = classification_report(probs, np.array([0, 1]), NAMES)
    assert rep["macro_f1"] == pytest.approx(1.0)
    assert rep["per_class"]["c"]["support"] == 0
