"""The retraining loop: fine-tune the production model on the latest data, promote only if not worse.

1. Read the promotion pointer (``models/production.json``); its bundle is the current model.
2. Train a candidate from it (``train.init_from``) on the latest data (``fpc-ray train``).
3. Score the candidate and the current model on the same fixed test set: the official test
   patients of ``--test-data`` (default: of ``--data``), which no training run ever sees.
4. Promote (rewrite the pointer atomically) when the candidate's top-1 is at least the current
   one's minus ``--margin``. The decision and both scores go into the candidate's card. The
   pointer is rewritten only if it is still what step 1 read (a compare-and-swap): a concurrent
   retrain or a manual rollback in between makes this one refuse with one line.

With no pointer yet, the first candidate trains from the config alone and is promoted.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from fpc_ray.bundle import CARD_FILE, PointerState, read_pointer_state, write_pointer
from fpc_ray.config import Config, StorageConfig
from fpc_ray.errors import ConcurrentChange
from fpc_ray.scoring import evaluate_bundle
from fpc_ray.storage import resolve


@dataclass
class RetrainDecision:
    promoted: bool
    candidate_uri: str
    candidate_top1: float
    production_top1: float | None
    line: str


def promotes(candidate_top1: float, production_top1: float | None, margin: float) -> bool:
    """The promotion rule: no production model yet, or a test top-1 at most ``margin`` below it.

    A drop of exactly ``margin`` promotes; the tolerance keeps float rounding of the subtraction
    (0.81 - 0.80 > 0.01 in binary) from refusing it.
    """
    return production_top1 is None or candidate_top1 >= production_top1 - margin - 1e-9


def retrain(cfg: Config, data_uri: str, pointer_uri: str, candidates_uri: str, margin: float = 0.01,
            test_data_uri: str | None = None, echo: Callable[[str], None] = print) -> RetrainDecision:
    """Train a candidate, compare it with production on one test set, promote it or not."""
    from fpc_ray.train.driver import run_training

    storage = cfg.storage
    test_data_uri = test_data_uri or data_uri
    at_start = read_pointer_state(pointer_uri, storage)  # promotion rewrites it only if still this
    # A pointer that could never be written fails now, as one line, not after the training.
    resolve(pointer_uri.rsplit("/", 1)[0] if "/" in pointer_uri else ".", storage).check_writable()
    production = at_start.record["bundle"] if at_start.record else None
    cfg = cfg.model_copy(deep=True)
    cfg.train.init_from = production
    # Sortable by time, and unique: two retrains can start within the same second.
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    candidate_uri = resolve(candidates_uri, storage).join(stamp).uri
    echo(f"retrain: production {production or '(none yet)'}; candidate -> {candidate_uri}")
    card = run_training(cfg, data_uri, candidate_uri).card

    candidate = evaluate_bundle(candidate_uri, test_data_uri, "test", storage=storage, use_gpu=cfg.train.use_gpu)
    current = (evaluate_bundle(production, test_data_uri, "test", storage=storage, use_gpu=cfg.train.use_gpu)
               if production else None)
    promoted = promotes(candidate["top1"], current["top1"] if current else None, margin)
    record = _promotion_record(promoted, margin, test_data_uri, card, candidate, production, current)
    vs = f"{current['top1']:.4f}" if current else "none"
    if promoted:
        _promote(pointer_uri, at_start, candidate_uri, card, record, storage)
        line = f"promoted {candidate_uri}: test top-1 {candidate['top1']:.4f} vs production {vs} (margin {margin})"
    else:
        _write_decision(candidate_uri, card, record, storage)
        line = (f"refused {candidate_uri}: test top-1 {candidate['top1']:.4f} is worse than production's {vs} "
                f"by more than {margin}; {pointer_uri} unchanged")
    return RetrainDecision(promoted, candidate_uri, candidate["top1"], current["top1"] if current else None, line)


def _promotion_record(promoted: bool, margin: float, test_data_uri: str, card: dict, candidate: dict,
                      production: str | None, current: dict | None) -> dict:
    """The decision and both scores, as the candidate's card records them under ``promotion``."""
    return {
        "decision": "promoted" if promoted else "refused",
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "margin": margin,
        "test_data": {"uri": test_data_uri, "fingerprint": candidate["data_fingerprint"], "n": candidate["n"]},
        "candidate": {"version": card["version"], "top1": candidate["top1"], "top2": candidate["top2"]},
        "production": ({"uri": production, "version": current["model_version"], "top1": current["top1"],
                        "top2": current["top2"]} if current else None),
    }


def _write_decision(candidate_uri: str, card: dict, record: dict, storage: StorageConfig) -> None:
    """The candidate's card says what happened: promoted, refused and void candidates alike."""
    resolve(candidate_uri, storage).join(CARD_FILE).write_text(json.dumps({**card, "promotion": record}, indent=2))


def _promote(pointer_uri: str, at_start: PointerState, candidate_uri: str, card: dict, record: dict,
             storage: StorageConfig) -> None:
    """Point production at the candidate, only if the pointer is still what the retrain read."""
    pointer = at_start.record
    try:
        write_pointer(pointer_uri, {"bundle": candidate_uri, "version": card["version"],
                                    "promoted_at": record["decided_at"], "test_top1": record["candidate"]["top1"],
                                    "previous": ({"bundle": pointer["bundle"], "version": pointer.get("version")}
                                                 if pointer else None)}, storage, expected=at_start)
    except ConcurrentChange:
        record["decision"] = "void: the pointer moved while this retrain ran"
        _write_decision(candidate_uri, card, record, storage)
        raise ConcurrentChange(f"{pointer_uri} moved while this retrain ran (a concurrent retrain or a manual "
                               f"rollback); candidate {candidate_uri} left unpromoted, run retrain again") from None
    _write_decision(candidate_uri, card, record, storage)
