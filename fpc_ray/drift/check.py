"""``fpc-ray drift`` and the nightly job's ``--drift``: one check, the same everywhere."""

from __future__ import annotations

from dataclasses import dataclass

from fpc_ray.config import DriftConfig, StorageConfig
from fpc_ray.drift.assess import ALERT, Assessment, alert_line, assess
from fpc_ray.drift.history import open_history
from fpc_ray.errors import UserError

EXIT_DRIFT = 3  # the CLI's exit code for "the newest run drifted" (1 and 2 are failures)


@dataclass
class DriftCheck:
    prefix: str
    assessments: list[Assessment]

    @property
    def newest(self) -> Assessment:
        return self.assessments[-1]

    @property
    def drifted(self) -> bool:
        """Whether the newest run is at the alert level."""
        return self.newest.level == ALERT

    def line(self) -> str:
        """One line on the newest run: what moved, or that nothing did."""
        return alert_line(self.newest)


def check_drift(prefix: str, cfg: DriftConfig, storage: StorageConfig | None = None,
                reference: str | None = None, window: int | None = None) -> DriftCheck:
    """Every committed run under ``prefix`` against its reference: a fixed ``reference`` run,
    or the ``window`` (default ``cfg.reference_window``) runs before it."""
    if reference is not None and window is not None:
        raise UserError("--reference and --reference-window: give one of them")
    history = open_history(prefix, storage or StorageConfig(), cfg.low_confidence)
    return DriftCheck(prefix, assess(history, cfg, reference, window))
