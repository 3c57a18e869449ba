"""``fpc-ray evaluate``'s outputs: the report files and the summary printed.

The scoring itself is :mod:`fpc_ray.scoring`; this module is for the CLI and the reports.
"""

from __future__ import annotations

import json

from fpc_ray.config import StorageConfig


def save_report(report: dict, out_dir: str, storage: StorageConfig | None = None) -> list[str]:
    """Write ``metrics.json`` and ``confusion_matrix.png`` under ``out_dir``; return their URIs."""
    from fpc_ray.files import write_atomic
    from fpc_ray.plots import confusion_matrix_png
    from fpc_ray.storage import resolve

    out = resolve(out_dir, storage)
    out.makedirs()
    json_loc, png_loc = out.join("metrics.json"), out.join("confusion_matrix.png")
    write_atomic(json_loc, json.dumps(report, indent=2).encode())  # what `report` reads back
    png_loc.write_bytes(confusion_matrix_png(report["confusion_matrix"], report["class_names"],
                                             title=f"{report.get('split', '')} top-1 {report['top1']:.3f}"))
    return [json_loc.uri, png_loc.uri]


def calibration_note(report: dict) -> str:
    """The temperature a report's probabilities were divided by, and the ECE without it, e.g.
    `` (calibrated, T=0.62; uncalibrated 0.0831)``; nothing for a bundle without calibration (T=1)."""
    if report.get("temperature", 1.0) == 1.0:
        return ""
    return f" (calibrated, T={report['temperature']:.3g}; uncalibrated {report['ece_uncalibrated']:.4f})"


def summary_lines(report: dict) -> list[str]:
    """A human-readable summary of a classification report: overall, per class, per dataset."""
    lines = [f"n={report['n']}  top1={report['top1']:.4f}  top2={report['top2']:.4f}  "
             f"macro_f1={report['macro_f1']:.4f}  ece={report['ece']:.4f}{calibration_note(report)}"]
    width = max(len(n) for n in report["per_class"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name, m in report["per_class"].items():
        lines.append(f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  "
                     f"{m['support']:7d}")
    per_dataset = report.get("per_dataset") or []
    if len(per_dataset) > 1:
        lines.append("per dataset:")
        for d in per_dataset:
            scores = (f"top1={d['top1']:.4f}  top2={d['top2']:.4f}  macro_f1={d['macro_f1']:.4f}  ece={d['ece']:.4f}"
                      if d["n"] else "(empty split)")
            lines.append(f"  {d['uri']}  n={d['n']}  {scores}")
    return lines
