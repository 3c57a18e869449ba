"""The one choice between the two ingest paths (:func:`fpc_ray.data.ingest.choose_ingest`), without Ray."""

import pytest

from fpc_ray.config import load_config
from fpc_ray.data.ingest import ARRAYS_MAX_BYTES, DRIVER_FRACTION, MEMORY_FRACTION, choose_ingest, ingest_line

GB = 10**9


def _store(size: float):
    """An object store of ``size`` bytes that records whether it was asked (asking starts Ray)."""
    asked = []

    def object_store() -> float:
        asked.append(True)
        return size

    return object_store, asked


def test_auto_keeps_small_data_on_the_driver_without_asking_ray():
    store, asked = _store(8 * GB)
    mode, why = choose_ingest("auto", ARRAYS_MAX_BYTES, driver_free=64 * GB, object_store=store)
    assert mode == "arrays" and not asked  # a small run never starts a cluster to decide
    assert "1.0 GB" in why and f"{DRIVER_FRACTION:.0%}" in why


@pytest.mark.parametrize(("decoded", "driver_free", "store", "mode"), [
    (ARRAYS_MAX_BYTES + 1, 64 * GB, 8 * GB, "memory"),  # over the arrays limit, within half the store
    (GB // 2, 1 * GB, 8 * GB, "memory"),  # under the limit, but more than the driver can spare
    (int(MEMORY_FRACTION * 8 * GB), 64 * GB, 8 * GB, "memory"),  # exactly the stated fraction
    (int(MEMORY_FRACTION * 8 * GB) + 1, 64 * GB, 8 * GB, "stream"),
    (50 * GB, 64 * GB, 8 * GB, "stream"),
])
def test_auto_goes_to_ray_data_when_the_driver_cannot_hold_the_splits(decoded, driver_free, store, mode):
    object_store, asked = _store(store)
    chosen, why = choose_ingest("auto", decoded, driver_free, object_store)
    assert chosen == mode and asked and "object store 8.0 GB" in why


@pytest.mark.parametrize("policy", ["arrays", "memory", "stream"])
def test_a_set_cache_forces_its_path(policy):
    object_store, asked = _store(1.0)
    assert choose_ingest(policy, 50 * GB, 1.0, object_store) == (policy, "data.cache") and not asked


def test_the_line_says_the_path_why_and_the_size():
    line = ingest_line("stream", "data.cache", 3_210_000_000)
    assert line == "data ingest: stream (data.cache); decoded splits 3.2 GB"
    assert load_config(None, ["data.cache=arrays"]).data.cache == "arrays"
