"""The ``fpc-ray`` command line: thin typer commands over plain, testable functions.

Heavy imports (torch, ray) live inside the command bodies so ``--help`` is instant.

Exit codes, the same in every command (one decorator, :func:`one_line_errors`): 0 done; 1 the
infrastructure failed (:class:`~fpc_ray.errors.RunFailed`: storage outage, lost workers; run it
again); 2 a mistake the user can fix (:class:`~fpc_ray.errors.UserError`); 3 is reserved for
drift. Both errors print one ``error: ...`` line naming the object or location and the cause;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from typer.exceptions import TyperException

from fpc_ray.cluster import skip_update_checks
from fpc_ray.config import CamMethod
from fpc_ray.errors import RunFailed, UserError, printable
from fpc_ray.review import Format as ReviewFormat
from fpc_ray.review import Strategy as ReviewStrategy

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Ultrasound fetal plane classification at scale, on Ray.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print measured ratios.")
app.add_typer(bench_app, name="bench")
review_app = typer.Typer(no_args_is_help=True, help="Review batches: uncertain frames out to reviewers, "
                                                    "their answers back as a dataset.")
app.add_typer(review_app, name="review")

class SplitName(StrEnum):
    test = "test"
    val = "val"
    train = "train"


# Shared options.
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config value: key.path=value (repeatable)."),
]
DataOpt = Annotated[str, typer.Option("--data", help="FETAL_PLANES_DB-layout folder or s3:// prefix.")]
DatasetsOpt = Annotated[list[str], typer.Option(
    "--data", help="FETAL_PLANES_DB-layout folder or s3:// prefix; repeat the option to join several datasets "
                   "(each is split by its own patients, then train, val and test are joined).")]


def one_or_many(data: list[str]) -> str | list[str]:
    """A repeatable ``--data``: one URI as a string (exactly as before), several as a list."""
    return data[0] if len(data) == 1 else list(data)


EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2


def fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    """Print one error line to stderr and return the Exit to raise."""
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(code)


def one_line_errors(fn):
    """Every command's error contract: a UserError is one line and exit code 2, a RunFailed
    (and its subclasses) one line and exit code 1; anything else keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise fail(str(e)) from None
        except RunFailed as e:
            raise fail(str(e), code=EXIT_RUN_FAILED) from None

    return wrapper


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from a size such as ``2GiB``, ``500MiB``, ``1GB``, ``1.5 GiB`` or ``1048576``.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB) of 1024;
    case does not matter.

    Raises:
        UserError: for anything else, or a size below one byte.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise UserError(f"size {text!r}: expected a number of bytes with an optional unit, "
                        f"e.g. 2GiB, 500MiB, 1GB or 1048576")
    size = int(Decimal(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size < 1:
        raise UserError(f"size {text!r}: must be at least one byte")
    return size


@app.command()
@one_line_errors
def synth(
    out: Annotated[str, typer.Argument(help="Destination folder or s3:// prefix.")],
    per_class: Annotated[int, typer.Option("--per-class", min=1, help="Images per plane.")] = 50,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    width: Annotated[int, typer.Option("--width", min=64, max=4096)] = 512,
    height: Annotated[int, typer.Option("--height", min=64, max=4096)] = 384,
    confuse: Annotated[str | None, typer.Option(
        "--confuse", metavar="PLANE=LOOKALIKE", help="Make a share of PLANE's images look like LOOKALIKE "
        "(a faint trace of their own structure left; labels unchanged), e.g. 'Fetal thorax=Fetal abdomen'.")] = None,
    confuse_share: Annotated[float, typer.Option("--confuse-share", min=0.0, max=1.0,
                                                 help="Share of PLANE's images made look-alikes.")] = 0.5,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset at OUT.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a phantom dataset in the exact FETAL_PLANES_DB layout."""
    from fpc_ray.config import load_config
    from fpc_ray.data.synth import refuse_existing_dataset, synthesize

    pair = None
    if confuse is not None:
        pair = tuple(p.strip() for p in confuse.split("="))
        if len(pair) != 2:
            raise fail(f"--confuse {confuse!r}: expected PLANE=LOOKALIKE, e.g. 'Fetal thorax=Fetal abdomen'")
    cfg = load_config(config, set_)
    if not overwrite:
        refuse_existing_dataset(out, cfg.storage)
    records = synthesize(out, per_class, seed=seed, width=width, height=height, storage=cfg.storage,
                         confuse=pair, confuse_share=confuse_share)
    n_train = sum(r.official_train for r in records)
    patients = len({r.patient for r in records})
    typer.echo(f"wrote {len(records)} images of {patients} patients to {out} "
               f"({n_train} official train, {len(records) - n_train} official test)")


@app.command()
@one_line_errors
def train(
    data: DatasetsOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Bundle folder or s3:// prefix.")],
    config: ConfigOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Per worker.")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="0 = in-process.")] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu")] = None,
    init_from: Annotated[str | None, typer.Option("--init-from", help="Bundle to continue from.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a bundle at --output.")] = False,
    set_: SetOpt = None,
) -> None:
    """Fine-tune the model with Ray Train and write a model bundle."""
    from fpc_ray.config import load_config

    cfg = load_config(config, set_, {
        "train.epochs": epochs, "data.image_size": image_size, "train.batch_size": batch_size,
        "train.num_workers": num_workers, "train.use_gpu": use_gpu, "train.init_from": init_from,
    })
    if cfg.train.use_gpu:
        import torch

        if cfg.train.num_workers == 0 and not torch.cuda.is_available():
            raise fail("--use-gpu: no CUDA device is visible to this process")

    from fpc_ray.train.driver import run_training

    outcome = run_training(cfg, one_or_many(data), output, overwrite=overwrite)
    card = outcome.card
    test = card["metrics"]["test"]
    val = card["metrics"]["val"]
    typer.echo(f"best epoch {val['epoch']}: val_top1 {val['val_top1']:.4f}  val_top2 {val['val_top2']:.4f}")
    if test:
        from fpc_ray.evaluate import calibration_note

        typer.echo(f"test: top1 {test['top1']:.4f}  top2 {test['top2']:.4f}  macro_f1 {test['macro_f1']:.4f}  "
                   f"ece {test['ece']:.4f}{calibration_note(test)}  (n={test['n']})")
    typer.echo(f"parameters: {card['parameters']['total']:,} total, {card['parameters']['trainable']:,} trainable")
    typer.echo(f"bundle: {outcome.bundle_uri}  (version {card['version']})")


@app.command()
@one_line_errors
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model bundle folder or s3:// URI.")],
    data: DatasetsOpt,
    split: Annotated[SplitName, typer.Option("--split")] = SplitName.test,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    output: Annotated[
        str | None, typer.Option("--output", help="Also write metrics.json and confusion_matrix.png here.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    use_gpu: Annotated[bool, typer.Option("--use-gpu/--no-gpu")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score a bundle on a split: top-1/2, macro-F1, per-class metrics, confusion matrix, ECE."""
    from fpc_ray.config import load_config
    from fpc_ray.evaluate import save_report, summary_lines
    from fpc_ray.scoring import evaluate_bundle

    cfg = load_config(config, set_)
    report = evaluate_bundle(model, one_or_many(data), split.value, batch_size, use_gpu, cfg.storage, cfg.data.cache)
    written = save_report(report, output, cfg.storage) if output else []
    if as_json:
        typer.echo(json.dumps(report))
        return
    for line in summary_lines(report):
        typer.echo(line)
    for uri in written:
        typer.echo(f"wrote {uri}")


UID_KEY_ENV = "FPC_RAY_UID_KEY"
MIN_UID_KEY_CHARS = 16


@app.command()
@one_line_errors
def label(
    model: Annotated[str, typer.Option("--model", "-m", help="Model bundle folder or s3:// URI.")],
    input: Annotated[list[str], typer.Option("--input", "-i", help="Archive prefix (local or s3://), any "
                                             "depth; repeat the option to label several prefixes in one run.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output prefix for run=<id>/ folders.")],
    run_id: Annotated[str | None, typer.Option("--run-id", help="Default: UTC timestamp.")] = None,
    cam: Annotated[CamMethod, typer.Option("--cam")] = "gradcam",
    thumb_size: Annotated[int, typer.Option("--thumb-size", min=16, max=1024, help="Long side, px.")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Predictor actors.")] = 1,
    use_gpu: Annotated[bool, typer.Option("--use-gpu/--no-gpu")] = False,
    gpu_jpeg: Annotated[bool, typer.Option(
        "--gpu-jpeg/--no-gpu-jpeg",
        help="With --use-gpu: decode JPEG files and DICOM JPEG Baseline frames on the GPU (nvJPEG, in "
             "batches); --no-gpu-jpeg decodes every frame on the CPU cores.")] = True,
    frame_stride: Annotated[int, typer.Option("--frame-stride", min=1, help="Every K-th cine frame.")] = 1,
    full: Annotated[bool, typer.Option("--full", help="Relabel objects already in committed runs.")] = False,
    max_error_rate: Annotated[float, typer.Option("--max-error-rate", min=0.0, max=1.0)] = 0.5,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N new objects.")] = None,
    max_object_size: Annotated[str, typer.Option(
        "--max-object-size", metavar="SIZE",
        help="Larger objects (by their listed size) are not read; each becomes a too_large error row. "
             "Bytes, or with a unit: 500MiB, 2GiB, 1GB.")] = "2GiB",
    uid_key: Annotated[str | None, typer.Option(
        "--pseudonymize-uids", metavar="KEY", envvar=UID_KEY_ENV, show_envvar=True,
        help=f"Write a keyed hash of each DICOM UID in place of the UID: the same UID "
             f"gives the same value wherever KEY is the same, and without KEY it cannot be traced "
             f"back. KEY is at least {MIN_UID_KEY_CHARS} characters (e.g. `openssl rand -hex 32`); "
             f"set it in the environment variable {UID_KEY_ENV} rather than on the command line, "
             f"where process listings show it.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Label an ultrasound archive (PNG, JPEG, DICOM) into Parquet with GradCAM thumbnails."""
    max_object_bytes = parse_size(max_object_size)
    if uid_key is not None and len(uid_key) < MIN_UID_KEY_CHARS:
        # A short key can be found by trying keys against a UID whose value is known.
        raise fail(f"--pseudonymize-uids / {UID_KEY_ENV}: the key has {len(uid_key)} characters; "
                   f"use at least {MIN_UID_KEY_CHARS} (e.g. `openssl rand -hex 32`)")

    from fpc_ray.config import load_config
    from fpc_ray.label.pipeline import LabelOptions, run_labelling

    cfg = load_config(config, set_)
    opts = LabelOptions(run_id=run_id, cam=cam, thumb_size=thumb_size, batch_size=batch_size,
                        workers=workers, use_gpu=use_gpu, frame_stride=frame_stride, full=full,
                        max_error_rate=max_error_rate, limit=limit, max_object_bytes=max_object_bytes,
                        uid_key=uid_key, jpeg_on_gpu=None if gpu_jpeg else False)
    inputs = input[0] if len(input) == 1 else list(input)
    summary = run_labelling(model, inputs, output, opts, cfg.storage, echo=typer.echo)
    typer.echo(f"committed {summary['output']}: {summary['objects']['labelled']} objects, "
               f"{summary['rows']} rows, {summary['labelled']} labelled, {summary['errors']} errors "
               f"{summary['errors_by_kind'] or ''}".rstrip())
    if summary["by_class"]:
        typer.echo("by class: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_class"].items())))


@app.command()
@one_line_errors
def tune(
    data: DatasetsOpt,
    output: Annotated[str, typer.Option("--output", "-o", help="Search folder or s3:// prefix.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Search YAML (default: the built-in "
                                                 "search, written out in configs/tune.yaml).")] = None,
    num_samples: Annotated[int | None, typer.Option("--num-samples", min=1, help="Trials.")] = None,
    max_concurrent: Annotated[int | None, typer.Option("--max-concurrent", min=1)] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Per trial.")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
    workers_per_trial: Annotated[int | None, typer.Option("--workers-per-trial", min=1)] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the interrupted search at --output. This unpickles Ray Tune's saved state "
                         "from --output, which runs code: resume only from a prefix you trust like code "
                         "(one that only you and your jobs can write).")] = False,
) -> None:
    """Search attention, MLP head and schedule with Ray Tune (Optuna TPE + ASHA)."""
    from fpc_ray.tune.search import run_search
    from fpc_ray.tune.space import load_tune_spec

    spec = load_tune_spec(config, {
        "train.epochs": epochs, "data.image_size": image_size, "train.use_gpu": use_gpu,
        "search.num_samples": num_samples, "search.max_concurrent": max_concurrent,
        "search.workers_per_trial": workers_per_trial,
    })
    outcome = run_search(spec, one_or_many(data), output, resume=resume, echo=typer.echo)
    for line in outcome.leaderboard:
        typer.echo(line)
    counts = {s: sum(r["status"] == s for r in outcome.rows) for s in ("completed", "stopped", "error")}
    typer.echo(f"{len(outcome.rows)} trials ({', '.join(f'{v} {k}' for k, v in counts.items() if v)}): "
               f"{output.rstrip('/')}/trials.parquet")
    if outcome.best is None:
        raise fail("no trial ran to the end, so there is no best configuration", code=EXIT_RUN_FAILED)
    out = output.rstrip("/")
    how = (f"fpc-ray train --config {out}/best.yaml --data ... --output ..." if "://" not in out
           else "download best.yaml, then fpc-ray train --config best.yaml --data ... --output ...")
    typer.echo(f"best: {out}/best.yaml and {out}/best/ ({how})")


@app.command()
@one_line_errors
def retrain(
    data: DatasetsOpt,
    pointer: Annotated[str, typer.Option("--pointer", help="Promotion pointer, e.g. s3://models/production.json.")],
    candidates: Annotated[str, typer.Option("--candidates", help="Prefix for candidate bundles (one per run).")],
    margin: Annotated[float, typer.Option("--margin", min=0.0, max=1.0,
                                          help="Promote unless top-1 drops by more than this.")] = 0.01,
    test_data: Annotated[str | None, typer.Option("--test-data", help="Fixed test set (default: the official "
                                                                        "test patients of every --data).")] = None,
    config: ConfigOpt = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size")] = None,
    num_workers: Annotated[int | None, typer.Option("--num-workers", help="0 = in-process.")] = None,
    use_gpu: Annotated[bool | None, typer.Option("--use-gpu/--no-gpu")] = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune production on the latest data; promote the candidate only if it is not worse."""
    from fpc_ray.config import load_config
    from fpc_ray.train.retrain import retrain as run_retrain

    cfg = load_config(config, set_, {"train.epochs": epochs, "data.image_size": image_size,
                                     "train.num_workers": num_workers, "train.use_gpu": use_gpu})
    decision = run_retrain(cfg, one_or_many(data), pointer, candidates, margin, test_data, echo=typer.echo)
    typer.echo(decision.line)


@app.command()
@one_line_errors
def report(
    target: Annotated[str, typer.Argument(help="A model bundle (or promotion pointer), a committed run, "
                                               "OUTPUT/run=<id>, or a labelling OUTPUT holding runs (its "
                                               "trends page), local or s3://.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")],
    hide_sources: Annotated[bool, typer.Option(
        "--no-source-uri-in-report",
        help="For a page to share: every source URI (and the run's input prefix, or a bundle's data "
             "URI) is replaced by a short pseudonym such as 'object 3f2a9c1e', the same for one "
             "object throughout the page. Thumbnails still show what the images show, burned-in text "
             "included.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """One self-contained HTML page (pictures embedded) for a model bundle, a labelling run or the trends
    of a labelling output's runs."""
    from fpc_ray.config import load_config
    from fpc_ray.report import build_report

    cfg = load_config(config, set_)
    if output.is_dir():
        raise fail(f"--output {output}: is a folder; give a file name such as report.html")
    if not output.parent.exists():
        raise fail(f"--output {output}: folder {output.parent} does not exist")
    kind, page = build_report(target, cfg.storage, hide_sources=hide_sources, output=output,
                              drift=cfg.drift)
    output.write_text(page, encoding="utf-8")
    typer.echo(f"wrote the {kind} report of {target} to {output} ({len(page) / 1e6:.1f} MB)")


@app.command()
@one_line_errors
def drift(
    prefix: Annotated[str, typer.Argument(help="A labelling output prefix holding run=<id>/ folders.")],
    reference: Annotated[str | None, typer.Option("--reference", metavar="RUN_ID",
                                                  help="Compare every run with this one run.")] = None,
    window: Annotated[int | None, typer.Option(
        "--reference-window", min=1, metavar="N",
        help="Compare each run with the N runs before it, pooled (default: drift.reference_window).")] = None,
    last: Annotated[int | None, typer.Option("--last", min=1, metavar="N", help="Show only the newest N runs "
                                             "(the references still reach back before them).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    fail_on_drift: Annotated[bool, typer.Option(
        "--fail-on-drift", help="Exit 3, with one 'drift: ...' line on stderr naming what moved, when the "
                                "newest run is at the alert level.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Night over night: class mix, confidence, errors and drift scores of every committed run."""
    from fpc_ray.config import load_config
    from fpc_ray.drift.check import EXIT_DRIFT, check_drift
    from fpc_ray.drift.table import run_records, text_table

    cfg = load_config(config, set_)
    check = check_drift(prefix, cfg.drift, cfg.storage, reference, window)
    records = run_records(check.assessments)[-last if last else None:]
    if as_json:
        typer.echo(json.dumps({"prefix": prefix, "thresholds": cfg.drift.model_dump(),
                               "reference": {"run": reference} if reference else
                               {"window": window or cfg.drift.reference_window},
                               "runs": records, "newest": {"run_id": check.newest.run.run_id,
                                                           "level": check.newest.level, "line": check.line()}}))
    else:
        for line in text_table(records, check.assessments[-len(records):]):
            typer.echo(line)
    if fail_on_drift and check.drifted:
        typer.echo(check.line(), err=True)
        raise typer.Exit(EXIT_DRIFT)


@app.command()
@one_line_errors
def demo(
    workdir: Annotated[str, typer.Option("--workdir", help="Where data, bundle and evaluation go.")] = "demo",
    per_class: Annotated[int, typer.Option("--per-class", min=6)] = 100,
    epochs: Annotated[int, typer.Option("--epochs", min=2)] = 6,
    image_size: Annotated[int, typer.Option("--image-size", min=32)] = 128,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0)] = 2,
) -> None:
    """Run the main job end to end on embedded defaults: phantom data, local Ray, evaluation."""
    from fpc_ray.demo import run_demo

    run_demo(workdir, per_class, epochs, image_size, num_workers, echo=typer.echo)


@bench_app.command("train")
@one_line_errors
def bench_train(
    data: DataOpt,
    image_size: Annotated[int, typer.Option("--image-size")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    epochs: Annotated[int, typer.Option("--epochs", min=2)] = 3,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Training images/s of `fpc-ray train` (1 Ray worker) over a plain PyTorch loop."""
    from fpc_ray.bench.train_speed import run_benchmark
    from fpc_ray.config import load_config

    cfg = load_config(config, set_, {"data.image_size": image_size, "train.batch_size": batch_size,
                                     "train.epochs": epochs})
    for line in run_benchmark(cfg, data):
        typer.echo(line)


@bench_app.command("ingest")
@one_line_errors
def bench_ingest(
    data: DataOpt,
    scale: Annotated[int, typer.Option("--scale", min=2, help="the data repeated K times, against 1x")] = 8,
    image_size: Annotated[int, typer.Option("--image-size")] = 128,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    epochs: Annotated[int, typer.Option("--epochs", min=2)] = 3,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Driver and worker peak memory (USS) on Kx data against 1x, training images/s over a plain
    in-memory PyTorch loop, the ingest path auto took, and Ray Data forced at 1x; the last line is JSON."""
    from fpc_ray.bench.ingest import run_benchmark
    from fpc_ray.config import load_config

    cfg = load_config(config, set_, {"data.image_size": image_size, "train.batch_size": batch_size,
                                     "train.epochs": epochs})
    for line in run_benchmark(cfg, data, scale):
        typer.echo(line)


@bench_app.command("label")
@one_line_errors
def bench_label(
    model: Annotated[str, typer.Option("--model", "-m", help="Model bundle folder.")],
    data: Annotated[str, typer.Option("--data", help="A local FETAL_PLANES_DB-layout folder to draw images from.")],
    images: Annotated[int, typer.Option("--images", min=100)] = 2000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Rounds; each rate is its best round.")] = 3,
) -> None:
    """Labelling: GradCAM cost, fpc-ray label over a bare loop, memory at 10x the images."""
    from fpc_ray.bench.label_speed import run_benchmark

    for line in run_benchmark(model, data, images, batch_size, repeats):
        typer.echo(line)


@bench_app.command("gpu")
@one_line_errors
def bench_gpu(
    frames: Annotated[int | None, typer.Option("--frames", min=20, help="Frames per archive "
                                               "(default 20,000 with CUDA, 240 without).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", min=32,
                                                   help="Default 224 with CUDA, 96 without.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", min=2,
                                               help="Training epochs (the first is warm-up).")] = None,
    compile_ceiling: Annotated[bool | None, typer.Option("--compile/--no-compile", help="Also measure "
                                                         "torch.compile'd inference (default: with CUDA).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Where archives and runs go (default: a "
                                                 "temporary folder, removed after).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")] = None,
) -> None:
    """The node's ceilings (decode on all cores, nvJPEG, inference, training step) beside fpc-ray's
    labelling and training on the same node, and their ratios, in one run."""
    import dataclasses

    import torch

    from fpc_ray.bench.gpu import GpuBenchSizes, run_and_report

    sizes = GpuBenchSizes.for_device(torch.cuda.is_available())
    given = {"image_size": image_size, "epochs": epochs, "compile_ceiling": compile_ceiling}
    if frames is not None:
        given.update(frames=frames, slice_frames=max(10, frames // 4))
    sizes = dataclasses.replace(sizes, **{k: v for k, v in given.items() if v is not None})
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    for line in run_and_report(sizes, str(workdir) if workdir else None, str(json_out) if json_out else None,
                               echo=typer.echo):
        typer.echo(line)


@bench_app.command("history")
@one_line_errors
def bench_history(
    runs: Annotated[int, typer.Option("--runs", min=2, help="Committed runs in the long history.")] = 1000,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Where the histories are written "
                                                 "(default: a temporary folder, removed after).")] = None,
) -> None:
    """Labelling start-up (what is already labelled?) with 1 and with --runs committed runs."""
    import tempfile

    from fpc_ray.bench.history import run_benchmark

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        lines = run_benchmark(runs, str(workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="fpc-bench-history-") as tmp:
            lines = run_benchmark(runs, tmp)
    for line in lines:
        typer.echo(line)


@review_app.command("export")
@one_line_errors
def review_export(
    inputs: Annotated[list[str], typer.Argument(
        metavar="RUN_OR_LABELS_PREFIX...", help="Committed runs (LABELS/run=<id>) or labels prefixes (every "
                                                "committed run under them); local or s3://.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The batch's folder or s3:// prefix. Frames in "
                                        "the batches beside it (its parent's */manifest.parquet) are not "
                                        "exported again: keep a project's batches under one parent.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Frames in the batch.")],
    strategy: Annotated[ReviewStrategy, typer.Option("--strategy")] = ReviewStrategy.least_confident,
    per_class: Annotated[int | None, typer.Option("--per-class", min=1, help="per-class: frames per predicted "
                                                  "class (default: N over the classes).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="For --strategy random.")] = 0,
    formats: Annotated[list[ReviewFormat] | None, typer.Option(
        "--format", help="Write only this format (repeatable; default: both).")] = None,
    image_root: Annotated[str | None, typer.Option(
        "--image-root", help="URL Label Studio reaches the batch folder at (e.g. /data/local-files/?d=batches/b1); "
                             "default: the batch's s3:// URI, or images/<id>.png relative to a local batch.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a review batch of the least certain frames of committed labelling runs."""
    from fpc_ray.config import load_config
    from fpc_ray.review.export import ExportOptions, export_batch

    cfg = load_config(config, set_)
    chosen = tuple(dict.fromkeys(f.value for f in formats)) if formats else tuple(f.value for f in ReviewFormat)
    opts = ExportOptions(n=n, strategy=strategy, per_class=per_class, seed=seed, formats=chosen,
                         image_root=image_root)
    summary = export_batch(inputs, output, opts, cfg.storage, echo=typer.echo)
    typer.echo(f"exported {summary['frames']} frame(s) from {summary['runs']} run(s) to {summary['batch']} "
               f"({strategy.value}; {summary['already_exported']} in earlier batches left out)")
    typer.echo("by predicted class: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_class"].items())))


@review_app.command("import")
@one_line_errors
def review_import(
    annotations: Annotated[str, typer.Argument(help="Label Studio's JSON export, or the batch's tasks.csv "
                                                    "filled in; local or s3://.")],
    batch: Annotated[str, typer.Option("--batch", help="The review batch the answers are for.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The dataset folder or s3:// prefix to create "
                                        "(FETAL_PLANES_DB layout); must not exist or be empty.")],
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.0, max=1.0,
                                                 help="Share of the studies in the test split.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Draws the test studies.")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Turn reviewers' answers into a FETAL_PLANES_DB-layout dataset, and report the model's agreement."""
    from fpc_ray.config import load_config
    from fpc_ray.review.importer import import_answers

    cfg = load_config(config, set_)
    s = import_answers(annotations, batch, output, test_fraction, seed, cfg.storage, echo=typer.echo)
    typer.echo(f"wrote {s['reviewed']} reviewed frame(s) to {output} ({s['train_studies']} train / "
               f"{s['test_studies']} test studies); {s['unsure']} unsure, {s['skipped']} skipped")
    typer.echo(f"agreement: the model's label was the reviewers' for {s['model_right']} of {s['reviewed']} "
               f"({s['agreement']:.1%})")
    for name, c in s["per_class"].items():
        typer.echo(f"  {name}: {c['model_right']}/{c['reviewed']} ({c['agreement']:.1%})")


@review_app.command("demo")
@one_line_errors
def review_demo(
    workdir: Annotated[str, typer.Option("--workdir", help="Where the embedded S3 keeps its data.")] = "review-demo",
) -> None:
    """The whole review loop on phantoms (embedded S3, local Ray), with a script as the reviewer:
    label, export, review, import, retrain, promote; the confused plane's recall before and after."""
    from fpc_ray.review.demo import run_demo_with_embedded_s3

    Path(workdir).mkdir(parents=True, exist_ok=True)
    run_demo_with_embedded_s3(workdir, echo=typer.echo)


def main() -> None:
    """Console entry point: click's usage errors become one line, like every other error."""
    skip_update_checks()
    try:
        rc = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except TyperException as e:  # bad flags and arguments (typer's own click)
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {printable(message)}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
