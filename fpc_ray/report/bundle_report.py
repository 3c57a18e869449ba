"""The report of a model bundle: curves, confusion matrix, per-class scores, calibration, card."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, RootModel

from fpc_ray import plots
from fpc_ray.bundle import CARD_FILE, HISTORY_FILE, follow_pointer, read_card
from fpc_ray.config import StorageConfig
from fpc_ray.files import read_json, validated
from fpc_ray.report.page import esc, img, page, section, table
from fpc_ray.storage import resolve


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Epoch(_Strict):
    epoch: int
    train_loss: float
    val_loss: float
    val_top1: float
    val_top2: float
    images_per_s: float = 0.0


class History(RootModel[list[_Epoch]]):
    """``metrics.json``: the per-epoch training history, as the curves read it."""


class _ClassScores(_Strict):
    precision: float
    recall: float
    f1: float
    support: int


class _Test(_Strict):
    n: int
    top1: float
    top2: float
    macro_f1: float
    ece: float
    class_names: list[str]
    per_class: dict[str, _ClassScores]
    confusion_matrix: list[list[int]]
    reliability: list[dict]
    ece_uncalibrated: float | None = None
    reliability_uncalibrated: list[dict] | None = None


class _Val(_Strict):
    epoch: int
    val_top1: float
    val_top2: float


class _Metrics(_Strict):
    val: _Val
    test: _Test | None = None


class _Architecture(_Strict):
    backbone: str
    attention: dict
    head: dict
    pretrained: Any = None


class _Parameters(_Strict):
    total: int
    trainable: int


class _Input(_Strict):
    size: int
    resize: str


class _Training(_Strict):
    epochs: int
    num_workers: int
    use_gpu: bool
    wall_s: float


class _Data(_Strict):
    uri: str
    fingerprint: str
    images: dict[str, Any] = {}


class _Dataset(_Strict):
    uri: str
    fingerprint: str


class _Calibration(_Strict):
    temperature: float
    n: int | None = None
    val_ece_before: float | None = None
    val_ece_after: float | None = None


class _Promotion(_Strict):
    decision: str
    decided_at: str
    candidate: dict
    production: dict | None = None


class ReportedCard(_Strict):
    """The fields of a model card the bundle's page shows, typed: a card from which some are
    missing or of another type is damaged (one line), not a KeyError."""

    version: str
    created_at: str
    weights_sha256: str
    versions: dict[str, str]
    class_names: list[str]
    architecture: _Architecture
    parameters: _Parameters
    input: _Input
    metrics: _Metrics
    training: _Training
    data: _Data
    datasets: list[_Dataset] | None = None
    calibration: _Calibration | None = None
    lineage: dict[str, str] | None = None
    promotion: _Promotion | None = None


def bundle_report(uri: str, storage: StorageConfig, hide_sources: bool = False) -> str:
    """The bundle's page; ``hide_sources`` leaves out the training data's URI (its fingerprint stays)."""
    uri = follow_pointer(uri, storage)
    card = read_card(uri, storage)
    validated(card, ReportedCard, resolve(uri, storage).join(CARD_FILE).uri, "model card")
    history_loc = resolve(uri, storage).join(HISTORY_FILE)
    history = read_json(history_loc, "training history", History).model_dump() if history_loc.exists() else []
    test = card["metrics"].get("test")
    val = card["metrics"]["val"]

    headline = [("best epoch", val["epoch"]), ("val top-1", val["val_top1"]), ("val top-2", val["val_top2"])]
    if test:
        headline += [("test top-1", test["top1"]), ("test top-2", test["top2"]), ("test macro-F1", test["macro_f1"]),
                     ("test ECE", test["ece"])]
        if "ece_uncalibrated" in test:
            headline.append(("test ECE before calibration", test["ece_uncalibrated"]))
        headline.append(("test images", test["n"]))
    if card.get("calibration"):
        headline.append(("temperature (fitted on val)", card["calibration"]["temperature"]))
    sections = [section("Scores", table(["metric", "value"], headline, numeric={1}))]
    if history:
        sections.append(_curves_section(history))
    if test:
        sections += _test_sections(test, card.get("calibration"))
    else:
        sections.append(section("Test set", "<p>This bundle has no test report (its data had no test split).</p>"))
    sections.append(_card_section(card, hide_sources))
    return page(f"fpc-ray model {card['version']}", f"{esc(uri)}", sections)


def _curves_section(history: list[dict]) -> str:
    return section("Training curves", img(plots.training_curves_png(history), "training curves"),
                   table(["epoch", "train loss", "val loss", "val top-1", "val top-2", "images/s"],
                         [(h["epoch"], h["train_loss"], h["val_loss"], h["val_top1"], h["val_top2"],
                           round(h.get("images_per_s", 0), 1)) for h in history],
                         numeric={0, 1, 2, 3, 4, 5}))


def _test_sections(test: dict, calibration: dict | None) -> list[str]:
    """Confusion matrix, per-class scores and calibration on the test split."""
    names = test["class_names"]
    per_class = test["per_class"]
    return [
        section(f"Confusion matrix (test, n={test['n']})",
                img(plots.confusion_matrix_png(test["confusion_matrix"], names), "confusion matrix")),
        section("Per-class precision, recall and F1 (test)",
                table(["class", "precision", "recall", "F1", "support"],
                      [(n, per_class[n]["precision"], per_class[n]["recall"], per_class[n]["f1"],
                        per_class[n]["support"]) for n in names], numeric={1, 2, 3, 4}),
                img(plots.bar_png(names, [round(per_class[n]["f1"], 3) for n in names], "F1 per class"),
                    "F1 per class")),
        _calibration_section(test, calibration),
    ]


def _calibration_section(test: dict, calibration: dict | None) -> str:
    """The test split's reliability diagram, before and after temperature scaling where the bundle
    has a temperature (bundles from before calibration: their one diagram)."""
    note = "<p class=\"muted\">Bars below the diagonal: the model is more confident than it is right.</p>"
    if not calibration or not calibration.get("n") or "reliability_uncalibrated" not in test:
        return section("Calibration (test)", img(plots.reliability_png(test["reliability"], test["ece"]),
                                                 "reliability diagram"), note)
    t = calibration["temperature"]
    png = plots.reliability_png(test["reliability"], test["ece"], uncalibrated_bins=test["reliability_uncalibrated"],
                                uncalibrated_ece=test["ece_uncalibrated"], temperature=t)
    fitted = (f"<p>Probabilities are softmax(logits / T) with T = {t:.4g}, fitted on the validation split "
              f"(n={calibration['n']}) by minimising the negative log-likelihood, its mean confidence capped "
              f"at what the split's accuracy can show: validation ECE "
              f"{calibration['val_ece_before']:.4f} before, {calibration['val_ece_after']:.4f} after; test ECE "
              f"{test['ece_uncalibrated']:.4f} before, {test['ece']:.4f} after. T changes no prediction.</p>")
    return section("Calibration (test)", img(png, "reliability diagram before and after calibration"), fitted, note)


def _card_section(card: dict, hide_sources: bool) -> str:
    """The model card: architecture, training data and the run that wrote the bundle."""
    arch = card["architecture"]
    params = card["parameters"]
    model_rows = [
        ("backbone", arch["backbone"]), ("pretrained", arch.get("pretrained")),
        ("attention", json.dumps(arch["attention"])), ("MLP head", json.dumps(arch["head"])),
        ("parameters", f"{params['total']:,} total, {params['trainable']:,} trainable"),
        ("input", f"{card['input']['size']} px, {card['input']['resize']}"),
        ("classes", ", ".join(card["class_names"])),
    ]
    data_rows = _data_rows(card, hide_sources)
    training = card["training"]
    run_rows = [("version", card["version"]), ("created", card["created_at"]),
                ("weights SHA-256", card["weights_sha256"]),
                ("epochs", training["epochs"]), ("workers", training["num_workers"]), ("GPU", training["use_gpu"]),
                ("wall time (s)", training["wall_s"]), *card["versions"].items()]
    if card.get("lineage"):
        run_rows.append(("fine-tuned from", f"{card['lineage']['parent_uri']} ({card['lineage']['parent_version']})"))
    if card.get("promotion"):
        p = card["promotion"]
        run_rows.append(("promotion", f"{p['decision']} at {p['decided_at']} (margin {p['margin']})"))
        run_rows += _promotion_rows(p, hide_sources)
    return section("Model card", table(["model", ""], model_rows), table(["data", ""], data_rows),
                   table(["run", ""], run_rows))


HIDDEN = "(not shown: --no-source-uri-in-report)"


def _data_rows(card: dict, hide_sources: bool) -> list[tuple]:
    """The training data: every dataset (URI, fingerprint, split sizes) and the joined counts."""
    data = card["data"]
    datasets = card.get("datasets") or []
    rows = [("data", HIDDEN if hide_sources else data["uri"]),
            ("fingerprint (SHA-256 of the CSV" + (", of the CSVs' hashes)" if len(datasets) > 1 else ")"),
             data["fingerprint"])]
    if len(datasets) > 1:
        rows += [(f"dataset {i}", f"{HIDDEN if hide_sources else d['uri']}: {d['fingerprint'][:12]}, "
                                  f"splits {json.dumps(d['splits'])}") for i, d in enumerate(datasets, 1)]
    rows += [("patients", json.dumps(data.get("patients"))),
             *((f"{split} images", json.dumps(counts)) for split, counts in data.get("images", {}).items())]
    return rows


def _promotion_rows(promotion: dict, hide_sources: bool) -> list[tuple]:
    """Candidate and production test top-1 on each dataset, where the retrain scored several."""
    mine = promotion["candidate"].get("per_dataset") or []
    theirs = (promotion.get("production") or {}).get("per_dataset") or [None] * len(mine)
    if len(mine) < 2:
        return []
    rows = []
    for d, other in zip(mine, theirs, strict=True):
        where = HIDDEN if hide_sources else d["uri"]
        rows.append((f"test top-1 on {where}",
                     f"candidate {_top1(d)}" + (f" vs production {_top1(other)}" if other else "") + f" (n={d['n']})"))
        if d.get("recall"):  # per class: a reviewed class's gain (or a loss elsewhere) is visible here
            before = (other or {}).get("recall") or {}
            rows.append((f"test recall per class on {where}", ", ".join(
                f"{name} {r:.2f}" + (f" (production {before[name]:.2f})" if name in before else "")
                for name, r in d["recall"].items())))
    return rows


def _top1(scores: dict) -> str:
    return f"{scores['top1']:.4f}" if scores.get("top1") is not None else "-"
