"""fpc-ray: ultrasound fetal plane classification, trained, tuned and run at scale on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fpc-ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# albumentations asks PyPI for its latest version on import: a network call (and a warning) on
# every Ray worker, which hangs or fails on clusters without internet. fpc-ray pins it instead.
import os as _os

_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
