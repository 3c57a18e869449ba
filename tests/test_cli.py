"""The CLI through typer's CliRunner: in-process training, evaluation and the error contract."""

import json
import os
import tempfile

import pytest
from typer.testing import CliRunner

from fpc_ray.cli import app

runner = CliRunner()
SMALL = ["--image-size", "64", "--batch-size", "16", "--set", "data.decode_threads=2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("synth", "train", "evaluate", "bench"):
        assert cmd in result.output


def test_synth_then_train_in_process_then_evaluate(phantom_dir, tmp_path, monkeypatch):
    bundle = tmp_path / "bundle"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where each epoch's checkpoint is written
    result = invoke("train", "--data", phantom_dir, "--output", bundle, "--epochs", 2, *SMALL,
                    "--num-workers", 0)
    assert result.exit_code == 0, result.output
    assert not list(scratch.glob("fpc-ckpt-*"))  # an in-process run cleans up its checkpoints
    assert "epoch 2/2" in result.output and f"bundle: {bundle}" in result.output
    assert {p.name for p in bundle.iterdir()} == {"model.safetensors", "model.json", "metrics.json"}
    card = json.loads((bundle / "model.json").read_text())
    for key in ("version", "created_at", "versions", "architecture", "input", "class_names",
                "parameters", "config", "metrics", "data", "weights_sha256"):
        assert key in card
    assert card["input"]["size"] == 64 and card["input"]["mean"] == [0.5, 0.5, 0.5]
    assert card["metrics"]["test"]["n"] > 0 and card["data"]["fingerprint"]
    assert [h["epoch"] for h in json.loads((bundle / "metrics.json").read_text())] == [1, 2]

    out = tmp_path / "eval"
    result = invoke("evaluate", "--model", bundle, "--data", phantom_dir, "--split", "test", "--json",
                    "--output", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for key in ("top1", "top2", "macro_f1", "per_class", "confusion_matrix", "ece", "n"):
        assert key in report
    # The bundle's own test metrics were computed the same way.
    assert report["top1"] == pytest.approx(card["metrics"]["test"]["top1"])
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["n"] == report["n"]

    result = invoke("evaluate", "--model", bundle, "--data", phantom_dir, "--split", "val")
    assert result.exit_code == 0 and "macro_f1" in result.output

    # An existing bundle is not overwritten by accident.
    result = invoke("train", "--data", phantom_dir, "--output", bundle, "--epochs", 2, *SMALL)
    assert result.exit_code == 2
    assert "already holds a model bundle" in one_error_line(result)


def test_init_from_continues_a_bundle(phantom_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert invoke("train", "--data", phantom_dir, "--output", first, "--epochs", 2, *SMALL,
                  "--set", "model.attention.type=se").exit_code == 0
    result = invoke("train", "--data", phantom_dir, "--output", second, "--epochs", 2, *SMALL,
                    "--init-from", first)
    assert result.exit_code == 0, result.output
    parent = json.loads((first / "model.json").read_text())
    card = json.loads((second / "model.json").read_text())
    assert card["lineage"]["parent_version"] == parent["version"]
    assert card["architecture"]["attention"]["type"] == "se"  # the parent's architecture


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--data", "{missing}", "--output", "{tmp}/o"], "no FETAL_PLANES_DB_data.csv here"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--set", "train.lr=-1"],
         "train.lr: Input should be greater than 0"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--epochs", "0"], "train.epochs"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--config", "{tmp}/nope.yaml"], "config file not found"),
        (["train", "--data", "gs://bucket/x", "--output", "{tmp}/o"], "only local paths and s3:// URIs"),
        (["evaluate", "--model", "{tmp}", "--data", "{data}"], "not a model bundle"),
        (["synth", "{tmp}/s", "--per-class", "2", "--set", "storage.bogus=1"], "storage.bogus: Extra inputs"),
        (["bench", "label", "--model", "{tmp}", "--data", "{data}"], "not a model bundle"),
        (["bench", "label", "--model", "{tmp}", "--data", "{tmp}"], "no Images/ folder"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, needle, phantom_dir, tmp_path):
    fill = {"missing": str(tmp_path / "missing"), "tmp": str(tmp_path), "data": phantom_dir}
    result = invoke(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result)


def test_console_script_turns_bad_flags_into_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fpc_ray.cli", "train", "--bogus"],
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: No such option: --bogus (Possible options: --no-gpu)"] or \
        proc.stderr.strip().startswith("error: No such option: --bogus")
    assert len(proc.stderr.strip().splitlines()) == 1
