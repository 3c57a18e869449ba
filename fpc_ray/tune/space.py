"""The search: a YAML file with a training config, a ``search:`` section and a ``space:``.

``space`` maps dotted training-config keys to one distribution each::

    space:
      model.attention.type: {choice: [none, se, eca, cbam, mhsa]}
      model.head.hidden: {choice: [[512, 256], [256, 128]]}
      train.lr: {loguniform: [1.0e-4, 5.0e-3]}
      model.head.dropout: {uniform: [0.0, 0.5]}
      model.attention.reduction: {int: [4, 32]}

Every key must name a training-config field and every value the space can produce must pass
that field's own validation, so a bad space fails before the first trial, with the field's name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, model_validator

from fpc_ray.config import Config, StrictModel, _set_path, format_validation_error, read_yaml
from fpc_ray.errors import UserError

# Decoded once per search and shared by every trial, so a search cannot vary them.
FIXED_PER_SEARCH = ("data.image_size", "data.val_fraction", "data.split_seed", "data.decode_threads", "data.cache")


class Dimension(StrictModel):
    """One searched key: exactly one of the four kinds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int", description="inclusive bounds")

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        kinds = [k for k in ("choice", "uniform", "loguniform", "integer") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int")
        bounds = self.uniform or self.loguniform or self.integer
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"the lower bound must be below the upper ({bounds[0]} >= {bounds[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("choice", "uniform", "loguniform", "integer") if getattr(self, k) is not None)

    def extremes(self) -> list[Any]:
        """The values that must each pass the field's validation."""
        if self.choice is not None:
            return list(self.choice)
        return list(getattr(self, self.kind))

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return any(_same(value, c) for c in self.choice)
        lo, hi = getattr(self, self.kind)
        return isinstance(value, int | float) and lo <= value <= hi


class SearchConfig(StrictModel):
    """How the search runs: Optuna's TPE proposes, ASHA stops the weak trials early."""

    num_samples: int = Field(16, ge=1, le=10000, description="trials, the default configuration included")
    max_concurrent: int = Field(1, ge=1, le=1024, description="trials running at once")
    workers_per_trial: int = Field(1, ge=1, le=1024, description="Ray Train workers of each trial")
    grace_period: int = Field(2, ge=1, description="ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the top 1/reduction_factor at each rung")
    seed: int = 0
    include_default: bool = Field(True, description="run the base configuration as the first trial")


# The built-in space (configs/tune.yaml writes it out; a test keeps the two equal).
DEFAULT_SPACE: dict[str, dict] = {
    "model.attention.type": {"choice": ["none", "se", "eca", "cbam", "mhsa"]},
    "model.attention.reduction": {"choice": [4, 8, 16]},
    "model.attention.heads": {"choice": [2, 4, 8]},
    "model.head.hidden": {"choice": [[512, 256], [256, 128], [1024, 256], [256, 64]]},
    "model.head.dropout": {"uniform": [0.0, 0.5]},
    "model.head.activation": {"choice": ["relu", "gelu", "silu"]},
    "train.lr": {"loguniform": [3.0e-4, 6.0e-3]},
    "train.weight_decay": {"loguniform": [1.0e-3, 0.2]},
    "train.warmup_epochs": {"uniform": [0.0, 1.0]},
    "train.label_smoothing": {"uniform": [0.0, 0.2]},
    "train.batch_size": {"choice": [16, 32]},
}


class TuneSpec(StrictModel):
    """A whole search: the base training config, how to search, and what."""

    base: Config
    search: SearchConfig = SearchConfig()
    space: dict[str, Dimension] = Field(min_length=1)

    def default_point(self) -> dict[str, Any] | None:
        """The base config's value of every searched key, or None where one lies outside the space."""
        dumped = self.base.model_dump(mode="json")
        point = {key: _get_path(dumped, key) for key in self.space}
        if all(dim.contains(point[key]) for key, dim in self.space.items()):
            return point
        return None


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a) == json.dumps(b)


def _get_path(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _is_field(dotted: str) -> bool:
    """Whether a dotted key names a leaf field of :class:`Config`."""
    model: Any = Config
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        model = fields[part].annotation
    return getattr(model, "model_fields", None) is None


def apply_point(base: Config, point: dict[str, Any]) -> Config:
    """The base config with a trial's values set (raises pydantic's ValidationError)."""
    tree = base.model_dump(mode="json")
    for dotted, value in point.items():
        _set_path(tree, dotted.split("."), value)
    return Config.model_validate(tree)


def _check_space(base: Config, space: dict[str, Dimension]) -> None:
    for key, dim in space.items():
        if not _is_field(key):
            raise UserError(f"space.{key}: not a training-config field (e.g. model.attention.type, train.lr)")
        if key in FIXED_PER_SEARCH:
            raise UserError(f"space.{key}: fixed for a whole search (the data are decoded once); set it in the base")
        for value in dim.extremes():
            try:
                apply_point(base, {key: value})
            except ValidationError as e:
                raise UserError(f"space.{key}: {value!r} is not a valid value: "
                                f"{format_validation_error(e)}") from None


def load_tune_spec(path: str | Path | None, values: dict[str, Any] | None = None) -> TuneSpec:
    """Read a search YAML (None: the built-in search); ``values`` are dotted overrides from CLI
    flags (None = unset).

    Keys under ``search.`` go to the search, all others to the base training config.
    """
    tree = read_yaml(path) if path is not None else {"space": DEFAULT_SPACE}
    search, space = tree.pop("search", None) or {}, tree.pop("space", None)
    if not isinstance(search, dict):
        raise UserError(f"{path}: search: expected a mapping")
    if not isinstance(space, dict) or not space:
        raise UserError(f"{path}: space: expected a mapping of config keys to distributions")
    for dotted, value in (values or {}).items():
        if value is not None:
            target, key = (search, dotted.removeprefix("search.")) if dotted.startswith("search.") else (tree, dotted)
            _set_path(target, key.split("."), value)
    try:
        spec = TuneSpec.model_validate({"base": tree, "search": search, "space": space})
    except ValidationError as e:
        # "base.train.lr: ..." reads as the training key it is
        raise UserError(re.sub(r"(^|; )base\.", r"\1", format_validation_error(e))) from None
    _check_space(spec.base, spec.space)
    return spec
