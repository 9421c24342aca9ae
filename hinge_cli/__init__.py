"""hinge: spatial gene expression from H&E histology (HINGE, CVPR 2026).

The pipeline from Python lives in `hinge_cli.api` (`tile`, `embed`, `pretrain_warmup`, `train`,
`generate`, `evaluate`); the stage modules of the same names are the command line's. Importing
the package is light: torch and anndata load when a stage runs.
"""

from importlib.metadata import PackageNotFoundError, version

from hinge_cli.errors import HingeError

try:
    __version__ = version("hinge-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["HingeError", "__version__"]
