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
    with pytest.raises(UserError, match=r"deep.yaml: nested deeper than 32 levels at line 1, column \d+$"):
        load_config(deep)


def _laughs(levels: int = 9) -> str:
    """A "billion laughs" document: 9 ** 10 values from ten short lines of aliases."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ntrain: {{epochs: *l{levels}}}\n"


@pytest.mark.parametrize(("text", "needle"), [
    ("base: 5\n", "c.yaml: base: expected the name of another config file, found 5"),
    ("base: [a, b]\n", "c.yaml: base: expected the name of another config file, found ['a', 'b']"),
    ("base: ''\n", "c.yaml: base: expected the name of another config file, found ''"),
    ("base: missing.yaml\n", "c.yaml: base: '{dir}/missing.yaml': no such config file"),
    ("base: sub\n", "c.yaml: base: '{dir}/sub': a directory, not a config file"),
    ('base: "a\\0b"\n', "c.yaml: base: '{dir}/a\\x00b': no such config file"),
    ("base: c.yaml\n", "c.yaml: base: c.yaml loops back to {dir}/c.yaml"),
    ("train:\n  seed: " + "9" * 5000 + "\n", "c.yaml: an integer of 5000 digits (at most 64) at line 2, column 9"),
    ("train: {seed: -1_000" + "0" * 70 + "}\n", "c.yaml: an integer of 74 digits (at most 64)"),
    (_laughs(), "c.yaml: more than 100000 values once its aliases are expanded"),
    ("".join(f"{'  ' * i}k:\n" for i in range(40)), "c.yaml: nested deeper than 32 levels at line 32"),
    ("- 1\n- 2\n", "c.yaml: expected a mapping at the top level, found list"),
    ("1: 2\n", "c.yaml: key 1 is not text; quote it"),
    ("train: {yes: 3}\n", "c.yaml: key True under train is not text; quote it"),
    ("--- {}\n--- {}\n", "c.yaml: not valid YAML (expected a single document"),
    ("train: !!python/object:os.system {}\n", "c.yaml: not valid YAML (could not determine a constructor"),
])
def test_hostile_config_files_are_one_line_naming_the_file(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError) as err:
        load_config(f)
    assert needle.format(dir=tmp_path) in str(err.value)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_base_chains_loop_and_length_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 3}\n")
    with pytest.raises(UserError, match=r"b.yaml: base: a.yaml loops back to .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    for i in range(20):
        (tmp_path / f"n{i}.yaml").write_text(f"base: n{i + 1}.yaml\n")
    (tmp_path / "n20.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(UserError, match="more than 16 files overlaid"):
        load_config(tmp_path / "n0.yaml")
    assert load_config(tmp_path / "n5.yaml").train.epochs == 3  # 16 files overlay fine


def test_huge_and_unreadable_config_files(tmp_path):
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"# " + b"x" * 2**20 + b"\n")
    with pytest.raises(UserError, match=r"huge.yaml: larger than 1048576 bytes"):
        load_config(huge)
    with pytest.raises(UserError, match=r": is a directory, not a config file$"):
        load_config(tmp_path)


@pytest.mark.parametrize(("item", "needle"), [
    ("train.seed=" + "9" * 5000, "an integer of 5000 digits (at most 64) at line 1, column 1"),
    ("train.seed=" + "[" * 30_000, "nested deeper than 32 levels"),
    ("train.seed=" + _laughs().replace("\n", ", ").replace("train: {epochs: *l9}, ", "")
     .join("{}"), "more than 100000 values"),
    ("train={1: 2}", "key 1 is not text"),
    ("train..epochs=3", "expected key.path=value"),
    ("a." * 40 + "b=1", "a key path of 41 parts (at most 32)"),
])
def test_hostile_set_values_are_one_short_line_naming_the_set(item, needle):
    with pytest.raises(UserError) as err:
        load_config(None, [item])
    line = str(err.value)
    assert line.startswith("--set '") and needle in line
    assert "\n" not in line and len(line) < 300  # quotes the --set cut short, not 30,000 brackets
