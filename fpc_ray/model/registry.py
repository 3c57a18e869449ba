"""The classifier in timm's model registry: ``timm.create_model("fpc_efficientnet_lite0")``.

timm's plugin pattern: importing :mod:`fpc_ray.model` imports this module, whose
``@register_model`` adds the names below to timm's registry, as importing ``timm`` adds its own
models. That registration is the one thing an import of ``fpc_ray.model`` changes.

Registered names:

``fpc_efficientnet_lite0``  the default config's classifier: ``tf_efficientnet_lite0`` -> CBAM ->
                            global average pool -> 512-256 GELU MLP head, six fetal planes.
"""

from __future__ import annotations

import timm
from timm.models import register_model

from fpc_ray.config import ModelConfig
from fpc_ray.data.fetal_planes import CLASS_NAMES
from fpc_ray.model.classifier import FetalPlaneClassifier, build_model, timm_pretrained_cfg
from fpc_ray.model.weights import LITE0_BACKBONE

# Read by timm's register_model: each name's pretrained_cfg, the input contract (no URL: the only
# pretrained weights are the packaged ImageNet backbone, loaded by the entrypoint itself).
default_cfgs = {
    "fpc_efficientnet_lite0": {
        **timm_pretrained_cfg(LITE0_BACKBONE, len(CLASS_NAMES)),
        "description": "fpc-ray fetal plane classifier: EfficientNet-Lite0, CBAM, MLP head",
    },
}


@register_model
def fpc_efficientnet_lite0(pretrained: bool = False, num_classes: int = len(CLASS_NAMES),
                           pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None,
                           cache_dir=None, **model_section) -> FetalPlaneClassifier:
    """The default config's classifier. ``pretrained=True`` loads the packaged ImageNet-1k
    EfficientNet-Lite0 weights into the backbone, offline (the head stays random).

    ``model_section``: fields of the config's model section (``attention``, ``head`` as dicts,
    ``drop_rate``) that replace the defaults; the backbone is the name's.
    """
    del cache_dir  # timm's factory passes it; nothing is downloaded
    name = "fpc_efficientnet_lite0"
    if pretrained_cfg is not None:  # a tag (name.tag) or an explicit cfg: there is one, untagged
        raise ValueError(f"{name} has one pretrained_cfg; got {pretrained_cfg!r}")
    if "backbone" in model_section:
        raise ValueError(f"{name} is built on {LITE0_BACKBONE}; another backbone is another model (build_model)")
    cfg = ModelConfig(backbone=LITE0_BACKBONE, pretrained="lite0-in1k" if pretrained else "none", **model_section)
    model = build_model(cfg, num_classes, pretrained=pretrained)
    model.pretrained_cfg = {**timm.get_pretrained_cfg(name).to_dict(), **(pretrained_cfg_overlay or {}),
                            "num_classes": num_classes}
    return model
