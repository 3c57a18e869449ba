"""Class activation maps for the classifier's refined feature map.

``gradcam`` is computed here at the cost of inference. The target layer is the attention block's
output A, and the head sees A only through global average pooling, so d logit_c / dA[k, i, j]
is the same at every position: (1 / HW) * d logit_c / d pooled[k]. GradCAM's channel weights
(the spatial mean of that gradient) are therefore the gradient of the MLP head at the pooled
features — a backward pass through three linear layers, not through the backbone, and no
parameter gradients. The map is ReLU(sum_k w_k A_k), min-max scaled per image as
pytorch-grad-cam does. A model that pools otherwise is refused: the identity would not hold.
``gradcam++`` and ``eigencam`` run pytorch-grad-cam's own classes. The choices of ``label --cam``
are :data:`fpc_ray.config.CAM_METHODS`.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from torch import nn

from fpc_ray.inference import softmax_t


def _minmax(cams: torch.Tensor) -> torch.Tensor:
    flat = cams.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (cams - lo) / (hi - lo + 1e-7)


def require_global_average_pooling(model) -> None:
    """Refuse a model whose ``global_pool`` is not a global average: the analytic GradCAM's
    channel weights are the head's gradient at the pooled features only under averaging."""
    pool = model.global_pool
    inner = pool.pool if isinstance(pool, SelectAdaptivePool2d) else pool
    if not (isinstance(inner, FastAdaptiveAvgPool)
            or (isinstance(inner, nn.AdaptiveAvgPool2d) and inner.output_size in (1, (1, 1)))):
        raise ValueError(f"gradcam needs global average pooling; the model pools with {pool}: "
                         "use a pytorch-grad-cam method (gradcam++, eigencam)")


def predict_with_gradcam(model, batch: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (N x C, calibrated by ``temperature``) and GradCAM maps (N x h x w, in
    [0, 1], feature resolution) for each image's top-1 class, in one forward pass.

    Raises:
        ValueError: the model's global pooling is not an average (see the module docstring).
    """
    require_global_average_pooling(model)
    with torch.no_grad():
        feats = model.forward_features(batch)
        pooled = model.global_pool(feats).flatten(1)
    pooled = pooled.detach().float().requires_grad_(True)
    with torch.enable_grad():
        logits = model.head_from_pooled(pooled)
        top1 = logits.argmax(dim=1)
        # Samples are independent in eval mode, so one backward gives every row its gradient;
        # autograd.grad computes it for `pooled` alone, no parameter gradients.
        (weights,) = torch.autograd.grad(logits.gather(1, top1[:, None]).sum(), pooled)
    # weights: N x K, proportional to GradCAM's spatial mean of dlogit/dA
    cams = torch.relu(torch.einsum("nk,nkhw->nhw", weights, feats.float()))
    return softmax_t(logits.detach(), temperature), _minmax(cams)


def predict_with_library_cam(model, batch: torch.Tensor, method: str,
                             temperature: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities (calibrated by ``temperature``) and pytorch-grad-cam maps (N x H x W at
    input size) for the top-1 class."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]
    with torch.no_grad():
        probs = softmax_t(model(batch), temperature)
    targets = [ClassifierOutputTarget(int(c)) for c in probs.argmax(dim=1)]
    with cls(model=model, target_layers=[model.cam_target_layer]) as cam:
        maps = cam(input_tensor=batch, targets=targets)
    return probs, maps
