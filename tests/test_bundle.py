"""Bundle integrity: weights checked against the card, and an overwrite that never pairs new
weights with an old card. Bundles here are untrained (no Ray, no training loop): cheap to build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fpc_ray.bundle import (
    CARD_FILE,
    HISTORY_FILE,
    WEIGHTS_FILE,
    check_bundle,
    load_bundle,
    read_card,
    save_bundle,
    weights_bytes,
)
from fpc_ray.bundle import build_card as make_card
from fpc_ray.cli import app
from fpc_ray.config import load_config
from fpc_ray.data.fetal_planes import CLASS_NAMES
from fpc_ray.errors import UserError
from fpc_ray.model import build_model, count_parameters
from fpc_ray.storage import resolve


def _untrained(seed: int) -> tuple[bytes, dict]:
    """Weights and card of a randomly initialised 64-px model (no pretrained download)."""
    import torch

    torch.manual_seed(seed)
    cfg = load_config(None, ["model.pretrained=none", "data.image_size=64"])
    model = build_model(cfg.model, len(CLASS_NAMES), pretrained=False)
    blob = weights_bytes(model.state_dict())
    return blob, make_card(cfg, list(CLASS_NAMES), count_parameters(model), blob)


@pytest.fixture(scope="module")
def two_models() -> list[tuple[bytes, dict]]:
    return [_untrained(0), _untrained(1)]


def _save(folder: Path, model: tuple[bytes, dict]) -> None:
    blob, card = model
    save_bundle(resolve(str(folder)), blob, card, [{"epoch": 1}])


def test_a_saved_bundle_loads(two_models, tmp_path):
    import torch
    from safetensors.torch import load as st_load

    _save(tmp_path / "b", two_models[0])
    bundle = load_bundle(str(tmp_path / "b"))
    assert bundle.version == two_models[0][1]["version"]
    saved, loaded = st_load(two_models[0][0]), bundle.model.state_dict()
    assert sorted(loaded) == sorted(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not bundle.model.training


def test_a_bundle_s_temperature_is_its_card_s_calibration_or_one(two_models, tmp_path):
    blob, card = two_models[0]
    _save(tmp_path / "plain", (blob, card))  # no calibration (as every bundle before it)
    _save(tmp_path / "calibrated", (blob, {**card, "calibration": {"method": "temperature", "temperature": 0.625}}))
    assert load_bundle(str(tmp_path / "plain")).temperature == 1.0
    assert load_bundle(str(tmp_path / "calibrated")).temperature == 0.625


def test_a_flipped_byte_is_refused_in_one_line_naming_the_bundle(two_models, tmp_path, phantom_dir):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    weights = folder / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: safetensors itself would load it silently
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its card"):
        load_bundle(str(folder))

    result = CliRunner().invoke(app, ["evaluate", "--model", str(folder), "--data", phantom_dir])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder}: {WEIGHTS_FILE} does not match"), lines


def test_a_card_without_a_weights_hash_loads_as_before(two_models, tmp_path):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    card = json.loads((folder / CARD_FILE).read_text())
    del card["weights_sha256"]  # a bundle written before the field existed
    (folder / CARD_FILE).write_text(json.dumps(card))
    assert load_bundle(str(folder)).version == card["version"]


def test_garbage_weights_are_one_user_error(two_models, tmp_path):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    card = json.loads((folder / CARD_FILE).read_text())
    del card["weights_sha256"]
    (folder / CARD_FILE).write_text(json.dumps(card))
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="is not a safetensors file"):
        load_bundle(str(folder))


def test_an_overwrite_cut_short_leaves_no_bundle_rather_than_a_mismatched_pair(two_models, tmp_path):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    # The history write after the new weights fails (a folder where the file goes).
    (folder / HISTORY_FILE).unlink()
    (folder / HISTORY_FILE).mkdir()
    with pytest.raises(UserError):
        _save(folder, two_models[1])
    assert (folder / WEIGHTS_FILE).read_bytes() == two_models[1][0]  # the new weights landed...
    assert not (folder / CARD_FILE).exists()  # ...and the old card was gone before they did
    with pytest.raises(UserError, match="not a model bundle"):
        read_card(str(folder))


def test_an_overwrite_replaces_the_pair(two_models, tmp_path):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    _save(folder, two_models[1])
    assert load_bundle(str(folder)).version == two_models[1][1]["version"]


@pytest.mark.parametrize("edit, message", [
    (lambda card: [], "unknown bundle format 'list'"),
    (lambda card: {**card, "input": {**card["input"], "size": "abc"}}, "input.size 'abc': not a positive integer"),
    (lambda card: {**card, "class_names": "Fetal brain"}, "class_names: not a list"),
    (lambda card: {**card, "input": {**card["input"], "mean": [0.5]}}, "input.mean: not three numbers"),
    (lambda card: {**card, "calibration": {"temperature": 0}}, "calibration.temperature 0: not a positive"),
    (lambda card: {**card, "config": {"train": {"epochs": "many"}}}, "config.train.epochs"),
])
def test_a_damaged_card_is_one_line_naming_the_field(two_models, tmp_path, edit, message):
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    card = json.loads((folder / CARD_FILE).read_text())
    (folder / CARD_FILE).write_text(json.dumps(edit(card)))
    # read_card checks what every reader needs (a report renders without the model's config).
    readers = (check_bundle, load_bundle) if message.startswith(("input.mean", "config.")) else \
        (read_card, check_bundle, load_bundle)
    for read in readers:
        with pytest.raises(UserError) as err:
            read(str(folder))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_check_bundle_refuses_what_load_bundle_would_without_torch_models(two_models, tmp_path):
    """What a labelling driver checks before its actors would each fail to load the bundle."""
    folder = tmp_path / "b"
    _save(folder, two_models[0])
    assert check_bundle(str(folder))["version"] == two_models[0][1]["version"]
    (folder / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="does not match its card"):
        check_bundle(str(folder))
    card = json.loads((folder / CARD_FILE).read_text())
    del card["weights_sha256"]  # an old bundle: the file itself must then parse
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(UserError, match="is not a safetensors file"):
        check_bundle(str(folder))
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=f"no {WEIGHTS_FILE}"):
        check_bundle(str(folder))


def test_weights_of_another_class_count_are_one_line_with_the_first_mismatch(two_models, tmp_path):
    folder = tmp_path / "b"
    blob, card = two_models[0]
    _save(folder, (blob, {**card, "class_names": card["class_names"][:4]}))
    with pytest.raises(UserError) as err:
        load_bundle(str(folder))
    text = str(err.value)
    assert "weights do not fit the card's architecture (size mismatch for" in text and "\n" not in text, text
