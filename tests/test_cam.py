"""fpc-ray's GradCAM gives pytorch-grad-cam's GradCAM maps, without the backbone's backward pass."""

import cv2
import numpy as np
import pytest
import torch

from fpc_ray.config import CAM_METHODS, load_config
from fpc_ray.data.fetal_planes import read_fetal_planes
from fpc_ray.data.transforms import decode_image_bytes, eval_transform, letterbox
from fpc_ray.label.cam import predict_with_gradcam, predict_with_library_cam
from fpc_ray.label.predictor import cam_thumbnail
from fpc_ray.model import build_model


@pytest.fixture(scope="module")
def model_and_batch(phantom_dir):
    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.attention.type=se"]).model, 6).eval()
    db = read_fetal_planes(phantom_dir)
    t = eval_transform((0.5,) * 3, (0.5,) * 3)
    images = [letterbox(decode_image_bytes(db.image_location(r).read_bytes()), 96) for r in db.records[:6]]
    return model, torch.stack([t(image=im)["image"] for im in images])


@pytest.mark.parametrize("attention", ["se", "mhsa"])
def test_gradcam_matches_pytorch_grad_cam(model_and_batch, attention):
    _, batch = model_and_batch
    torch.manual_seed(1)
    model = build_model(load_config(None, [f"model.attention.type={attention}"]).model, 6).eval()
    if attention == "mhsa":  # its output projection starts at zero: the block would be the identity
        torch.nn.init.normal_(model.attention.proj_out.weight, std=0.02)
    probs, cams = predict_with_gradcam(model, batch)
    ref_probs, ref_maps = predict_with_library_cam(model, batch, "gradcam")
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)
    compared = 0
    for cam, ref in zip(cams.numpy(), ref_maps, strict=True):
        ours = cv2.resize(cam, ref.shape[::-1])
        if ref.std() < 1e-6 and ours.std() < 1e-6:
            continue  # both empty (ReLU killed every position)
        r = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
        assert r >= 0.99, r
        compared += 1
    assert compared >= len(batch) // 2, f"only {compared} of {len(batch)} maps were not empty"


def test_gradcam_refuses_a_model_that_does_not_average_pool(model_and_batch):
    """The analytic GradCAM is only GradCAM under global average pooling: anything else fails loudly."""
    _, batch = model_and_batch
    model = build_model(load_config(None, ["model.pretrained=none"]).model, 6).eval()
    model.reset_classifier(6, global_pool="max")
    with pytest.raises(ValueError, match="gradcam needs global average pooling"):
        predict_with_gradcam(model, batch)
    model.global_pool = torch.nn.AdaptiveMaxPool2d(1)
    with pytest.raises(ValueError, match="gradcam needs global average pooling"):
        predict_with_gradcam(model, batch)
    model.reset_classifier(6, global_pool="fast")  # timm's fast average: still an average
    probs, _ = predict_with_gradcam(model, batch)
    torch.testing.assert_close(probs, model(batch).softmax(dim=1))


def test_gradcam_does_not_touch_parameter_gradients(model_and_batch):
    model, batch = model_and_batch
    model.zero_grad(set_to_none=True)
    predict_with_gradcam(model, batch)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", [m for m in CAM_METHODS if m not in ("none", "gradcam")])  # gradcam: above
def test_library_methods_give_maps(model_and_batch, method):
    model, batch = model_and_batch
    probs, maps = predict_with_library_cam(model, batch, method)
    assert maps.shape == (len(batch), 96, 96) and probs.shape == (len(batch), 6)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_thumbnail_is_a_png_of_the_frame_aspect():
    thumb = np.zeros((72, 128), np.uint8)
    png = cam_thumbnail(np.random.default_rng(0).random((3, 3)), thumb, width=640, height=360, size=96)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (72, 128, 3)
