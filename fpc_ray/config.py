"""The configuration tree: one pydantic model per section, loaded from YAML plus overrides.

Every command resolves a :class:`Config` once, then hands plain dicts (``cfg.model_dump()``) to
Ray workers, which rebuild it with :meth:`Config.model_validate`. Nothing downstream reads
environment variables except the standard AWS ones (see :mod:`fpc_ray.storage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fpc_ray.errors import UserError, shorten

AttentionType = Literal["none", "se", "eca", "cbam", "mhsa"]
Activation = Literal["relu", "gelu", "silu"]
# How `fpc-ray label` draws each frame's class activation map (fpc_ray.label.cam computes them).
CamMethod = Literal["gradcam", "gradcam++", "eigencam", "none"]
CAM_METHODS: tuple[str, ...] = CamMethod.__args__


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AttentionConfig(StrictModel):
    """The attention block that refines the backbone's last feature map."""

    type: AttentionType = "cbam"
    reduction: int = Field(16, ge=1, le=256, description="channel reduction of se / cbam")
    heads: int = Field(4, ge=1, le=32, description="heads of mhsa")
    dim: int = Field(256, ge=8, le=2048, description="token width of mhsa")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> AttentionConfig:
        if self.type == "mhsa" and self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class HeadConfig(StrictModel):
    """The 3-layer MLP classifier head: two hidden layers, then the class logits."""

    hidden: tuple[int, int] = (512, 256)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    activation: Activation = "gelu"

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError("hidden sizes must be positive")
        return v


class ModelConfig(StrictModel):
    """Backbone, attention and head; ``pretrained`` says where backbone weights come from."""

    backbone: str = "tf_efficientnet_lite0"
    pretrained: str = Field(
        "lite0-in1k",
        description="none | hub | lite0-in1k | path or s3:// URI of a .safetensors file",
    )
    attention: AttentionConfig = AttentionConfig()
    head: HeadConfig = HeadConfig()
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the head")

    @model_validator(mode="after")
    def _pretrained_fits_backbone(self) -> ModelConfig:
        if self.pretrained == "lite0-in1k" and self.backbone != "tf_efficientnet_lite0":
            raise ValueError(
                f"pretrained 'lite0-in1k' only fits backbone 'tf_efficientnet_lite0', "
                f"not '{self.backbone}'"
            )
        return self


class AugmentConfig(StrictModel):
    """Training augmentation; every probability 0 turns that transform off."""

    rotate_limit: float = Field(10.0, ge=0, le=45, description="degrees")
    scale_limit: float = Field(0.1, ge=0, le=0.5)
    shift_limit: float = Field(0.05, ge=0, le=0.3)
    hflip_p: float = Field(0.5, ge=0, le=1)
    brightness_contrast_p: float = Field(0.5, ge=0, le=1)
    gamma_p: float = Field(0.3, ge=0, le=1)
    noise_p: float = Field(0.3, ge=0, le=1)
    blur_p: float = Field(0.2, ge=0, le=1)


class DataConfig(StrictModel):
    """Where images come from and how they become tensors."""

    image_size: int = Field(224, ge=32, le=1024)
    val_fraction: float = Field(0.15, gt=0, lt=0.9, description="of train patients")
    split_seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    loader_workers: int = Field(0, ge=0, le=32, description="torch DataLoader processes")
    decode_threads: int = Field(4, ge=1, le=64, description="threads of each Ray Data task that decodes images")
    cache: Literal["auto", "arrays", "memory", "stream"] = Field(
        "auto", description="arrays: decoded once on the driver, shared as arrays; memory: decoded once by Ray "
                            "Data tasks into the object store; stream: decoded every epoch by Ray Data, bounded "
                            "memory; auto: arrays up to 1 GB decoded, else memory within half the object store, "
                            "else stream (fpc_ray.data.ingest.choose_ingest)",
    )
    augment_on: Literal["auto", "cpu", "device"] = Field(
        "auto", description="cpu: albumentations per image; device: batched torch on the training device; "
                            "auto: device on CUDA, else cpu",
    )


class TrainConfig(StrictModel):
    """The recipe: frozen warm-up, AdamW + cosine, label smoothing, class balance."""

    epochs: int = Field(20, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=4096, description="per worker")
    lr: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0, le=1)
    warmup_epochs: float = Field(0.5, ge=0, description="linear learning-rate warm-up")
    frozen_epochs: int = Field(1, ge=0, description="epochs with the backbone frozen")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    class_balance: Literal["loss", "none"] = "loss"
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables")
    seed: int = 0
    num_workers: int = Field(0, ge=0, le=1024, description="Ray Train workers; 0 = in-process")
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    use_gpu: bool = False
    gpus_per_worker: float = Field(1.0, gt=0, le=64, description="a fraction lets workers share a GPU")
    compile: bool = Field(False, description="torch.compile the model for training steps")
    amp: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    max_failures: int = Field(2, ge=0, description="worker-group restarts from checkpoint")
    keep_checkpoints: int = Field(2, ge=1)
    init_from: str | None = Field(None, description="bundle to continue from (retraining)")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus_above_one(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"{v:g}: Ray shares a GPU only in fractions of one; above 1 give whole GPUs")
        return v

    @model_validator(mode="after")
    def _frozen_within_epochs(self) -> TrainConfig:
        if self.frozen_epochs >= self.epochs and self.epochs > 1:
            raise ValueError(
                f"frozen_epochs ({self.frozen_epochs}) must be below epochs ({self.epochs})"
            )
        return self


class StorageConfig(StrictModel):
    """S3 endpoint settings. Credentials never live here: they come from the AWS chain."""

    endpoint_url: str | None = Field(
        None, description="default: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then AWS"
    )
    region: str | None = Field(None, description="default: AWS_REGION / AWS_DEFAULT_REGION")


class DriftConfig(StrictModel):
    """When ``fpc-ray drift`` (and the trends page) call a labelling run's change a warning or an
    alert, against the runs before it (see the README's "Drift and trends")."""

    psi_warn: float = Field(0.1, gt=0, description="population stability index: a warning from here")
    psi_alert: float = Field(0.25, gt=0, description="population stability index: an alert from here")
    chi2_p_alert: float = Field(0.001, gt=0, lt=1, description="class-mix chi-square p-value below "
                                "which (with PSI at least psi_warn) a run is an alert")
    chi2_min_frames: int = Field(100, ge=1, description="fewer labelled frames: no chi-square test")
    min_frames: int = Field(200, ge=1, description="fewer labelled frames in a run or its reference: level "
                            "'too few frames', never warn or alert (PSI's sampling noise on small runs)")
    error_rate_alert: float = Field(0.2, gt=0, le=1, description="an error rate this much above the "
                                    "reference's (absolute, and significant at chi2_p_alert) is an alert")
    low_confidence: float = Field(0.5, gt=0, le=1, description="top-1 confidence below this is low")
    reference_window: int = Field(5, ge=1, le=1000, description="runs before each run that make its reference")

    @model_validator(mode="after")
    def _warn_below_alert(self) -> DriftConfig:
        if self.psi_warn > self.psi_alert:
            raise ValueError(f"psi_warn ({self.psi_warn}) must not exceed psi_alert ({self.psi_alert})")
        return self


class Config(StrictModel):
    """The root of every fpc-ray configuration."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    storage: StorageConfig = StorageConfig()
    drift: DriftConfig = DriftConfig()


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, ``field.path: message``, the way users read them."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {shorten(msg, 200)}")
    return "; ".join(lines)


# Limits on what a config's YAML may hold (the idea of fpc_ray.files' JSON limits). Python's own
# limits give tracebacks instead: a RecursionError from nested brackets, a ValueError from an
# integer past 4,300 digits; aliases can expand a few lines into billions of values.
MAX_CONFIG_BYTES = 2**20  # the configs we ship are a few hundred bytes
MAX_YAML_DEPTH = 32       # the config tree nests 4 levels, a search space 5
MAX_INT_DIGITS = 64       # a seed or a size fits in 20
MAX_YAML_VALUES = 100_000  # values after aliases are expanded; a config holds about a hundred
MAX_BASE_CHAIN = 16       # files overlaid through ``base:``


class _Limit(yaml.MarkedYAMLError):
    """A YAML document past one of the limits above."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a nesting limit (checked while composing, before Python's
    recursion limit is reached) and an integer-digit limit."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def fetch_flow_collection_start(self, TokenClass):  # noqa: N803 - PyYAML's name
        # Brackets are refused as the scanner meets them: it would otherwise look a thousand
        # brackets ahead (a second of work) before the composer saw the first one too many.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _Limit(problem=f"nested deeper than {MAX_YAML_DEPTH} levels", problem_mark=self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Limit(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                             problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        digits = len(str(node.value).lstrip("+-").replace("_", ""))
        if digits > MAX_INT_DIGITS:
            raise _Limit(problem=f"an integer of {digits} digits (at most {MAX_INT_DIGITS})",
                         problem_mark=node.start_mark)
        return super().construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)


def _shown(value: Any) -> str:
    return shorten(repr(value), 80)


def _check_tree(value: Any, where: str) -> None:
    """Refuse keys that are not strings and documents that aliases expand past MAX_YAML_VALUES.

    Iterative and stopping at the limit: an alias shares its target, so walking the expansion of a
    "billion laughs" document would never end.
    """
    stack, seen = [(value, "")], 0
    while stack:
        node, path = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise UserError(f"{where}: more than {MAX_YAML_VALUES} values once its aliases are expanded; "
                            "not a config")
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    under = f" under {path}" if path else ""
                    raise UserError(f"{where}: key {_shown(key)}{under} is not text; quote it")
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(node, list):
            stack.extend((child, path) for child in node)


def parse_yaml(text: str, where: str) -> Any:
    """The YAML document in ``text``, parsed with the limits above.

    Raises:
        UserError: ``where: ...`` in one line for text that is not YAML, nests too deeply, holds
            a too long integer, a key that is not a string, or expands past the value limit.
    """
    try:
        value = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader with limits
    except _Limit as e:
        raise UserError(f"{where}: {_yaml_problem(e)}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where}: not valid YAML ({shorten(_yaml_problem(e), 200)})") from None
    except (RecursionError, MemoryError):  # a merge-key (<<) chain thousands long
        raise UserError(f"{where}: YAML nested too deeply to be a config") from None
    _check_tree(value, where)
    return value


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is parsed as YAML so ``1e-3``, ``true``, ``[1,2]`` work."""
    key, sep, raw = item.partition("=")
    where = f"--set {_shown(item)}"
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise UserError(f"{where}: expected key.path=value")
    if len(keys) > MAX_YAML_DEPTH:
        raise UserError(f"{where}: a key path of {len(keys)} parts (at most {MAX_YAML_DEPTH})")
    value = parse_yaml(raw, where) if raw.strip() else None
    return [k.strip() for k in keys], value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node, walked = tree, []
    for part in path[:-1]:
        walked.append(part)
        child = node.setdefault(part, {})
        if not isinstance(child, dict):  # `train: 5` in a config file, or --set train=5 before
            raise UserError(f"{'.'.join(walked)}: expected a section of settings, found {_shown(child)} "
                            f"(setting {'.'.join(path)})")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error, several lines with a caret drawing, as one: the problem and where."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    context = getattr(error, "context", None)  # "expected a single document in the stream"
    problem = f"{context}: {problem}" if context and not isinstance(error, _Limit) else problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_text(path: Path) -> str:
    """The config file's text: a file, at most MAX_CONFIG_BYTES, UTF-8."""
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read the config file ({e.strerror or type(e).__name__})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_yaml(path: str | Path, _overlaid: tuple[Path, ...] = ()) -> dict:
    """Read a YAML mapping; ``base:`` names another file (relative to this one) to overlay.

    Raises:
        UserError: one line naming the file: missing, unreadable, too large, not YAML, past a
            limit of :func:`parse_yaml`, not a mapping, or a ``base:`` that is not a file name,
            loops back or chains more than MAX_BASE_CHAIN files.
    """
    path = Path(path)
    data = parse_yaml(_read_text(path), str(path)) or {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise UserError(f"{path}: base: expected the name of another config file, found {_shown(base)}")
    target = path.parent / base
    if not target.is_file():  # also a name holding a NUL byte, which no file has
        what = "a directory, not a config file" if target.is_dir() else "no such config file"
        raise UserError(f"{path}: base: {shorten(repr(str(target)), 400)}: {what}")
    chain = (*_overlaid, path.resolve())
    if target.resolve() in chain:
        raise UserError(f"{path}: base: {base} loops back to {target} (a file cannot overlay itself)")
    if len(chain) >= MAX_BASE_CHAIN:
        raise UserError(f"{path}: base: more than {MAX_BASE_CHAIN} files overlaid on one another")
    return _deep_merge(read_yaml(target, chain), data)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Build the config: defaults < YAML file < ``values`` (CLI flags) < ``--set`` overrides.

    Args:
        path: a YAML file, optionally overlaying another through ``base:``.
        overrides: ``key.path=value`` strings from ``--set``.
        values: dotted keys from typed CLI flags, e.g. ``{"train.epochs": 4}``; None values are
            skipped so that unset flags leave the file's values alone.

    Raises:
        UserError: on a missing file, bad YAML or any validation error (one line).
    """
    tree: dict = read_yaml(path) if path else {}
    for dotted, value in (values or {}).items():
        if value is not None:
            _set_path(tree, dotted.split("."), value)
    for item in overrides or []:
        keys, value = parse_override(item)
        _set_path(tree, keys, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
