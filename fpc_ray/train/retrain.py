"""The retraining loop: fine-tune the production model on the latest data, promote only if not worse.

1. Read the promotion pointer (``models/production.json``); its bundle is the current model.
2. Train a candidate from it (``train.init_from``) on the latest data (``fpc-ray train``; one
   ``--data`` or several, e.g. the base dataset and every imported review batch).
3. Score the candidate and the current model on the same fixed test set: the official test
   patients of ``--test-data`` (default: of every ``--data``, joined), which no training run ever
   sees; and on each dataset's test split alone.
4. Promote (rewrite the pointer atomically) when the candidate's overall top-1 is at least the
   current one's minus ``--margin``. The decision and both models' scores, overall and per
   dataset, go into the candidate's card and the decision line (a candidate that gains on reviewed
   frames but loses on the original test set shows as such). The
   pointer is rewritten only if it is still what step 1 read (a compare-and-swap): a concurrent
   retrain or a manual rollback in between makes this one refuse with one line.

With no pointer yet, the first candidate trains from the config alone and is promoted.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fpc_ray.bundle import CARD_FILE, PointerState, read_pointer_state, write_pointer
from fpc_ray.config import Config, StorageConfig
from fpc_ray.data.multi import data_uris, joined_uri
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


def retrain(cfg: Config, data_uri: str | Sequence[str], pointer_uri: str, candidates_uri: str, margin: float = 0.01,
            test_data_uri: str | Sequence[str] | None = None, echo: Callable[[str], None] = print) -> RetrainDecision:
    """Train a candidate, compare it with production on one test set, promote it or not."""
    from fpc_ray.train.driver import run_training

    storage = cfg.storage
    data = data_uris(data_uri)
    test_data = data_uris(test_data_uri) if test_data_uri else data
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
    card = run_training(cfg, data, candidate_uri).card

    candidate = evaluate_bundle(candidate_uri, test_data, "test", storage=storage, use_gpu=cfg.train.use_gpu,
                                cache=cfg.data.cache)
    current = (evaluate_bundle(production, test_data, "test", storage=storage, use_gpu=cfg.train.use_gpu,
                               cache=cfg.data.cache)
               if production else None)
    promoted = promotes(candidate["top1"], current["top1"] if current else None, margin)
    record = _promotion_record(promoted, margin, test_data, card, candidate, production, current)
    vs = f"{current['top1']:.4f}" if current else "none"
    if promoted:
        _promote(pointer_uri, at_start, candidate_uri, card, record, storage)
        line = f"promoted {candidate_uri}: test top-1 {candidate['top1']:.4f} vs production {vs} (margin {margin})"
    else:
        _write_decision(candidate_uri, card, record, storage)
        line = (f"refused {candidate_uri}: test top-1 {candidate['top1']:.4f} is worse than production's {vs} "
                f"by more than {margin}; {pointer_uri} unchanged")
    line += _per_dataset_line(record)
    return RetrainDecision(promoted, candidate_uri, candidate["top1"], current["top1"] if current else None, line)


def _dataset_scores(report: dict) -> list[dict]:
    """A model's test scores on each dataset, as the promotion record keeps them."""
    return [{k: d[k] for k in ("uri", "n", "top1", "top2", "recall")} for d in report["per_dataset"]]


def _per_dataset_line(record: dict) -> str:
    """``; per dataset: A 0.9700 vs 0.9800, B 0.9000 vs 0.6000`` where the test set joins several."""
    mine = record["candidate"]["per_dataset"]
    if len(mine) < 2:
        return ""
    theirs = record["production"]["per_dataset"] if record["production"] else [None] * len(mine)

    def top1(scores: dict | None) -> str:
        return "none" if scores is None or scores["top1"] is None else f"{scores['top1']:.4f}"

    return "; test top-1 per dataset (candidate vs production): " + ", ".join(
        f"{d['uri']} {top1(d)} vs {top1(other)}" for d, other in zip(mine, theirs, strict=True))


def _promotion_record(promoted: bool, margin: float, test_data: list[str], card: dict, candidate: dict,
                      production: str | None, current: dict | None) -> dict:
    """The decision and both models' scores (overall and per test dataset), as the candidate's card
    records them under ``promotion``."""
    return {
        "decision": "promoted" if promoted else "refused",
        "decided_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "margin": margin,
        "test_data": {"uri": joined_uri(test_data), "fingerprint": candidate["data_fingerprint"], "n": candidate["n"],
                      "datasets": [{k: d[k] for k in ("uri", "fingerprint", "n")} for d in candidate["per_dataset"]]},
        "candidate": {"version": card["version"], "top1": candidate["top1"], "top2": candidate["top2"],
                      "per_dataset": _dataset_scores(candidate)},
        "production": ({"uri": production, "version": current["model_version"], "top1": current["top1"],
                        "top2": current["top2"], "per_dataset": _dataset_scores(current)} if current else None),
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
