"""A small phantom dataset and a bundle trained on it in-process, for tests that need a model."""

from __future__ import annotations

from pathlib import Path

from fpc_ray.config import load_config
from fpc_ray.data.synth import synthesize
from fpc_ray.train.driver import run_training


def phantom_bundle(root: Path, *, seed: int, epochs: int, per_class: int = 10) -> None:
    """Write ``root/data`` (128x96 phantoms) and train a 64-px bundle into ``root/bundle``."""
    synthesize(str(root / "data"), per_class=per_class, seed=seed, width=128, height=96)
    cfg = load_config(None, ["data.image_size=64", f"train.epochs={epochs}", "train.num_workers=0"])
    run_training(cfg, str(root / "data"), str(root / "bundle"))
