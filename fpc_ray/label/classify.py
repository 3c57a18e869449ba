"""The model side of labelling: a bundle loaded once per actor, classifying letterboxed frames and
computing their CAMs, with calibrated probabilities (contract (a): softmax of logits / T)."""

from __future__ import annotations

import numpy as np
import torch

from fpc_ray.inference import autocast, place_model, select_device, softmax_t
from fpc_ray.label.cam import predict_with_gradcam, predict_with_library_cam


class Classifier:
    """A bundle on its device: normalised NCHW batches -> probabilities and CAM maps."""

    def __init__(self, model_uri: str, storage: dict | None, cam: str, use_gpu: bool):
        from fpc_ray.bundle import load_bundle
        from fpc_ray.config import StorageConfig

        bundle = load_bundle(model_uri, StorageConfig.model_validate(storage or {}))
        self.device = select_device(use_gpu)
        self.model = place_model(bundle.model, self.device).eval()
        self.class_names = bundle.class_names
        self.version = bundle.version
        self.size = bundle.card["input"]["size"]
        self.mean, self.std = bundle.card["input"]["mean"], bundle.card["input"]["std"]
        # A bundle calibrated after training divides its logits by T; the argmax is unchanged.
        self.temperature = bundle.temperature
        self.cam = cam

    def classify(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | np.ndarray | None]:
        """Probabilities (N x C, on the device) and CAM maps of one normalised batch: GradCAM at
        the feature map's resolution (a tensor on the device), a pytorch-grad-cam method's at the
        input's (an array), None without CAM."""
        if self.cam == "none":
            with torch.inference_mode(), autocast(self.device):
                return softmax_t(self.model(batch), self.temperature), None
        if self.cam == "gradcam":
            with autocast(self.device):
                probs, cams = predict_with_gradcam(self.model, batch, self.temperature)
            return probs.float(), cams.float()
        return predict_with_library_cam(self.model, batch, self.cam, self.temperature)
