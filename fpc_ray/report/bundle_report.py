"""The report of a model bundle: curves, confusion matrix, per-class scores, calibration, card."""

from __future__ import annotations

import json

from fpc_ray import plots
from fpc_ray.bundle import HISTORY_FILE, follow_pointer, read_card
from fpc_ray.config import StorageConfig
from fpc_ray.report.page import esc, img, page, section, table
from fpc_ray.storage import resolve


def bundle_report(uri: str, storage: StorageConfig, hide_sources: bool = False) -> str:
    """The bundle's page; ``hide_sources`` leaves out the training data's URI (its fingerprint stays)."""
    uri = follow_pointer(uri, storage)
    card = read_card(uri, storage)
    history_loc = resolve(uri, storage).join(HISTORY_FILE)
    history = json.loads(history_loc.read_text()) if history_loc.exists() else []
    test = card["metrics"].get("test")
    val = card["metrics"]["val"]

    headline = [("best epoch", val["epoch"]), ("val top-1", val["val_top1"]), ("val top-2", val["val_top2"])]
    if test:
        headline += [("test top-1", test["top1"]), ("test top-2", test["top2"]), ("test macro-F1", test["macro_f1"]),
                     ("test ECE", test["ece"]), ("test images", test["n"])]
    sections = [section("Scores", table(["metric", "value"], headline, numeric={1}))]
    if history:
        sections.append(_curves_section(history))
    if test:
        sections += _test_sections(test)
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


def _test_sections(test: dict) -> list[str]:
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
        section("Calibration (test)",
                img(plots.reliability_png(test["reliability"], test["ece"]), "reliability diagram"),
                "<p class=\"muted\">Bars below the diagonal: the model is more confident than it is right.</p>"),
    ]


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
    data = card["data"]
    data_uri = "(not shown: --no-source-uri-in-report)" if hide_sources else data["uri"]
    data_rows = [("data", data_uri), ("fingerprint (SHA-256 of the CSV)", data["fingerprint"]),
                 ("patients", json.dumps(data.get("patients"))),
                 *((f"{split} images", json.dumps(counts)) for split, counts in data.get("images", {}).items())]
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
    return section("Model card", table(["model", ""], model_rows), table(["data", ""], data_rows),
                   table(["run", ""], run_rows))
