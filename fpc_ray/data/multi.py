"""Several FETAL_PLANES_DB-layout datasets as one: each read and cut by its own patients, then joined.

Patient numbers belong to their dataset (patient 7 of the published set is not patient 7 of a
batch of reviewed frames), so every dataset is split on its own, with the same ``val_fraction``
and ``split_seed``, and the splits are joined: train with train, val with val, test with test.
No patient is in two splits, and ``fpc-ray evaluate --data B --split val`` scores exactly the
patients a run on A and B validated on from B. Every dataset uses the six planes of
FETAL_PLANES_DB in the model's order (:func:`~fpc_ray.data.fetal_planes.parse_csv` refuses any
other ``Plane``), so their label indices agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fpc_ray.config import StorageConfig
from fpc_ray.data.dataset import SplitArrays, decode_split
from fpc_ray.data.fetal_planes import FetalPlanesDB, Record, read_fetal_planes
from fpc_ray.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class DatasetSplits:
    """One dataset, read and cut into train / val / test by its own patients."""

    uri: str
    db: FetalPlanesDB
    splits: dict[str, list[Record]]

    def card_entry(self) -> dict:
        """What the card's ``datasets`` list records of it."""
        return {"uri": self.uri, "fingerprint": self.db.fingerprint,
                "splits": {name: len(records) for name, records in self.splits.items()}}


def data_uris(data: str | Sequence[str]) -> list[str]:
    """``--data`` as a list: one URI or several, none twice."""
    uris = [data] if isinstance(data, str) else list(data)
    if not uris:
        raise UserError("--data: give at least one dataset")
    seen = set()
    for uri in uris:
        key = uri.rstrip("/")
        if key in seen:
            raise UserError(f"--data {uri}: given twice (its images would count double)")
        seen.add(key)
    return uris


def read_datasets(data: str | Sequence[str], val_fraction: float, split_seed: int,
                  storage: StorageConfig | None = None) -> list[DatasetSplits]:
    """Read every dataset and split each by its own patients.

    Raises:
        UserError: naming the dataset whose CSV is missing or malformed, or holds a class other
            than the six FETAL_PLANES_DB planes.
    """
    parts = []
    for uri in data_uris(data):
        db = read_fetal_planes(uri, storage)
        parts.append(DatasetSplits(uri, db, {name: db.split(name, val_fraction, split_seed) for name in SPLITS}))
    return parts


def decode_joined(parts: Sequence[DatasetSplits], split: str, size: int, threads: int = 4) -> SplitArrays:
    """One split of every dataset, decoded and concatenated in the order of ``parts``."""
    arrays = [decode_split(p.db, p.splits[split], size, threads) for p in parts]
    return SplitArrays(np.concatenate([a.images for a in arrays]), np.concatenate([a.labels for a in arrays]),
                       [name for a in arrays for name in a.names])


def joined_uri(uris: Sequence[str]) -> str:
    """The card's ``data.uri``: the one dataset's URI, or every URI joined by `` + ``."""
    return " + ".join(uris)


def joined_fingerprint(fingerprints: Sequence[str]) -> str:
    """The one dataset's fingerprint, or the SHA-256 of the fingerprints in order (a change to any
    dataset, or to their order, changes it)."""
    if len(fingerprints) == 1:
        return fingerprints[0]
    return hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()
