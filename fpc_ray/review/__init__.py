"""Review batches: the least certain frames of committed labelling runs go to reviewers in Label
Studio (or a spreadsheet), and their answers come back as a FETAL_PLANES_DB-layout dataset.

:mod:`.select` picks frames, :mod:`.export` writes a batch, :mod:`.labelstudio` holds the Label
Studio formats, :mod:`.importer` validates the answers and writes the dataset.
"""

from enum import StrEnum


class Strategy(StrEnum):
    """How ``review export`` picks frames (see :func:`fpc_ray.review.select.ranked`)."""

    least_confident = "least-confident"
    margin = "margin"
    per_class = "per-class"
    random = "random"


class Format(StrEnum):
    """What a review batch is written for: Label Studio (tasks.json + config) or a spreadsheet."""

    label_studio = "label-studio"
    csv = "csv"
