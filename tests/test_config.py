from pathlib import Path

import pytest

from fpc_ray.config import Config, load_config, parse_override
from fpc_ray.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_match_train_yaml():
    assert load_config(CONFIGS / "train.yaml") == Config()


def test_multi_gpu_overlay_keeps_base_values():
    cfg = load_config(CONFIGS / "multi-gpu.yaml")
    assert cfg.train.use_gpu and cfg.train.num_workers == 8
    assert cfg.model.attention.type == "cbam"  # from the base file


def test_precedence_file_then_flags_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  lr: 0.01\n")
    cfg = load_config(f, ["train.lr=2e-4", "model.head.hidden=[64, 32]"], {"train.epochs": 3, "data.image_size": None})
    assert cfg.train.epochs == 3
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.head.hidden == (64, 32)
    assert cfg.data.image_size == 224  # a None flag leaves the default alone


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.epochz=3"], "train.epochz: Extra inputs are not permitted"),
        (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (["model.attention.type=transformer"], "model.attention.type: Input should be"),
        (["model.attention.type=mhsa", "model.attention.dim=100", "model.attention.heads=3"],
         "divisible by heads"),
        (["model.backbone=efficientnet_b0"], "lite0-in1k' only fits backbone"),
        (["train.frozen_epochs=5", "train.epochs=3"], "frozen_epochs (5) must be below epochs (3)"),
        (["nonsense"], "expected key.path=value"),
    ],
)
def test_config_errors_are_one_line(overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match=r"not valid YAML \(.* at line 2, column 1\)") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("# réglages\ntrain: {epochs: 2}\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 text"):
        load_config(latin)
    flat = tmp_path / "flat.yaml"
    flat.write_text("train: 5\n")  # a CLI flag (--epochs) then sets train.epochs inside it
    with pytest.raises(UserError, match=r"^train: expected a section of settings, found 5 \(setting train.epochs\)$"):
        load_config(flat, values={"train.epochs": 2})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(listy)


def test_parse_override_types():
    assert parse_override("train.use_gpu=true") == (["train", "use_gpu"], True)
    assert parse_override("storage.endpoint_url=http://h:9000") == (["storage", "endpoint_url"], "http://h:9000")


def test_yaml_nested_past_python_s_recursion_limit_is_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(UserError, match="nested too deeply"):
        load_config(deep)
