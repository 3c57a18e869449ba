"""Temperature scaling: the fit recovers a known temperature, never moves an argmax, old bundles keep
T = 1, and a trained bundle's card, test report and evaluation all use the fitted temperature."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fpc_ray.bundle import card_temperature, read_card
from fpc_ray.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    calibration_record,
    fit_temperature,
    negative_log_likelihood,
)
from fpc_ray.inference import softmax_t
from fpc_ray.metrics import expected_calibration_error
from fpc_ray.scoring import evaluate_bundle, report_from_logits

FIXTURES = Path(__file__).parent / "fixtures"


def _scaled_logits(true_temperature: float, n: int = 3000, classes: int = 6, seed: int = 0):
    """Labels drawn from softmax(z), and the logits a model with temperature ``true_temperature``
    would report: z * T. Dividing those by T gives back the calibrated z, so T is what a fit
    should find (T > 1: an over-confident model; T < 1: an under-confident one)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2.0, size=(n, classes))
    p = softmax_t(z.astype(np.float32), 1.0).astype(np.float64)
    labels = np.minimum((p.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1), classes - 1)  # one draw per row
    return (z * true_temperature).astype(np.float32), labels


@pytest.mark.parametrize("true_temperature", [0.4, 1.0, 2.5])
def test_the_fit_recovers_the_temperature_that_generated_the_logits(true_temperature):
    logits, labels = _scaled_logits(true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    record = calibration_record(logits, labels)
    assert record["temperature"] == fitted and record["n"] == len(labels) and record["fitted_on"] == "val"
    assert record["val_nll_after"] <= record["val_nll_before"]
    if true_temperature != 1.0:  # mis-calibrated before, calibrated after
        assert record["val_ece_before"] > 0.08 > 0.03 > record["val_ece_after"]  # 0.03: sampling noise of 15 bins


def test_a_split_without_errors_stops_at_a_finite_sharpening_temperature():
    """Every validation image right: the NLL falls as T -> 0 without a minimum; the fit sharpens
    (T < 1) and stays within its bounds, and an empty split leaves the model as it is."""
    logits = np.eye(6, dtype=np.float32)[np.arange(120) % 6] * 3.0
    labels = np.arange(120) % 6
    fitted = fit_temperature(logits, labels)
    assert MIN_TEMPERATURE <= fitted < 1.0 < MAX_TEMPERATURE
    assert negative_log_likelihood(logits, labels, fitted) < negative_log_likelihood(logits, labels, 1.0)
    assert fit_temperature(np.zeros((0, 6), np.float32), np.zeros(0, np.int64)) == 1.0


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 4.0, 20.0])
def test_softmax_t_never_changes_an_argmax_and_is_the_plain_softmax_at_one(temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 5, size=(500, 6)).astype(np.float32)
    probs = softmax_t(logits, temperature)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    as_tensor = softmax_t(torch.from_numpy(logits), temperature)  # labelling passes tensors
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_array_equal(as_tensor.numpy(), probs)
    np.testing.assert_array_equal(softmax_t(logits, 1.0), torch.from_numpy(logits).softmax(dim=1).numpy())
    # The report at T: the same predictions, the same confusion matrix, its own ECE beside T=1's.
    labels = rng.integers(0, 6, 500)
    calibrated, plain = report_from_logits(logits, labels, list("abcdef"), temperature), \
        report_from_logits(logits, labels, list("abcdef"))
    assert calibrated["confusion_matrix"] == plain["confusion_matrix"] and calibrated["top1"] == plain["top1"]
    assert calibrated["ece_uncalibrated"] == plain["ece"] == plain["ece_uncalibrated"]
    assert calibrated["ece"] == pytest.approx(expected_calibration_error(probs, labels))
    assert calibrated["temperature"] == temperature


def test_old_bundles_without_calibration_have_temperature_one():
    """Bundles saved before calibration existed (tests/fixtures; test_compat checks their numbers at
    the default T = 1) have no ``calibration`` in their cards, so every reader divides by 1."""
    with tarfile.open(FIXTURES / "old_bundles_7eac596.tar.xz") as tar:
        cards = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith("/model.json")]
    assert len(cards) == 6
    for card in cards:
        assert "calibration" not in card and card_temperature(card) == 1.0


def test_a_trained_bundle_is_calibrated_on_val_and_scored_with_its_temperature(trained_bundle):
    card = read_card(trained_bundle["bundle"])
    calibration = card["calibration"]
    assert calibration["method"] == "temperature" and calibration["fitted_on"] == "val"
    assert calibration["n"] == sum(card["data"]["images"]["val"].values())
    assert MIN_TEMPERATURE <= calibration["temperature"] <= MAX_TEMPERATURE
    assert calibration["val_nll_after"] <= calibration["val_nll_before"]
    test = card["metrics"]["test"]
    assert test["temperature"] == calibration["temperature"]
    assert {"ece", "ece_uncalibrated", "reliability", "reliability_uncalibrated"} <= set(test)
    # `fpc-ray evaluate` applies the same temperature: the card's test numbers come back.
    report = evaluate_bundle(trained_bundle["bundle"], trained_bundle["data"], "test")
    assert report["temperature"] == calibration["temperature"]
    assert report["confusion_matrix"] == test["confusion_matrix"]
    for key in ("top1", "ece", "ece_uncalibrated"):
        assert report[key] == pytest.approx(test[key], abs=1e-6), key


def test_a_split_without_errors_does_not_drive_every_confidence_to_one():
    """40 of 40 right under-confident logits: the NLL optimum is T -> 0; the fit stops where the
    mean confidence claims the Jeffreys median of 40 of 40 right, well above the bound."""
    from fpc_ray.calibration import MIN_TEMPERATURE, confidence_ceiling, fit_temperature
    from fpc_ray.inference import softmax_t

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 40)
    logits = rng.normal(0, 0.3, (40, 6))
    logits[np.arange(40), labels] += rng.uniform(1.0, 3.0, 40)  # every argmax right, margins vary
    t = fit_temperature(logits, labels)
    probs = softmax_t(logits, t)
    assert (probs.argmax(1) == labels).all()
    assert probs.max(1).mean() == pytest.approx(confidence_ceiling(40, 40), abs=1e-6)
    assert t > 1.2 * MIN_TEMPERATURE  # the likelihood alone would stop at the bound


def test_an_empty_split_records_no_scaling_and_no_nan():
    from fpc_ray.calibration import calibration_record

    record = calibration_record(np.zeros((0, 6)), np.zeros(0, np.int64))
    assert record == {"method": "temperature", "temperature": 1.0, "fitted_on": "val", "n": 0}
    json.dumps(record, allow_nan=False)
