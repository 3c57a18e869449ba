"""The fetal-plane classifier: timm backbone -> attention -> global pool -> 3-layer MLP head.

It speaks timm's model API (``forward_features``, ``forward_head(pre_logits=...)``,
``reset_classifier``, ``feature_info``) so timm and pytorch-grad-cam tooling work unchanged.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from fpc_ray.config import ModelConfig
from fpc_ray.model.attention import create_attention

# The module whose output is the last spatial feature map, refined by attention: the GradCAM
# target. Named once, here; labelling and reports look it up through `cam_target_layer`.
CAM_TARGET = "attention"

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MlpHead(nn.Module):
    """Linear -> act -> dropout -> Linear -> act -> dropout -> Linear (the class logits)."""

    def __init__(self, in_features: int, hidden: tuple[int, int], num_classes: int,
                 dropout: float, activation: str):
        super().__init__()
        act = _ACTIVATIONS[activation]
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
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = MlpHead(
            self.num_features, tuple(cfg.head.hidden), num_classes, cfg.head.dropout,
            cfg.head.activation,
        )
        self.pretrained_cfg = dict(self.backbone.pretrained_cfg)
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
        x = self.head_drop(self.pool(x).flatten(1))
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc3

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last layer for ``num_classes`` outputs (0 gives pre-logit features)."""
        self.num_classes = num_classes
        self.head.reset(num_classes)

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
