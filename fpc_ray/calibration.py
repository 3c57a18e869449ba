"""Temperature scaling (Guo et al. 2017): one scalar T, fitted on the validation split after training,
so that softmax(logits / T) means what it says. Label smoothing leaves a model under-confident
(T < 1 sharpens it); T > 0 never changes an argmax, so top-1 and the confusion matrix stay as they
are. The card records T under ``calibration``; :func:`fpc_ray.inference.softmax_t` applies it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fpc_ray.inference import softmax_t
from fpc_ray.metrics import expected_calibration_error

# A validation split the model classifies without an error has no finite optimum (the NLL keeps
# falling as T -> 0): the fit stops at these bounds rather than at a float underflow.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def confidence_ceiling(correct: int, n: int) -> float:
    """The most accuracy ``correct`` right of ``n`` can show: the median of its Jeffreys posterior,
    Beta(correct + 1/2, n - correct + 1/2) (40 of 40 shows 0.9944, not 1). A validation split
    without errors would otherwise drive T to its lower bound, and most confidences to 1.0 in
    float32: the least confident frames, the ones reviewers should see, would be harder to tell
    apart."""
    from scipy.stats import beta  # scipy comes with albumentations and scikit-image

    return float(beta.median(correct + 0.5, n - correct + 0.5))


def _mean_confidence(x: torch.Tensor, temperature: float) -> float:
    return float((x / temperature).softmax(dim=1).max(dim=1).values.mean())


def cap_confidence(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """``temperature``, raised (by bisection) until the mean top-1 confidence on these logits is
    at most :func:`confidence_ceiling` of their accuracy; never lowered."""
    x = torch.tensor(logits, dtype=torch.float64)
    ceiling = confidence_ceiling(int((x.argmax(dim=1).numpy() == labels).sum()), len(labels))
    if _mean_confidence(x, temperature) <= ceiling:
        return temperature
    low, high = temperature, MAX_TEMPERATURE
    for _ in range(60):  # mean confidence falls as T rises; 60 halvings reach float precision
        mid = (low + high) / 2
        low, high = (mid, high) if _mean_confidence(x, mid) > ceiling else (low, mid)
    return high


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean NLL of the true classes under softmax(logits / temperature)."""
    scaled = torch.tensor(logits, dtype=torch.float64) / temperature  # a copy: Ray returns read-only arrays
    return float(torch.nn.functional.cross_entropy(scaled, torch.tensor(labels, dtype=torch.long)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` under softmax(logits / T).

    LBFGS (with a strong-Wolfe line search) over log T, so T stays positive; the result is clamped
    to [MIN_TEMPERATURE, MAX_TEMPERATURE], raised where it would claim more accuracy than the
    split shows (:func:`cap_confidence`), and never worse than 1.0 (no scaling) on the same data.
    """
    if len(labels) == 0:
        return 1.0
    x = torch.tensor(logits, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")
    bounds = (math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / log_t.clamp(*bounds).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    fitted = float(log_t.detach().clamp(*bounds).exp())
    if not math.isfinite(fitted):
        return 1.0
    fitted = cap_confidence(logits, labels, fitted)
    nll = negative_log_likelihood(logits, labels, fitted)
    return fitted if nll <= negative_log_likelihood(logits, labels, 1.0) else 1.0


def calibration_record(logits: np.ndarray, labels: np.ndarray, fitted_on: str = "val") -> dict:
    """Fit T on ``logits`` and say what it did there: the card's ``calibration`` section (T=1 and
    no scores for an empty split: JSON has no NaN)."""
    if len(labels) == 0:
        return {"method": "temperature", "temperature": 1.0, "fitted_on": fitted_on, "n": 0}
    temperature = fit_temperature(logits, labels)
    return {
        "method": "temperature",
        "temperature": temperature,
        "fitted_on": fitted_on,
        "n": int(len(labels)),
        f"{fitted_on}_ece_before": expected_calibration_error(softmax_t(logits, 1.0), labels),
        f"{fitted_on}_ece_after": expected_calibration_error(softmax_t(logits, temperature), labels),
        f"{fitted_on}_nll_before": negative_log_likelihood(logits, labels, 1.0),
        f"{fitted_on}_nll_after": negative_log_likelihood(logits, labels, temperature),
    }
