"""``fpc-ray demo``: the main jobs end to end on embedded defaults, for a fresh clone.

An embedded S3 server (SeaweedFS on loopback) -> phantom data -> distributed training on a local
Ray cluster (2 workers, DDP) -> evaluation on the official test split -> a phantom study archive
with a few broken files uploaded to S3 and labelled into Parquet with GradCAM thumbnails.
Nothing leaves the machine.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable

from fpc_ray.config import load_config
from fpc_ray.data.fetal_planes import read_fetal_planes
from fpc_ray.data.synth import synthesize
from fpc_ray.devtools.s3server import EmbeddedS3
from fpc_ray.evaluate import save_report, summary_lines
from fpc_ray.label.pipeline import LabelOptions, run_labelling
from fpc_ray.report import build_report
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.train.driver import run_training

BROKEN = {"empty.png": b"", "notes.txt": b"scanner export log\n", "cut.png": None}


def _upload_archive(server: EmbeddedS3, data: str, day: dt.date, n: int) -> int:
    """Phantom PNGs in per-study folders plus broken files, under archive/YYYY/MM/DD/."""
    client = server.client()
    db = read_fetal_planes(data)
    prefix = f"{day:%Y/%m/%d}/"
    records = db.split("test", 0.15)[:n]
    for r in records:
        client.put_object(Bucket="archive", Key=f"{prefix}study-{r.patient:05d}/{r.image_name}.png",
                          Body=db.image_location(r).read_bytes())
    for name, body in BROKEN.items():
        body = body if body is not None else db.image_location(records[0]).read_bytes()[:200]
        client.put_object(Bucket="archive", Key=f"{prefix}broken/{name}", Body=body)
    return len(records) + len(BROKEN)


def run_demo(workdir: str, per_class: int = 100, epochs: int = 6, image_size: int = 128,
             num_workers: int = 2, echo: Callable[[str], None] = print) -> dict:
    """Run the demo under ``workdir`` and return the labelling run's summary."""
    started = time.perf_counter()
    data, bundle, evaluation = (os.path.join(workdir, d) for d in ("data", "bundle", "evaluation"))

    echo(f"[1/4] embedded S3 (SeaweedFS) under {workdir}/s3; phantom FETAL_PLANES_DB -> {data}")
    with EmbeddedS3(os.path.join(workdir, "s3")) as server:
        # Set before Ray starts, so every Ray worker inherits the endpoint and credentials.
        os.environ.update(server.env())
        for bucket in ("archive", "labels"):
            server.create_bucket(bucket)
        synthesize(data, per_class=per_class, seed=2026, width=384, height=288)

        echo(f"[2/4] training on local Ray: {num_workers} workers, {epochs} epochs at {image_size} px")
        cfg = load_config(None, [f"train.num_workers={num_workers}", "train.cpus_per_worker=1",
                                 f"train.epochs={epochs}", f"data.image_size={image_size}"])
        outcome = run_training(cfg, data, bundle, overwrite=True)

        echo("[3/4] evaluating the bundle on the official test split")
        report = evaluate_bundle(bundle, data, "test")
        for line in summary_lines(report):
            echo("      " + line)
        written = save_report(report, evaluation)

        day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
        count = _upload_archive(server, data, day, n=60)
        echo(f"[4/4] labelling s3://archive/{day:%Y/%m/%d}/ ({count} objects, {len(BROKEN)} of them broken)")
        summary = run_labelling(bundle, f"s3://archive/{day:%Y/%m/%d}/", "s3://labels",
                                LabelOptions(full=True), echo=echo)
        echo(f"      {summary['rows']} rows: {summary['labelled']} labelled, {summary['errors']} errors "
             f"{summary['errors_by_kind']}")
        echo("      by class: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_class"].items())))

        # The pictures a person looks at: one page for the model, one for the night's run.
        pages = {}
        for name, target in (("model.html", bundle), ("run.html", summary["output"])):
            pages[name] = os.path.join(workdir, name)
            with open(pages[name], "w", encoding="utf-8") as f:
                f.write(build_report(target, cfg.storage)[1])

    echo(f"bundle:     {outcome.bundle_uri}  (version {outcome.card['version']})")
    echo(f"evaluation: {', '.join(written)}")
    echo(f"reports:    {pages['model.html']} and {pages['run.html']} (open them in a browser)")
    echo(f"parquet:    {summary['output']}/part-*.parquet  (SeaweedFS data in {workdir}/s3; "
         f"serve it again with python -m fpc_ray.devtools.s3server {workdir}/s3)")
    echo(f"demo finished in {time.perf_counter() - started:.0f}s")
    return summary
