"""``fpc-ray demo``: the main job end to end on embedded defaults, for a fresh clone.

Phantom data -> distributed training on a local Ray cluster (2 workers, DDP) -> evaluation on
the official test split -> the bundle's location. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.evaluate import evaluate_bundle, save_report, summary_lines
from fpc_ray.train.driver import run_training


def run_demo(workdir: str, per_class: int = 100, epochs: int = 6, image_size: int = 128,
             num_workers: int = 2, echo: Callable[[str], None] = print) -> dict:
    """Run the demo under ``workdir`` and return the test report."""
    started = time.perf_counter()
    data, bundle, evaluation = (os.path.join(workdir, d) for d in ("data", "bundle", "evaluation"))

    echo(f"[1/3] phantom FETAL_PLANES_DB: {per_class} images per plane -> {data}")
    synthesize(data, per_class=per_class, seed=2026, width=384, height=288)

    echo(f"[2/3] training on local Ray: {num_workers} workers, {epochs} epochs at {image_size} px")
    cfg = load_config(None, [
        f"train.num_workers={num_workers}", "train.cpus_per_worker=1", f"train.epochs={epochs}",
        f"data.image_size={image_size}",
    ])
    outcome = run_training(cfg, data, bundle, overwrite=True)

    echo("[3/3] evaluating the bundle on the official test split")
    report = evaluate_bundle(bundle, data, "test")
    for line in summary_lines(report):
        echo("      " + line)
    written = save_report(report, evaluation)
    echo(f"bundle:     {outcome.bundle_uri}  (version {outcome.card['version']})")
    echo(f"evaluation: {', '.join(written)}")
    echo(f"demo finished in {time.perf_counter() - started:.0f}s")
    return report
