"""The report of a committed labelling run: counts, confidences, galleries, errors, timings.

With ``hide_sources`` (``--no-source-uri-in-report``) no source URI reaches the page: archive
keys can carry patient names or record numbers, so each object is shown as a pseudonym instead.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
import secrets
from collections import Counter

import numpy as np

from fpc_ray import plots
from fpc_ray.config import StorageConfig
from fpc_ray.files import read_parquet, validated
from fpc_ray.label.runs import SUCCESS, CommittedRun, read_marker, run_parts
from fpc_ray.label.schema import error_kind
from fpc_ray.report.page import esc, page, section, table
from fpc_ray.report.page import img as img_tag
from fpc_ray.storage import Location

SUMMARY_COLUMNS = ["source_uri", "frame", "study_uid", "label", "confidence", "error"]
LEAST_CONFIDENT = 24
PER_CLASS = 6
ERRORS_SHOWN = 50


class SourceNames:
    """How the page names sources: their URIs, or with ``hide`` short pseudonyms.

    A pseudonym (``object 3f2a9c1e``) is the same for one object everywhere on the page, so the
    galleries and the error lists still agree. It is keyed with a secret drawn for each page and
    then forgotten: a plain hash of a key such as ``.../patient-00417/...`` could be undone by
    hashing every candidate record number.
    """

    def __init__(self, hide: bool, prefixes: list[str]):
        self.hide = hide
        self._key = secrets.token_bytes(32)
        self._prefixes = prefixes

    def _pseudonym(self, kind: str, uri: str) -> str:
        return f"{kind} {hmac.new(self._key, uri.encode(), hashlib.sha256).hexdigest()[:8]}"

    def object(self, uri: str) -> str:
        """The name of one source object."""
        return self._pseudonym("object", uri) if self.hide else uri

    def input(self) -> str:
        """The run's input prefix (or prefixes)."""
        names = [self._pseudonym("prefix", p) if self.hide else p for p in self._prefixes]
        return ", ".join(names)

    def text(self, text: str, uri: str | None = None) -> str:
        """``text`` (an error message, the options) with the object's URI, its file name and the
        input prefixes replaced by their pseudonyms, in every spelling a message may use."""
        if not self.hide:
            return text
        spellings = [(p, self._pseudonym("prefix", p)) for p in self._prefixes]
        if uri is not None:
            name = self._pseudonym("object", uri)
            spellings += [(uri, name), (posixpath.basename(uri.rstrip("/")), name)]
        # Bare paths too: S3 messages name "bucket/key" without the scheme.
        spellings += [(old.split("://", 1)[1], new) for old, new in spellings if "://" in old]
        for old, new in sorted(spellings, key=lambda s: -len(s[0])):  # a URI before its file name
            if old:
                text = text.replace(old, new)
        return text


def _figure(png: bytes | None, caption: str) -> str:
    picture = img_tag(png, caption, cls="thumb") if png else "<div class=\"muted\">no thumbnail</div>"
    return f"<figure>{picture}<figcaption>{esc(caption)}</figcaption></figure>"


def run_report(run: Location, storage: StorageConfig, hide_sources: bool = False) -> str:
    """The run's page; ``hide_sources`` replaces every source URI with a pseudonym."""
    summary = read_marker(run)
    parts = run_parts(run)
    tables = [_read_part(run, p, SUMMARY_COLUMNS) for p in parts]
    summary = validated(summary, CommittedRun, run.join(SUCCESS).uri, "run marker").model_dump()
    given = summary.get("inputs") or summary["input"]  # every prefix (runs before `inputs`: one)
    sources = SourceNames(hide_sources, [given] if isinstance(given, str) else list(given))
    rows = [(pi, ri, r) for pi, t in enumerate(tables) for ri, r in enumerate(t.to_pylist())]
    labelled = [x for x in rows if x[2]["label"] is not None]

    timings = summary.get("timings", {})
    overview = [("run", summary["run_id"]), ("model", f"{summary['model_version']} ({summary['model_uri']})"),
                ("input", sources.input()), ("objects listed", summary["objects"]["listed"]),
                ("skipped (already labelled)", summary["objects"]["skipped"]),
                ("labelled objects", summary["objects"]["labelled"]), ("rows (frames)", summary["rows"]),
                ("labelled frames", summary["labelled"]), ("errors", summary["errors"]),
                *((f"time: {k}", v) for k, v in timings.items()),
                ("options", sources.text(json.dumps(summary.get("options", {}))))]
    sections = [section("Run", table(["", "value"], overview))]
    if labelled:
        sections += _label_sections(labelled)
        sections += _gallery_sections(labelled, parts, run, sources)
    sections.append(_errors_section([r for _, _, r in rows if r["error"]], sources))
    return page(f"fpc-ray labelling run {summary['run_id']}", esc(run.uri), sections)


def _label_sections(labelled: list) -> list[str]:
    """Frames by class, the confidence histogram and the largest studies."""
    by_class = Counter(r["label"] for _, _, r in labelled)
    names = sorted(by_class, key=lambda n: -by_class[n])
    conf = [r["confidence"] for _, _, r in labelled]
    studies = Counter(r["study_uid"] or "(not DICOM)" for _, _, r in labelled)
    by_study = Counter()
    for _, _, r in labelled:
        by_study[(r["study_uid"] or "(not DICOM)", r["label"])] += 1
    top = studies.most_common(30)
    return [
        section("Frames by class", img_tag(plots.bar_png(names, [by_class[n] for n in names],
                                                         "labelled frames per class"), "by class")),
        section("Confidence",
                img_tag(plots.histogram_png(conf, "top-1 confidence", "confidence"), "confidence histogram"),
                f"<p>median {np.median(conf):.3f}; below 0.5: {sum(c < 0.5 for c in conf)} of {len(conf)} frames</p>"),
        section(f"Studies ({len(studies)}; the {len(top)} largest)",
                table(["study UID", "frames", "classes"],
                      [(s, n, ", ".join(f"{lab} {c}" for (st, lab), c in sorted(by_study.items()) if st == s))
                       for s, n in top], numeric={1})),
    ]


def _gallery_sections(labelled: list, parts: list[str], run: Location, sources: SourceNames) -> list[str]:
    """The least confident frames and a sample per class; only the chosen rows' thumbnails are
    read, so memory stays small."""
    classes = sorted({r["label"] for _, _, r in labelled})
    least = sorted(labelled, key=lambda x: x[2]["confidence"])[:LEAST_CONFIDENT]
    sample: list = []
    for name in classes:
        sample += [x for x in labelled if x[2]["label"] == name][:PER_CLASS]
    pngs = _thumbnails(parts, run, least + sample)
    least_html = "<div class=\"gallery\">" + "".join(
        _figure(pngs.get((p, i)), f"{r['label']} {r['confidence']:.2f} · {sources.object(r['source_uri'])}"
                + (f" [frame {r['frame']}]" if r["frame"] else "")) for p, i, r in least) + "</div>"
    per_class_html = []
    for name in classes:
        chosen = [x for x in sample if x[2]["label"] == name]
        per_class_html.append(f"<h3>{esc(name)}</h3><div class=\"gallery\">" + "".join(
            _figure(pngs.get((p, i)), f"{r['confidence']:.2f} · {sources.object(r['source_uri'])}")
            for p, i, r in chosen) + "</div>")
    return [section("Least confident frames", least_html), section("A sample per class", *per_class_html)]


def _errors_section(errors: list[dict], sources: SourceNames) -> str:
    """The error rows by kind, at most ERRORS_SHOWN of each."""
    if not errors:
        return section("Errors", "<p>None: every object decoded.</p>")
    kinds = Counter(error_kind(e["error"]) for e in errors)
    blocks = [img_tag(plots.bar_png(list(kinds), list(kinds.values()), "errors by kind"), "errors by kind")]
    for kind, n in kinds.most_common():
        shown = [e for e in errors if error_kind(e["error"]) == kind][:ERRORS_SHOWN]
        listed = [(sources.object(e["source_uri"]), sources.text(e["error"], e["source_uri"])) for e in shown]
        blocks.append(f"<h3>{esc(kind)} ({n})</h3>" + table(["source", "error"], listed))
    return section(f"Errors ({len(errors)})", *blocks)


def _thumbnails(parts: list[str], run: Location, chosen: list) -> dict:
    wanted: dict[int, list[int]] = {}
    for p, i, _ in chosen:
        wanted.setdefault(p, []).append(i)
    out = {}
    for p, indices in wanted.items():
        column = _read_part(run, parts[p], ["gradcam_png"]).column(0)
        for i in set(indices):
            out[(p, i)] = column[i].as_py()
    return out


def _read_part(run: Location, path: str, columns: list[str]):
    """Some columns of one of the run's parts (a path in ``run.fs``); a damaged part is one line."""
    return read_parquet(Location(run.fs, path, run.join(path[len(run.path):].lstrip("/")).uri), "run part", columns)
