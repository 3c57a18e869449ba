import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import EcaModule, SEModule, get_act_layer
from timm.layers.cbam import CbamModule

from fpc_ray.bundle import input_contract
from fpc_ray.config import Config, ModelConfig, load_config
from fpc_ray.errors import UserError
from fpc_ray.model import CAM_TARGET, build_model, count_parameters
from fpc_ray.model.attention import SpatialSelfAttention


def _cfg(**overrides) -> ModelConfig:
    sets = [f"model.{k}={v}" for k, v in overrides.items()]
    return load_config(None, ["model.pretrained=none"] + sets).model


@pytest.mark.parametrize("attention", ["none", "se", "eca", "cbam", "mhsa"])
def test_every_attention_type_shapes_and_counts(attention):
    model = build_model(_cfg(**{"attention.type": attention}), num_classes=6).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1280, 2, 2)
    assert model.forward_head(feats).shape == (2, 6)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert model(x).shape == (2, 6)
    params = count_parameters(model)
    assert params["total"] == params["trainable"]
    assert 3_500_000 < params["total"] <= 6_000_000


def test_attention_adds_expected_parameters():
    base = count_parameters(build_model(_cfg(**{"attention.type": "none"}), 6))["total"]
    se = count_parameters(build_model(_cfg(**{"attention.type": "se"}), 6))["total"]
    # SE on 1280 channels at reduction 16: two 1x1 convs 1280->80->1280 with biases.
    assert se - base == 1280 * 80 + 80 + 80 * 1280 + 1280


def test_default_model_is_within_budget():
    model = build_model(Config().model, 6, pretrained=False)
    assert count_parameters(model)["total"] <= 6_000_000


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "tf_efficientnetv2_b0"])
def test_other_backbones(backbone):
    model = build_model(_cfg(backbone=backbone, **{"attention.type": "se"}), 6).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6)


def test_timm_api_reset_classifier_and_freeze():
    model = build_model(_cfg(), 6)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.set_backbone_trainable(False)
    counts = count_parameters(model)
    assert counts["trainable"] < counts["total"]
    model.train()
    assert not model.backbone.training and model.head.training  # frozen BN keeps its statistics


def test_cam_target_is_the_refined_feature_map():
    model = build_model(_cfg(), 6).eval()
    captured = []
    model.cam_target_layer.register_forward_hook(lambda m, i, o: captured.append(o))
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert len(captured) == 1, "the CAM target layer did not run in forward_features"
    torch.testing.assert_close(captured[0], feats)
    assert getattr(model, CAM_TARGET) is model.cam_target_layer


def test_layers_are_timms():
    """se / eca / cbam are timm's create_attn layers, the head's activations timm's get_act_layer."""
    for attention, cls in [("se", SEModule), ("eca", EcaModule), ("cbam", CbamModule)]:
        assert type(build_model(_cfg(**{"attention.type": attention}), 6).attention) is cls
    for activation in ["relu", "gelu", "silu"]:
        head = build_model(_cfg(**{"head.activation": activation}), 6).head
        assert type(head.act1) is type(head.act2) is get_act_layer(activation)


def test_forward_head_goes_through_head_from_pooled():
    model = build_model(_cfg(), 6).eval()
    feats = torch.randn(2, 1280, 3, 3)
    torch.testing.assert_close(model.forward_head(feats), model.head_from_pooled(feats.mean(dim=(2, 3))))
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True),
                               model.head_from_pooled(feats.mean(dim=(2, 3)), pre_logits=True))
    with pytest.raises(ValueError, match="changes the feature width"):
        model.reset_classifier(6, global_pool="catavgmax")


def test_mhsa_is_identity_at_init_and_size_agnostic():
    block = SpatialSelfAttention(32, dim=16, heads=4)
    for hw in [(3, 5), (7, 7)]:
        x = torch.randn(2, 32, *hw)
        torch.testing.assert_close(block(x), x)


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="model.backbone"):
        build_model(_cfg(backbone="not_a_model"), 6)


def test_shipped_imagenet_weights_are_real():
    """The packaged ImageNet-1k Lite0 weights, mapped onto timm, recognise a cat and coffee."""
    from PIL import Image
    from skimage import data

    from fpc_ray.model.weights import lite0_imagenet_model

    model = lite0_imagenet_model()
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]

    def top1(img: np.ndarray) -> int:
        im = Image.fromarray(img).resize((224, 224), Image.BICUBIC)
        x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
        with torch.no_grad():
            return int(model(((x - mean) / std)[None]).argmax())

    assert 281 <= top1(data.chelsea()) <= 285  # tabby / tiger cat / Persian / Siamese / Egyptian
    assert top1(data.coffee()) in (967, 968)  # espresso / cup


def test_pretrained_lite0_loads_into_backbone():
    from fpc_ray.model.weights import lite0_in1k_state_dict

    model = build_model(load_config(None).model, 6)
    ref = lite0_in1k_state_dict()
    torch.testing.assert_close(model.backbone.conv_stem.weight, ref["conv_stem.weight"])


def test_pretrained_from_safetensors_file(tmp_path):
    donor = build_model(_cfg(), 6)
    path = tmp_path / "backbone.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in donor.backbone.state_dict().items()}, str(path))
    model = build_model(_cfg(pretrained=str(path)), 6)
    torch.testing.assert_close(model.backbone.conv_stem.weight, donor.backbone.conv_stem.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="not none, hub, lite0-in1k"):
        build_model(_cfg(pretrained="weights.pth"), 6)
    with pytest.raises(UserError, match="not found"):
        build_model(_cfg(pretrained=str(tmp_path / "missing.safetensors")), 6)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3)}, str(wrong))
    with pytest.raises(UserError, match="does not fit"):
        build_model(_cfg(pretrained=str(wrong)), 6)


def test_timm_create_model_builds_the_default_classifier():
    """Importing fpc_ray.model registers it: one line builds the default config's classifier."""
    assert timm.list_models("fpc_*") == ["fpc_efficientnet_lite0"]
    model = timm.create_model("fpc_efficientnet_lite0")
    reference = build_model(Config().model, 6, pretrained=False)
    assert model.cfg == Config().model.model_copy(update={"pretrained": "none"})
    assert list(model.state_dict()) == list(reference.state_dict())
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 6)

    cfg = model.pretrained_cfg
    contract = input_contract(Config())
    assert cfg["input_size"] == (3, contract["size"], contract["size"]) and cfg["crop_mode"] == "border"
    assert list(cfg["mean"]) == contract["mean"] and list(cfg["std"]) == contract["std"]
    assert cfg["num_classes"] == 6 and cfg["architecture"] == "fpc_efficientnet_lite0"
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["mean"] == tuple(contract["mean"]) and data_cfg["interpolation"] == "box"


def test_timm_create_model_takes_classes_and_the_model_section():
    model = timm.create_model("fpc_efficientnet_lite0", num_classes=3, drop_rate=0.1,
                              attention={"type": "se", "reduction": 8}, head={"hidden": [32, 16]})
    assert model.cfg.attention.type == "se" and model.cfg.head.hidden == (32, 16)
    assert model.cfg.drop_rate == 0.1 and model.pretrained_cfg["num_classes"] == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    with pytest.raises(ValueError, match="backbone"):
        timm.create_model("fpc_efficientnet_lite0", backbone="efficientnet_b0")


def test_timm_create_model_pretrained_loads_the_packaged_lite0_weights():
    from fpc_ray.model.weights import lite0_in1k_state_dict

    model = timm.create_model("fpc_efficientnet_lite0", pretrained=True)
    assert model.weights_source == "lite0-in1k"
    torch.testing.assert_close(model.backbone.conv_stem.weight, lite0_in1k_state_dict()["conv_stem.weight"])
    random = timm.create_model("fpc_efficientnet_lite0")
    assert not torch.equal(random.backbone.conv_stem.weight, model.backbone.conv_stem.weight)
