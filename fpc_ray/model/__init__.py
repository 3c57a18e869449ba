"""The model: backbone + attention + MLP head, and where its weights come from.

Importing this package registers the classifier with timm (timm's plugin pattern, see
:mod:`fpc_ray.model.registry`): afterwards ``timm.create_model("fpc_efficientnet_lite0")``
builds it in one line.
"""

from __future__ import annotations

from fpc_ray.model import registry  # noqa: F401  (registers the classifier with timm)
from fpc_ray.model.classifier import CAM_TARGET, FetalPlaneClassifier, build_model, count_parameters, normalization

__all__ = ["CAM_TARGET", "FetalPlaneClassifier", "build_model", "count_parameters", "normalization"]
