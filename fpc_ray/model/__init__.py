"""The model: backbone + attention + MLP head, and where its weights come from."""

from __future__ import annotations

from fpc_ray.config import ModelConfig, StorageConfig
from fpc_ray.model.classifier import CAM_TARGET, FetalPlaneClassifier, count_parameters
from fpc_ray.model.weights import load_backbone_weights

__all__ = ["CAM_TARGET", "FetalPlaneClassifier", "build_model", "count_parameters", "normalization"]


def build_model(cfg: ModelConfig, num_classes: int, storage: StorageConfig | None = None,
                pretrained: bool = True) -> FetalPlaneClassifier:
    """Build the classifier and, when ``pretrained``, load ``cfg.pretrained`` into its backbone.

    Pass ``pretrained=False`` when a checkpoint or bundle will overwrite every weight anyway.
    """
    model = FetalPlaneClassifier(cfg, num_classes)
    if pretrained:
        model.weights_source = load_backbone_weights(model.backbone, cfg.pretrained, cfg.backbone, storage)
    return model


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's pretrained weights expect (timm's pretrained config)."""
    import timm

    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
