"""hinge: spatial gene expression from H&E histology (HINGE, CVPR 2026)."""

from importlib.metadata import PackageNotFoundError, version

from hinge_cli.errors import HingeError

try:
    __version__ = version("hinge-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["HingeError", "__version__"]
