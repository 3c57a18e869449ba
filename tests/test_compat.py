"""Bundles written before issue 12 still load and label identically.

tests/fixtures/old_bundles_7eac596.tar.xz holds bundles saved by the model code of commit 7eac596
(tests/fixtures/make_old_bundles.py, never to be rerun), with the logits, probabilities, top-1
labels and GradCAM maps that code gave for six phantom frames. Today's code must load each
bundle and give the same numbers: a renamed state-dict key without its mapping fails the load,
and a layer built differently (another activation, kernel or reduction) changes the numbers.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fpc_ray.bundle import load_bundle
from fpc_ray.data.transforms import eval_transform
from fpc_ray.inference import predict_probs
from fpc_ray.label.cam import predict_with_gradcam

FIXTURES = Path(__file__).parent / "fixtures"
STEM = "old_bundles_7eac596"
# Every attention type and head activation, and the default architecture (see the generator).
BUNDLES = ("none_relu", "se_gelu", "eca_silu", "cbam_relu", "mhsa_gelu", "default")


@pytest.fixture(scope="module")
def old_bundles(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old_bundles")
    with tarfile.open(FIXTURES / f"{STEM}.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{STEM}_expected.npz", allow_pickle=False) as npz:
        return dict(npz)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(FIXTURES / f"{STEM}_inputs.npz", allow_pickle=False) as npz:
        return npz["images"]


def test_the_fixture_holds_every_bundle_tested(old_bundles, expected, images):
    assert sorted(p.name for p in old_bundles.iterdir()) == sorted(BUNDLES)
    assert sorted({key.split("/")[0] for key in expected}) == sorted(BUNDLES)
    assert images.shape == (6, 128, 128) and images.dtype == np.uint8


@pytest.mark.parametrize("name", BUNDLES)
def test_an_old_bundle_loads_and_labels_identically(old_bundles, expected, images, name):
    bundle = load_bundle(str(old_bundles / name))
    mean, std = bundle.card["input"]["mean"], bundle.card["input"]["std"]
    transform = eval_transform(mean, std)
    batch = torch.stack([transform(image=im)["image"] for im in images])

    with torch.no_grad():
        logits = bundle.model(batch).numpy()
    np.testing.assert_allclose(logits, expected[f"{name}/logits"], atol=1e-4, rtol=1e-5)

    probs, cams = predict_with_gradcam(bundle.model, batch)
    np.testing.assert_allclose(probs.numpy(), expected[f"{name}/probs"], atol=1e-5, rtol=0)
    labels = [bundle.class_names[i] for i in probs.argmax(dim=1).tolist()]
    assert labels == expected[f"{name}/labels"].tolist()
    assert cams.shape == expected[f"{name}/cams"].shape == (6, 4, 4)
    np.testing.assert_allclose(cams.numpy(), expected[f"{name}/cams"], atol=1e-4, rtol=0)

    # The batched path of evaluation and validation (fpc_ray.inference.predict_probs) agrees too.
    np.testing.assert_allclose(predict_probs(bundle.model, images, mean, std), expected[f"{name}/probs"],
                               atol=1e-5, rtol=0)
