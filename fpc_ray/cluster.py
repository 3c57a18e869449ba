"""Connecting to Ray: the cluster in ``RAY_ADDRESS``, or a local one tuned for a laptop.

Every command that runs on Ray (train, tune, label and the benchmarks) starts here. It imports
nothing heavy: a ``label`` driver never needs torch.
"""

from __future__ import annotations

import json
import os

from fpc_ray.errors import UserError

# albumentations asks PyPI for its latest version when it is imported: a network call (and a
# warning) in every process that imports it, which hangs or fails where there is no internet.
# fpc-ray pins its version instead, so each process it starts is told not to ask: the CLI and the
# job drivers (skip_update_checks) and the Ray workers (init_ray's runtime environment).
NO_UPDATE_CHECKS = {"NO_ALBUMENTATIONS_UPDATE": "1"}


def skip_update_checks() -> None:
    """Tell this process's imports not to ask the internet for newer versions; called where an
    fpc-ray process starts (the CLI, the job entrypoints), before anything imports albumentations.
    A value already set is kept."""
    for key, value in NO_UPDATE_CHECKS.items():
        os.environ.setdefault(key, value)


def uses_external_cluster() -> bool:
    """Whether Ray commands join a cluster named by ``RAY_ADDRESS`` (which may autoscale, so the
    local machine's resources say nothing about it) rather than start a local one."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a quiet local one (with ``num_cpus``
    CPUs, default the machine's)."""
    import ray

    if ray.is_initialized():
        return
    # The dashboard stays on: Ray Train's placement-group cleaner asks the state API it serves.
    kwargs: dict = {"log_to_driver": True, "logging_level": "WARNING"}
    env_vars = {k: v for k, v in NO_UPDATE_CHECKS.items() if k not in _job_env_vars()}
    if not uses_external_cluster():
        # A new cluster of our own: without "local", ray.init joins a cluster that `ray start` left
        # running on this machine, which refuses the settings below (and is not what the user named).
        kwargs["address"] = "local"
        # Ray runs workers at nice 15 so its daemons stay responsive; on a laptop-sized local
        # cluster that makes torch's threads stall behind every idle daemon tick (measured:
        # -10..30 % training throughput on 2 cores). A cluster's nodes keep Ray's default.
        kwargs["_system_config"] = {"worker_niceness": 0}
        if num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        # Ray Train's placement-group cleaner finds the dashboard by scanning the machine for Ray
        # clusters; with a second local cluster on the machine (another fpc-ray command, a test)
        # that scan fails, the cleaner never frees a finished run's CPUs and the next run (a Tune
        # trial) waits forever. Pinning the dashboard port and telling this job's workers where it
        # is avoids the scan. The driver's own environment is left alone.
        port = _free_port()
        kwargs.update(include_dashboard=True, dashboard_port=port)
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    try:
        ray.init(**kwargs)
    except Exception as e:
        if "dashboard with missing packages" in str(e):  # Ray installed without its [default] extra
            raise UserError("a local Ray cluster needs Ray's dashboard packages: pip install 'ray[default]==2.60.*' "
                            "(or start one with `ray start --head` and set RAY_ADDRESS)") from None
        raise


def _job_env_vars() -> dict:
    """The environment variables the runtime environment of the Ray job this driver runs in sets
    (``ray job submit --runtime-env-json``): ray.init refuses to be given one of them again."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return (job.get("runtime_env") or {}).get("env_vars") or {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
