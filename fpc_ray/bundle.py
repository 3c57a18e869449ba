"""The model bundle: a folder (local or S3) holding a model and its machine-readable card.

``model.safetensors``  the classifier's state dict
``model.json``         the model card: versions, architecture, input/output contract, classes,
                       parameter counts, resolved config, data fingerprints, val/test metrics,
                       calibration (the temperature every softmax divides the logits by)
``metrics.json``       the per-epoch training history

:func:`build_card` assembles model cards and :func:`save_bundle` writes a bundle (the retraining
loop later adds its promotion record to the card); :func:`load_bundle` is the one reader.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fpc_ray import __version__
from fpc_ray.config import Config, StorageConfig
from fpc_ray.errors import ConcurrentChange, UserError
from fpc_ray.files import parse_json, read_bounded, read_json, temporary_name, validated, write_atomic
from fpc_ray.storage import Location, is_remote, resolve

# torch is imported where weights are read or written: a `label` driver, which only reads cards
# and pointers, starts a second sooner without it.
if TYPE_CHECKING:
    import torch

BUNDLE_FORMAT = "fpc-ray-bundle/1"
POINTER_FORMAT = "fpc-ray-pointer/1"  # models/production.json: which bundle is in production
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
HISTORY_FILE = "metrics.json"
BUNDLE_FILES = (WEIGHTS_FILE, CARD_FILE, HISTORY_FILE)  # what a copy of a bundle must carry


def library_versions() -> dict[str, str]:
    """Versions of everything that shapes the model's numbers."""
    import ray
    import timm
    import torch

    return {"fpc_ray": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "ray": ray.__version__, "python": platform.python_version()}


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (contiguous CPU copies)."""
    from safetensors.torch import save as st_save

    return st_save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})


def input_contract(cfg: Config) -> dict:
    """How to turn an image into the model's input: what labelling and evaluation replay."""
    from fpc_ray.model import normalization

    mean, std = normalization(cfg.model.backbone)
    return {
        "size": cfg.data.image_size,
        "layout": "NCHW",
        "dtype": "float32",
        "channels": 3,
        "color": "grayscale (ITU-R 601 luma for colour input) replicated to 3 channels",
        "resize": "letterbox: long side to size (area interpolation), centred, black padding",
        "value_range": "uint8 scaled by 1/255, then (x - mean) / std",
        "mean": list(mean),
        "std": list(std),
    }


def make_version(weights: bytes, created_at: dt.datetime) -> str:
    """A sortable, content-addressed version: UTC timestamp plus the weights' hash prefix."""
    return created_at.strftime("%Y%m%dT%H%M%SZ") + "-" + hashlib.sha256(weights).hexdigest()[:8]


def build_card(cfg: Config, class_names: list[str], params: dict[str, int], weights: bytes,
               **sections) -> dict:
    """Assemble the model card; ``sections`` add data, metrics, training, lineage, ..."""
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    card = {
        "format": BUNDLE_FORMAT,
        "name": "fpc-ray fetal plane classifier",
        "version": make_version(weights, created),
        "created_at": created.isoformat(),
        "versions": library_versions(),
        "architecture": {
            "backbone": cfg.model.backbone,
            "attention": cfg.model.attention.model_dump(),
            "head": cfg.model.head.model_dump(),
            "pretrained": cfg.model.pretrained,
            "cam_target_layer": "attention",
        },
        "parameters": params,
        "input": input_contract(cfg),
        "output": {"type": "logits", "shape": ["N", len(class_names)],
                   "softmax": "over classes, of logits / calibration.temperature (1.0 without calibration)"},
        "class_names": list(class_names),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "config": cfg.model_dump(mode="json"),
    }
    card.update(sections)
    return card


def save_bundle(out: Location, weights: bytes, card: dict, history: list[dict]) -> None:
    """Write the three files so that no reader ever pairs new weights with an old card.

    An old card goes first (``train --overwrite``) and the new card last: a write cut short in
    between leaves a folder without a card, which every reader refuses as "not a model bundle",
    rather than new weights beside the old card. :func:`load_bundle` checks the pair anyway.
    """
    out.makedirs()
    old_card = out.join(CARD_FILE)
    if old_card.exists():
        old_card.delete()
    out.join(WEIGHTS_FILE).write_bytes(weights)
    write_atomic(out.join(HISTORY_FILE), json.dumps(history, indent=2).encode())
    write_atomic(out.join(CARD_FILE), json.dumps(card, indent=2).encode())


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode, its card and its resolved config."""

    model: torch.nn.Module
    card: dict
    config: Config
    location: Location

    @property
    def class_names(self) -> list[str]:
        return self.card["class_names"]

    @property
    def version(self) -> str:
        return self.card["version"]

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax: the card's calibration, or 1.0 for a
        bundle from before calibration (its probabilities stay exactly what they were)."""
        return card_temperature(self.card)


def card_temperature(card: dict) -> float:
    """A card's calibration temperature; 1.0 where it has none."""
    calibration = card.get("calibration") or {}
    return float(calibration.get("temperature", 1.0))


class Pointer(BaseModel):
    """What every reader of a promotion pointer relies on: its format and a bundle URI."""

    model_config = ConfigDict(extra="allow", strict=True)

    format: str
    bundle: Annotated[str, Field(min_length=1)]


def _pointer(value, uri: str, where: str) -> dict:
    """A parsed pointer, checked: its format first (a JSON file that is no pointer at all is named
    so), then its fields."""
    if not isinstance(value, dict) or value.get("format") != POINTER_FORMAT or "bundle" not in value:
        raise UserError(f"{uri}: not an fpc-ray model pointer (format {POINTER_FORMAT})")
    validated(value, Pointer, where, "model pointer")
    return value


def follow_pointer(uri: str, storage: StorageConfig | None = None) -> str:
    """The bundle a promotion pointer (e.g. ``models/production.json``) names; a bundle URI as is."""
    if not str(uri).rstrip("/").endswith(".json"):
        return uri
    loc = resolve(uri, storage)
    if not loc.exists():
        raise UserError(f"{uri}: no such model pointer")
    return _pointer(read_json(loc, "model pointer"), uri, loc.uri)["bundle"]


def read_pointer(uri: str, storage: StorageConfig | None = None) -> dict | None:
    """A pointer's whole record, or None where there is none yet."""
    return read_pointer_state(uri, storage).record


@dataclass(frozen=True)
class PointerState:
    """A pointer as read, with what identifies that version of it (the S3 ETag; locally the
    SHA-256 of its bytes): :func:`write_pointer` rewrites it only if it is still that version.
    ``record`` and ``token`` are None where there was no pointer."""

    record: dict | None
    token: str | None


def read_pointer_state(uri: str, storage: StorageConfig | None = None) -> PointerState:
    """Read a pointer and its version in one go (one GET on S3, so the two always agree)."""
    loc = resolve(uri, storage)
    if is_remote(loc.uri):
        from fpc_ray.conditional import get_with_etag

        got = get_with_etag(loc, storage)
        if got is None:
            return PointerState(None, None)
        body, token = got
    else:
        if not loc.exists():
            return PointerState(None, None)
        body = read_bounded(loc, "model pointer")
        token = hashlib.sha256(body).hexdigest()
    # Validated from the bytes read, not by a second read that could see a newer pointer.
    record = _pointer(parse_json(body, loc.uri, "model pointer"), uri, loc.uri)
    return PointerState(record, token)


def _moved(uri: str) -> ConcurrentChange:
    return ConcurrentChange(f"{uri}: the pointer moved since it was read (a concurrent retrain or a manual "
                            "rollback); not rewritten")


def write_pointer(uri: str, record: dict, storage: StorageConfig | None = None,
                  expected: PointerState | None = None) -> None:
    """Point ``uri`` at a bundle, atomically: readers see the old pointer or the new, never half.

    With ``expected`` (what :func:`read_pointer_state` returned earlier) the rewrite is a
    compare-and-swap: on S3 a PUT with ``If-Match`` on the ETag read (``If-None-Match: *`` where
    there was no pointer); locally the comparison and the rename happen under an ``flock`` on
    ``<pointer>.lock``. Without it, locally a temporary file is renamed over the pointer; on S3 a
    single PUT is atomic already.

    Raises:
        ConcurrentChange: the pointer is no longer the version in ``expected``.
    """
    loc = resolve(uri, storage)
    body = json.dumps({"format": POINTER_FORMAT, **record}, indent=2)
    if is_remote(loc.uri):
        if expected is None:
            loc.write_text(body)
            return
        from fpc_ray.conditional import PreconditionFailed, put_if_absent, put_if_match

        try:
            if expected.token is None:
                put_if_absent(loc, body.encode(), storage)
            else:
                put_if_match(loc, body.encode(), expected.token, storage)
        except PreconditionFailed:
            raise _moved(uri) from None
        return
    if expected is None:
        write_atomic(loc, body.encode())
        return
    import fcntl

    # The temporary is named for this writer alone (pid, thread, random): writers sharing a pid
    # (threads; containers that are each PID 1 on one volume) never rename one another's.
    tmp = temporary_name(loc.path)
    resolve(tmp, storage).write_text(body)
    try:
        with open(f"{loc.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if read_pointer_state(uri, storage).token != expected.token:
                raise _moved(uri)
            os.replace(tmp, loc.path)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed into place: nothing left to remove
            os.unlink(tmp)


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _card_problem(card: dict) -> str | None:
    """What is wrong with the fields every reader of a card relies on, or None."""
    names, contract = card.get("class_names"), card.get("input")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "class_names: not a list of class names"
    if not isinstance(contract, dict):
        return "input: not an object"
    size = contract.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return f"input.size {size!r}: not a positive integer"
    if not isinstance(card.get("version"), str):
        return "version: not a string"
    calibration = card.get("calibration") or {}
    temperature = calibration.get("temperature", 1.0) if isinstance(calibration, dict) else None
    if not _is_number(temperature) or not 0 < temperature < float("inf"):
        return f"calibration.temperature {temperature!r}: not a positive number"
    return None


def _model_problem(card: dict) -> str | None:
    """What is wrong with the fields that running the model needs besides those (its input's
    normalisation, the config it was built from), or None."""
    for key in ("mean", "std"):
        values = card["input"].get(key)
        if not (isinstance(values, list) and len(values) == 3 and all(_is_number(v) for v in values)):
            return f"input.{key}: not three numbers"
    try:
        Config.model_validate(card.get("config"))
    except ValidationError as e:
        first = e.errors()[0]
        return f"config.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    return None


def _damaged_card(uri: str, problem: str) -> UserError:
    return UserError(f"{uri}: damaged model card ({problem}); copy or train the bundle again")


def read_card(uri: str, storage: StorageConfig | None = None) -> dict:
    """Just the card of a bundle (or of the bundle a pointer names), its fields checked: a damaged
    card is one line here, not a KeyError in a labelling actor later."""
    uri = follow_pointer(uri, storage)
    loc = resolve(uri, storage)
    card_loc = loc.join(CARD_FILE)
    if not card_loc.exists():
        raise UserError(f"{uri}: not a model bundle (no {CARD_FILE})")
    card = read_json(card_loc, "model card")
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise UserError(f"{card_loc.uri}: unknown bundle format {found!r}")
    problem = _card_problem(card)
    if problem:
        raise _damaged_card(card_loc.uri, problem)
    return card


def _read_model_card(uri: str, storage: StorageConfig | None) -> dict:
    """:func:`read_card`, and the fields that running the model needs checked too."""
    card = read_card(uri, storage)
    problem = _model_problem(card)
    if problem:
        raise _damaged_card(resolve(uri, storage).join(CARD_FILE).uri, problem)
    return card


def _checked_weights(uri: str, loc: Location, card: dict) -> bytes:
    """The bundle's weights file, which must hash to the card's ``weights_sha256`` (bundles from
    before the field are read unchecked): a half-copied or overwritten file never runs under
    another model's card."""
    weights = loc.join(WEIGHTS_FILE)
    if not weights.exists():
        raise UserError(f"{uri}: not a complete model bundle (no {WEIGHTS_FILE})")
    blob = weights.read_bytes()
    expected = card.get("weights_sha256")
    if expected is not None:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != expected:
            raise UserError(f"{uri}: {WEIGHTS_FILE} does not match its card (SHA-256 {actual[:12]}, the card says "
                            f"{str(expected)[:12]}): a damaged or half-written bundle; copy or train it again")
    return blob


def _not_safetensors(uri: str, error: Exception) -> UserError:
    return UserError(f"{uri}: {WEIGHTS_FILE} is not a safetensors file ({str(error).splitlines()[0][:200]})")


def check_bundle(uri: str, storage: StorageConfig | None = None) -> dict:
    """The bundle's card, once its card and weights file are checked as :func:`load_bundle` checks
    them, without torch: what a driver runs before starting actors that would each fail to load
    a damaged bundle (a traceback per actor, and a failed run that looks like an outage)."""
    from safetensors import SafetensorError, deserialize

    uri = follow_pointer(uri, storage)
    card = _read_model_card(uri, storage)
    blob = _checked_weights(uri, resolve(uri, storage), card)
    try:
        deserialize(blob)  # the header and every tensor's extent, whatever their dtype
    except (SafetensorError, ValueError) as e:
        raise _not_safetensors(uri, e) from None
    return card


def load_bundle(uri: str, storage: StorageConfig | None = None) -> Bundle:
    """Load a bundle's model (eval mode, CPU), card and config.

    The weights must hash to the card's ``weights_sha256`` (bundles from before the field load
    unchecked): a half-copied or overwritten file never runs under another model's card.

    Raises:
        UserError: when the folder is not a bundle or its weights do not fit its card.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from fpc_ray.model import build_model

    uri = follow_pointer(uri, storage)
    loc = resolve(uri, storage)
    card = _read_model_card(uri, storage)
    blob = _checked_weights(uri, loc, card)
    cfg = Config.model_validate(card["config"])
    model = build_model(cfg.model, len(card["class_names"]), pretrained=False)
    try:
        state = st_load(blob)
    except SafetensorError as e:
        raise _not_safetensors(uri, e) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{uri}: weights do not fit the card's architecture ({_first_mismatch(e)})") from None
    return Bundle(model.eval(), card, cfg, loc)


def _first_mismatch(error: RuntimeError) -> str:
    """torch's load_state_dict error, many lines long, as its first mismatch."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                  lines[0] if lines else "")
    return detail if len(detail) <= 300 else detail[:297] + "..."
