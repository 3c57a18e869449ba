"""fpc-ray: ultrasound fetal plane classification, trained, tuned and run at scale on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fpc-ray")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

