"""The CLI through typer's CliRunner: in-process training, evaluation and the error contract."""

import json
import os
import re
import tempfile
from pathlib import Path

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


@pytest.mark.slow
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


def test_init_from_continues_a_bundle(trained_bundle, phantom_dir, tmp_path):
    parent = json.loads((Path(trained_bundle["bundle"]) / "model.json").read_text())
    assert parent["architecture"]["attention"]["type"] == "cbam"
    child = tmp_path / "child"
    result = invoke("train", "--data", phantom_dir, "--output", child, "--epochs", 2, *SMALL,
                    "--init-from", trained_bundle["bundle"], "--set", "model.attention.type=se")
    assert result.exit_code == 0, result.output
    card = json.loads((child / "model.json").read_text())
    assert card["lineage"]["parent_version"] == parent["version"]
    assert card["architecture"]["attention"]["type"] == "cbam"  # the parent's architecture, not the config's


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--data", "{missing}", "--output", "{tmp}/o"], "no FETAL_PLANES_DB_data.csv here"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--set", "train.lr=-1"],
         "train.lr: Input should be greater than 0"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--epochs", "0"], "train.epochs"),
        (["train", "--data", "{data}", "--output", "{tmp}/o", "--batch-size", "512", "--num-workers", "0"],
         "fewer than one batch of 512; lower --batch-size"),
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


@pytest.mark.slow
def test_console_script_turns_bad_flags_into_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fpc_ray.cli", "train", "--bogus"],
                          capture_output=True, text=True, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 2
    # click may add its guess of the option meant ("(Possible options: ...)") after the message.
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: No such option: --bogus"), line


# ---------------------------------------------------------------- exit codes: one decorator, one line
def test_every_command_maps_errors_through_one_decorator():
    import typer

    from fpc_ray.cli import one_line_errors
    from fpc_ray.errors import RunFailed, UserError

    # Every command, the bench group's included, runs inside one_line_errors's wrapper.
    wrapper_code = one_line_errors(lambda: None).__code__
    groups = [g.typer_instance for g in app.registered_groups]
    commands = [*app.registered_commands, *(c for g in groups for c in g.registered_commands)]
    names = {c.callback.__name__ for c in commands}
    assert {"train", "retrain", "demo", "bench_train", "bench_label", "bench_history"} <= names, names
    for command in commands:
        assert command.callback.__code__ is wrapper_code, command.callback.__name__

    probe = typer.Typer()

    @probe.command()
    @one_line_errors
    def run(kind: str) -> None:
        raise {"user": UserError("s3://b/x: no such bundle"),
               "infra": RunFailed("labelling run r1 failed, nothing committed: s3://b/out: timed out")}[kind]

    user = runner.invoke(probe, ["user"])
    assert user.exit_code == 2 and "no such bundle" in one_error_line(user)
    infra = runner.invoke(probe, ["infra"])
    assert infra.exit_code == 1 and "timed out" in one_error_line(infra)


def test_ray_training_failures_become_one_line_naming_run_and_cause():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from fpc_ray.errors import RunFailed, UserError, ray_failure

    what = "training run train-1 for s3://m/b failed after 3 restart(s)"
    worker = WorkerGroupError("[Rank 0 Error Snippet]: ...\nTraceback ...", {
        1: ValueError("rank 1"), 0: RuntimeError("CUDA out of memory\nTried to allocate 2 GiB")})
    err = ray_failure(worker, what)
    assert isinstance(err, RunFailed)
    assert str(err) == f"{what}: RuntimeError: CUDA out of memory"

    err = ray_failure(ControllerError(OSError("s3://m/b/ray: connection refused")), what)
    assert isinstance(err, RunFailed) and str(err).endswith("OSError: s3://m/b/ray: connection refused")

    # A mistake the user can fix stays one, even when a worker found it.
    err = ray_failure(WorkerGroupError("...", {0: UserError("model.backbone: Unknown model (x)")}), what)
    assert isinstance(err, UserError) and str(err) == f"{what}: model.backbone: Unknown model (x)"

    try:  # a remote task's error, unwrapped to the task's own exception
        raise KeyError("val_top1")
    except KeyError as e:
        task = RayTaskError("evaluate_arrays", "Traceback ...", e)
    assert str(ray_failure(task, what)) == f"{what}: KeyError: 'val_top1'"


# ---------------------------------------------------------------- label's new options
@pytest.mark.parametrize(("text", "size"), [
    ("2GiB", 2 * 2**30), ("500MiB", 500 * 2**20), ("1GB", 10**9), ("1048576", 2**20), ("1.5 gib", 3 * 2**29),
    ("64kB", 64_000), ("3KiB", 3072), ("1TiB", 2**40), ("12b", 12),
])
def test_parse_size(text, size):
    from fpc_ray.cli import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "2 GiBs", "0", "0.1", "1e9", "2 G", "two GiB"])
def test_parse_size_refuses(text):
    from fpc_ray.cli import parse_size
    from fpc_ray.errors import UserError

    with pytest.raises(UserError, match="size"):
        parse_size(text)


def _plain_help(*args) -> str:
    """--help without rich's boxes and line wraps, so phrases can be searched."""
    result = runner.invoke(app, [*args, "--help"], env={"NO_COLOR": "1", "COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())


def test_label_help_documents_the_new_options():
    text = _plain_help("label")
    for needle in ("--max-object-size", "too_large", "2GiB", "--pseudonymize-uids", "FPC_RAY_UID_KEY",
                   "process listings", "repeat the option"):
        assert needle in text, needle


@pytest.mark.parametrize(("args", "env", "needle"), [
    (["--max-object-size", "lots"], {}, "size 'lots'"),
    (["--pseudonymize-uids", "short"], {}, "at least 16"),
    ([], {"FPC_RAY_UID_KEY": "short"}, "FPC_RAY_UID_KEY: the key has 5 characters"),
])
def test_label_bad_new_options_are_one_line(args, env, needle, tmp_path):
    result = runner.invoke(app, ["label", "--model", str(tmp_path), "--input", str(tmp_path), "--input",
                                 str(tmp_path / "b"), "--output", str(tmp_path / "o"), *args], env=env)
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result)


def test_tune_resume_help_says_the_output_is_trusted_like_code():
    assert "trust like code" in _plain_help("tune")


def test_report_help_offers_no_source_uri():
    text = _plain_help("report")
    assert "--no-source-uri-in-report" in text and "pseudonym" in text


# ---------------------------------------------------------------- albumentations' update check
@pytest.mark.slow
def test_importing_fpc_ray_changes_no_environment_variable():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", "import os, fpc_ray, fpc_ray.cli, fpc_ray.cluster; "
                           "print('NO_ALBUMENTATIONS_UPDATE' in os.environ)"],
                          capture_output=True, text=True, env=env)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_the_cli_entry_point_turns_albumentations_update_check_off(monkeypatch):
    import sys

    from fpc_ray.cli import main

    monkeypatch.delenv("NO_ALBUMENTATIONS_UPDATE", raising=False)
    monkeypatch.setattr(sys, "argv", ["fpc-ray", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert os.environ["NO_ALBUMENTATIONS_UPDATE"] == "1"


# ---------------------------------------------------------------- run ids and hostile configs
@pytest.mark.parametrize("run_id", ["night$\\frac$", "a/b", "..", ".hidden", "", "x" * 129, "r\x1b[31m", "é"])
def test_label_refuses_an_unsafe_run_id_before_anything_is_read_or_written(run_id, tmp_path):
    result = runner.invoke(app, ["label", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path),
                                 "--output", str(tmp_path / "o"), "--run-id", run_id])
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith("error: --run-id ") and "letters, digits, '.', '_' or '-'" in line
    assert "\x1b" not in line and not (tmp_path / "o").exists()


def test_every_run_id_and_batch_name_fpc_ray_makes_is_safe(tmp_path):
    import datetime as dt

    from fpc_ray.label.pipeline import default_run_id
    from fpc_ray.label.runs import RUN_ID, check_run_id, free_run_id
    from fpc_ray.review.loop import batch_name
    from fpc_ray.storage import resolve

    output = tmp_path / "labels"
    for taken in ("20261126T031500Z", "20261126T031500Z-02"):
        (output / f"run={taken}").mkdir(parents=True)
    made = [default_run_id(), free_run_id(resolve(str(output)), "20261126T031500Z"), batch_name(),
            f"nightly-{dt.date(2026, 11, 24).isoformat()}", "bench"]
    assert made[1] == "20261126T031500Z-03"
    assert all(RUN_ID.fullmatch(r) and check_run_id(r) == r for r in made), made


def test_review_loop_job_refuses_an_unsafe_batch_name(tmp_path, capsys):
    from jobs.review_loop import main

    assert main(["ingest", "--annotations", str(tmp_path / "a.json"), "--batch", str(tmp_path / "b$x"),
                 "--datasets", str(tmp_path / "d"), "--base-data", str(tmp_path), "--pointer",
                 str(tmp_path / "p.json"), "--candidates", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.startswith("error: --batch name 'b$x': use 1 to 128")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("text", "needle"), [
    ("base: 5\n", "c.yaml: base: expected the name of another config file, found 5"),
    ("base: [a, b]\n", "c.yaml: base: expected the name of another config file"),
    ("train: {seed: " + "9" * 5000 + "}\n", "c.yaml: an integer of 5000 digits (at most 64)"),
])
def test_hostile_config_file_is_one_line_and_writes_nothing(text, needle, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    result = invoke("synth", tmp_path / "s", "--per-class", 2, "--config", tmp_path / "c.yaml")
    assert result.exit_code == 2, result.output
    assert needle in one_error_line(result) and not (tmp_path / "s").exists()


@pytest.mark.parametrize(("value", "needle"), [
    ("9" * 5000, "an integer of 5000 digits"), ("[" * 30_000, "nested deeper than 32 levels")])
def test_hostile_set_is_one_short_line_and_writes_nothing(value, needle, tmp_path):
    result = invoke("synth", tmp_path / "s", "--per-class", 2, "--set", f"train.seed={value}")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith("error: --set 'train.seed=") and needle in line and len(line) < 300
    assert not (tmp_path / "s").exists()
