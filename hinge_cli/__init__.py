"""hinge: spatial gene expression from H&E histology (HINGE, CVPR 2026).

The pipeline from Python: `tile`, `embed`, `pretrain_warmup` and `train`, `generate` and
`evaluate` (see `hinge_cli.api`). Importing the package is light: torch and anndata load
when a stage runs.
"""

from importlib.metadata import PackageNotFoundError, version

from hinge_cli.errors import HingeError

try:
    __version__ = version("hinge-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from hinge_cli.api import embed, evaluate, generate, generate_samples, pretrain_warmup, tile, train  # noqa: E402

__all__ = ["HingeError", "__version__", "embed", "evaluate", "generate", "generate_samples", "pretrain_warmup", "tile", "train"]
