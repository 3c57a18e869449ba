"""``fpc-ray tune``'s driver: Optuna (TPE) proposes, ASHA stops early, every trial is ``fpc-ray train``.

Each trial runs :func:`fpc_ray.train.driver.run_training` (the same TorchTrainer, loop and bundle
writer as ``fpc-ray train``) with Tune's ``TuneReportCallback``, on data the driver prepares once
for all trials (one dataset, or several joined as ``fpc-ray train`` joins them), on the ingest path
``data.cache`` chooses (fixed per search): the decoded arrays or the materialized Ray Datasets
shared from the object store, or under ``stream`` rows that each trial's epochs decode. Layout of
OUTPUT::

    search.json        the resolved search (spec + data URI or URIs), read back by --resume
    tune/              Ray Tune's experiment state (Tuner.restore reads it)
    trials/<id>/       each trial's model bundle (only trials that ran to the end have one)
    trials.parquet     one row per trial
    best.yaml          the best trial's training config, for ``fpc-ray train --config``
    best/              the best trial's model bundle
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from fpc_ray.bundle import BUNDLE_FILES, CARD_FILE, read_card
from fpc_ray.cluster import uses_external_cluster
from fpc_ray.config import Config
from fpc_ray.errors import UserError, failure_line
from fpc_ray.storage import Location, is_remote, resolve
from fpc_ray.tune.space import TuneSpec, apply_point

SPEC_FILE = "search.json"
EXPERIMENT = "tune"
TRIALS_DIR = "trials"
METRIC = "val_top1"


@dataclass
class SearchOutcome:
    rows: list[dict]
    best: dict | None
    default: dict | None
    leaderboard: list[str]


# ---------------------------------------------------------------- the space, as Tune sees it
def _encode(value: Any) -> Any:
    """Optuna's categorical values must be scalars: lists (MLP sizes) travel as JSON text."""
    return json.dumps(value) if isinstance(value, list | tuple | dict) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        return json.loads(value)
    return value


def _param_space(spec: TuneSpec) -> dict:
    from ray import tune

    space = {}
    for key, dim in spec.space.items():
        if dim.choice is not None:
            space[key] = tune.choice([_encode(c) for c in dim.choice])
        elif dim.uniform is not None:
            space[key] = tune.uniform(*dim.uniform)
        elif dim.loguniform is not None:
            space[key] = tune.loguniform(*dim.loguniform)
        else:
            space[key] = tune.randint(dim.integer[0], dim.integer[1] + 1)  # Tune's upper bound is exclusive
    return space


def trial_config(spec: TuneSpec, params: dict) -> Config:
    """The training config of a trial from Tune's (encoded) parameters."""
    return apply_point(spec.base, {k: _decode(params[k]) for k in spec.space})


# ---------------------------------------------------------------- one trial
def _report_callback(epochs: int):
    """Tune's TuneReportCallback, less the last epoch's report: Tune ends a trial at its last
    report (ASHA's ``max_t``), which would kill it before its bundle is written. The trial
    function sends that report itself once the bundle is there."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class HoldLastReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("epoch", 0) >= epochs:
                return
            super().after_report(run_context, metrics, checkpoint)

    return HoldLastReport()


def _trial(params: dict, spec_json: str, output_uri: str, data_uri: str | list[str], prepared=None) -> None:
    """Tune's function trainable: ``fpc-ray train`` for one point of the space."""
    from ray import tune

    from fpc_ray.train.driver import run_training

    spec = TuneSpec.model_validate_json(spec_json)
    cfg = trial_config(spec, params)
    trial_id = tune.get_context().get_trial_id()
    out = resolve(output_uri, spec.base.storage).join(TRIALS_DIR, trial_id)
    if out.join(CARD_FILE).exists():
        # Finished before the driver was interrupted: report its result, do not train again.
        card = read_card(out.uri, spec.base.storage)
        tune.report({**card["metrics"]["val"], "epoch": card["training"]["epochs"], "finished": True})
        return
    outcome = run_training(cfg, data_uri, out.uri, overwrite=True, prepared=prepared, run_name="run",
                           callbacks=[_report_callback(cfg.train.epochs)])
    tune.report({**outcome.history[-1], "finished": True})


# ---------------------------------------------------------------- the search
def _local_cpus_per_worker(spec: TuneSpec) -> float | None:
    """On a local cluster, the CPUs each trial worker gets so concurrent trials fill the machine."""
    import ray

    if uses_external_cluster():
        return None
    cpus = ray.cluster_resources().get("CPU", 1.0)
    per = cpus / (spec.search.max_concurrent * spec.search.workers_per_trial)
    if per < 0.5:
        raise UserError(f"search.max_concurrent x search.workers_per_trial = "
                        f"{spec.search.max_concurrent * spec.search.workers_per_trial} workers "
                        f"do not fit this machine's {cpus:g} CPUs")
    return math.floor(per * 4) / 4  # quarter CPUs: Ray accounts fractions, torch gets floor threads


def _progress(echo: Callable[[str], None], spec: TuneSpec):
    """One line per trial event, in place of Tune's tables (readable in a terminal and in logs)."""
    from ray.tune import Callback

    keys = list(spec.space)

    class Progress(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            point = ", ".join(f"{_short_name(k)}={_short_value(_decode(trial.config[k]))}" for k in keys)
            echo(f"trial {trial.trial_id} started: {point}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if METRIC in result:
                echo(f"trial {trial.trial_id} epoch {result.get('epoch', '?')}/{spec.base.train.epochs}: "
                     f"val_top1 {result[METRIC]:.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            how = "finished" if last.get("finished") else f"stopped early by ASHA after epoch {last.get('epoch', '?')}"
            echo(f"trial {trial.trial_id} {how}")

        def on_trial_error(self, iteration, trials, trial, **info):
            echo(f"trial {trial.trial_id} failed (see trials.parquet, column error)")

    return Progress()


def _short_name(key: str) -> str:
    """A space key's column name: its last part (``lr``), or the one before a bare ``type``
    (``model.attention.type`` is ``attention``)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "type" and len(parts) > 1 else parts[-1]


def _short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", "")


def _smallest_batch(spec: TuneSpec) -> int:
    """The smallest batch size a trial of the search may take."""
    dim = spec.space.get("train.batch_size")
    if dim is None:
        return spec.base.train.batch_size
    if dim.choice is not None:
        return int(min(dim.choice))
    return int((dim.integer or dim.uniform or dim.loguniform)[0])


def _tuner(spec: TuneSpec, data_uri: str | list[str], out: Location, resume: bool, echo: Callable[[str], None]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from fpc_ray.train.driver import prepare_data

    # Every dataset read and split once for all trials, and (but under stream) decoded once: the
    # trials share the arrays or the Ray Datasets' blocks (each trial checks its own batch size).
    prepared = prepare_data(spec.base, data_uri, batch_size=_smallest_batch(spec))
    trainable = tune.with_parameters(_trial, spec_json=spec.model_dump_json(), output_uri=out.uri,
                                     data_uri=data_uri, prepared=prepared)
    # The trial's own process only waits on its TorchTrainer, whose workers hold the CPUs and
    # GPUs; it asks for memory alone, since any CPU share would leave workers a fraction less
    # than whole cores (and Ray gives torch threads by whole CPUs).
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": 256 * 2**20})
    storage_path, storage_fs = (out.path, out.fs) if is_remote(out.uri) else (out.path, None)
    experiment = out.join(EXPERIMENT)
    if resume:
        # With an explicit filesystem Ray wants the path inside it (bucket/key), not the URI.
        return tune.Tuner.restore(experiment.path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_fs)
    default = spec.default_point() if spec.search.include_default else None
    searcher = OptunaSearch(seed=spec.search.seed,
                            points_to_evaluate=[{k: _encode(v) for k, v in default.items()}] if default else None)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=spec.base.train.epochs,
                              grace_period=min(spec.search.grace_period, spec.base.train.epochs),
                              reduction_factor=spec.search.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=_param_space(spec),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=spec.search.num_samples,
                                    search_alg=ConcurrencyLimiter(searcher, spec.search.max_concurrent),
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage_path, storage_filesystem=storage_fs,
                                  verbose=0, callbacks=[_progress(echo, spec)]),
    )


def _save_or_restore_spec(spec: TuneSpec, data_uri: str | list[str], out: Location,
                          resume: bool) -> tuple[TuneSpec, str | list[str]]:
    """Check OUTPUT against --resume; save or read back the spec."""
    saved = out.join(SPEC_FILE)
    if resume:
        if not saved.exists():
            raise UserError(f"--resume: no search to resume at {out.uri} (no {SPEC_FILE})")
        state = json.loads(saved.read_text())
        return TuneSpec.model_validate(state["spec"]), state["data"]
    if saved.exists():
        raise UserError(f"{out.uri} already holds a search; pass --resume to continue it or choose another --output")
    out.check_writable()
    saved.write_text(json.dumps({"spec": spec.model_dump(mode="json"), "data": data_uri}, indent=2))
    return spec, data_uri


def run_search(spec: TuneSpec, data_uri: str | list[str], output_uri: str, resume: bool = False,
               echo: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or resume) a search on one dataset or several (a list, joined as in training) and write
    trials, best.yaml, best/ and the leaderboard."""

    from fpc_ray.cluster import init_ray
    from fpc_ray.train.driver import check_workers_fit

    out = resolve(output_uri, spec.base.storage)
    spec, data_uri = _save_or_restore_spec(spec, data_uri, out, resume)
    init_ray()
    cpus = _local_cpus_per_worker(spec)
    if cpus is not None and not resume:
        spec.base.train.cpus_per_worker = cpus
    spec.base.train.num_workers = spec.search.workers_per_trial
    tc = spec.base.train
    check_workers_fit(tc.num_workers, tc.cpus_per_worker, tc.use_gpu, tc.gpus_per_worker)
    if resume:
        echo(f"resuming the search at {out.uri}")
    else:
        echo(f"search: {spec.search.num_samples} trials x {spec.base.train.epochs} epochs over "
             f"{', '.join(spec.space)}; {spec.search.max_concurrent} at a time, "
             f"{spec.search.workers_per_trial} worker(s) x {spec.base.train.cpus_per_worker:g} CPUs each")
    if spec.search.include_default and spec.default_point() is None:
        echo("note: the base configuration lies outside the space, so its score is not measured")

    grid = _tuner(spec, data_uri, out, resume, echo).fit()
    default_point = spec.default_point() or {}
    rows = [_trial_row(spec, result, out, default_point) for result in grid]
    rows.sort(key=lambda r: (r["best_val_top1"] is None, -(r["best_val_top1"] or 0), -(r["best_val_top2"] or 0)))
    _write_trials(out, rows)
    best = next((r for r in rows if r["status"] == "completed"), None)
    if best is not None:
        _write_best(spec, out, best)
    default = next((r for r in rows if r["is_default"]), None)
    return SearchOutcome(rows, best, default, _leaderboard(spec, rows, best, default))


# ---------------------------------------------------------------- results
def _trial_row(spec: TuneSpec, result, out: Location, default_point: dict) -> dict:
    from fpc_ray.data.fetal_planes import CLASS_NAMES
    from fpc_ray.model import build_model, count_parameters

    params = {k: _decode(result.config[k]) for k in spec.space}
    trial_id = os.path.basename(result.path.rstrip("/")).split("_")[1] if result.path else None
    trial_id = (result.metrics or {}).get("trial_id") or trial_id
    history = result.metrics_dataframe
    row: dict[str, Any] = {"trial_id": trial_id, "is_default": params == default_point}
    row.update({f"param.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in params.items()})
    try:
        model_cfg = trial_config(spec, result.config).model
        row["parameters"] = count_parameters(build_model(model_cfg, len(CLASS_NAMES), pretrained=False))["total"]
    except Exception:  # a point the config rejects: the trial errored on it too
        row["parameters"] = None
    bundle = out.join(TRIALS_DIR, trial_id) if trial_id else None
    if bundle is not None and bundle.join(CARD_FILE).exists():
        card = read_card(bundle.uri, spec.base.storage)
        row.update(status="completed", best_val_top1=card["metrics"]["val"]["val_top1"],
                   best_val_top2=card["metrics"]["val"]["val_top2"], epochs_run=card["training"]["epochs"],
                   bundle=bundle.uri, error=None)
        return row
    has_history = history is not None and METRIC in getattr(history, "columns", [])
    row.update(
        status="error" if result.error else "stopped",
        best_val_top1=float(history[METRIC].max()) if has_history else None,
        best_val_top2=float(history["val_top2"].max()) if has_history and "val_top2" in history else None,
        epochs_run=int(history["epoch"].max()) if has_history and "epoch" in history else 0,
        bundle=None,
        error=failure_line(result.error) if result.error else None,
    )
    return row


def _write_trials(out: Location, rows: list[dict]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    out.join("trials.parquet").write_bytes(buf.getvalue())


def _write_best(spec: TuneSpec, out: Location, best: dict) -> None:
    """best.yaml (the trial's training config, as ``fpc-ray train --config`` reads it) and best/."""
    bundle = resolve(best["bundle"], spec.base.storage)
    card = read_card(bundle.uri, spec.base.storage)
    cfg = Config.model_validate(card["config"])
    tree = cfg.model_dump(mode="json", exclude={"storage"} if cfg.storage == Config().storage else None)
    tree["train"].pop("init_from", None)
    header = (f"# fpc-ray tune: the best of {out.uri} (trial {best['trial_id']}, "
              f"val_top1 {best['best_val_top1']:.4f}).\n# Train it: fpc-ray train --config best.yaml "
              f"--data DATA --output BUNDLE\n")
    out.join("best.yaml").write_text(header + yaml.safe_dump(tree, sort_keys=False))
    target = out.join("best")
    target.makedirs()
    for name in BUNDLE_FILES:
        src = bundle.join(name)
        if src.exists():
            target.join(name).write_bytes(src.read_bytes())


def _leaderboard(spec: TuneSpec, rows: list[dict], best: dict | None, default: dict | None) -> list[str]:
    keys = list(spec.space)
    short = [_short_name(k) for k in keys]
    lines = [f"{'rank':>4}  {'trial':<10} {'status':<9} {'val_top1':>8} {'val_top2':>8} {'epochs':>6} "
             f"{'params':>9}  " + "  ".join(short)]
    for i, r in enumerate(rows, 1):
        vals = []
        for k in keys:
            v = r[f"param.{k}"]
            vals.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        top1 = f"{r['best_val_top1']:.4f}" if r["best_val_top1"] is not None else "-"
        top2 = f"{r['best_val_top2']:.4f}" if r["best_val_top2"] is not None else "-"
        params = f"{r['parameters']:,}" if r["parameters"] else "-"
        mark = " (default)" if r["is_default"] else ""
        lines.append(f"{i:>4}  {str(r['trial_id'])[:10]:<10} {r['status']:<9} {top1:>8} {top2:>8} "
                     f"{r['epochs_run']:>6} {params:>9}  " + "  ".join(vals) + mark)
    if best and default and default["best_val_top1"] is not None:
        gain = best["best_val_top1"] - default["best_val_top1"]
        lines.append(f"best val_top1 {best['best_val_top1']:.4f} vs the default configuration's "
                     f"{default['best_val_top1']:.4f}: {gain:+.4f}")
    elif best:
        lines.append(f"best val_top1 {best['best_val_top1']:.4f} (the default configuration was not run)")
    else:
        lines.append("no trial ran to the end: no best configuration")
    return lines
