"""The fetal-plane classifier: timm backbone -> attention -> global pool -> 3-layer MLP head.

It speaks timm's model API (``forward_features``, ``forward_head(pre_logits=...)``,
``reset_classifier``, ``feature_info``, ``pretrained_cfg``) so timm and pytorch-grad-cam tooling
work unchanged; :mod:`fpc_ray.model.registry` registers it with ``timm.create_model``.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import SelectAdaptivePool2d, get_act_layer
from torch import nn

from fpc_ray.config import DataConfig, ModelConfig, StorageConfig
from fpc_ray.model.attention import create_attention
from fpc_ray.model.weights import load_backbone_weights

# The module whose output is the last spatial feature map, refined by attention: the GradCAM
# target. Named once, here; labelling and reports look it up through `cam_target_layer`.
CAM_TARGET = "attention"


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the backbone's pretrained weights expect (timm's pretrained config)."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def timm_pretrained_cfg(backbone: str, num_classes: int) -> dict:
    """The classifier's input contract in timm's ``pretrained_cfg`` terms, at the default size.

    A letterbox is timm's ``border`` crop mode at ``crop_pct`` 1 (long side to size, padded);
    ``box`` is PIL's area filter, what the letterbox's ``cv2.INTER_AREA`` does when it shrinks.
    A bundle's card holds the contract it was trained with (its size may differ).
    """
    mean, std = normalization(backbone)
    size = DataConfig().image_size
    cfg = {"input_size": (3, size, size), "interpolation": "box", "crop_pct": 1.0, "crop_mode": "border",
           "mean": mean, "std": std, "num_classes": num_classes, "classifier": "head.fc3"}
    first_conv = getattr(timm.get_pretrained_cfg(backbone), "first_conv", None)
    if first_conv:
        cfg["first_conv"] = f"backbone.{first_conv}"
    return cfg


class MlpHead(nn.Module):
    """Linear -> act -> dropout -> Linear -> act -> dropout -> Linear (the class logits)."""

    def __init__(self, in_features: int, hidden: tuple[int, int], num_classes: int,
                 dropout: float, activation: str):
        super().__init__()
        act = get_act_layer(activation)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.act1 = act()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.act2 = act()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden[1], num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return x if pre_logits else self.fc3(x)

    def reset(self, num_classes: int) -> None:
        in_features = self.fc2.out_features
        self.fc3 = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


class FetalPlaneClassifier(nn.Module):
    """EfficientNet-style backbone + attention block + MLP head.

    Args:
        cfg: the model section of the config.
        num_classes: number of output classes.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        try:
            self.backbone = timm.create_model(
                cfg.backbone, pretrained=False, num_classes=0, global_pool="", drop_rate=0.0
            )
        except RuntimeError as e:  # timm's "Unknown model" error
            from fpc_ray.errors import UserError

            raise UserError(f"model.backbone: {e}") from None
        self.num_features = self.backbone.num_features
        self.attention = create_attention(cfg.attention, self.num_features)
        # Average pooling: the analytic GradCAM of fpc_ray.label.cam relies on it (and checks).
        self.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = MlpHead(
            self.num_features, tuple(cfg.head.hidden), num_classes, cfg.head.dropout,
            cfg.head.activation,
        )
        self.pretrained_cfg = timm_pretrained_cfg(cfg.backbone, num_classes)
        self.feature_info = self.backbone.feature_info

    @property
    def cam_target_layer(self) -> nn.Module:
        """The layer GradCAM hooks: the last spatial feature map after attention."""
        return getattr(self, CAM_TARGET)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The unpooled NCHW feature map, refined by attention."""
        return self.attention(self.backbone.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, then the MLP head; ``pre_logits`` returns the penultimate embedding."""
        return self.head_from_pooled(self.global_pool(x), pre_logits=pre_logits)

    def head_from_pooled(self, pooled: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head from pooled (N x C) features: dropout, then the MLP. The one path from pooled
        features to logits: :meth:`forward_head` and the analytic GradCAM both take it."""
        return self.head(self.head_drop(pooled), pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc3

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the last layer for ``num_classes`` outputs (0 gives pre-logit features) and,
        given a timm pool type, the global pooling (timm's signature)."""
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        self.head.reset(num_classes)
        if global_pool is not None:
            pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            if pool.feat_mult() != 1:  # the MLP head takes num_features inputs
                raise ValueError(f"global_pool {global_pool!r} changes the feature width")
            self.global_pool = pool

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone (frozen warm-up epochs); BN stats follow in train()."""
        self.backbone_frozen = not trainable
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)

    def train(self, mode: bool = True) -> FetalPlaneClassifier:
        super().train(mode)
        # A frozen backbone keeps its pretrained BatchNorm statistics too.
        if mode and getattr(self, "backbone_frozen", False):
            self.backbone.eval()
        return self


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def build_model(cfg: ModelConfig, num_classes: int, storage: StorageConfig | None = None,
                pretrained: bool = True) -> FetalPlaneClassifier:
    """Build the classifier and, when ``pretrained``, load ``cfg.pretrained`` into its backbone.

    Pass ``pretrained=False`` when a checkpoint or bundle will overwrite every weight anyway.
    """
    model = FetalPlaneClassifier(cfg, num_classes)
    if pretrained:
        model.weights_source = load_backbone_weights(model.backbone, cfg.pretrained, cfg.backbone, storage)
    return model
