"""hinge: spatial gene expression from H&E histology (HINGE, CVPR 2026).

The pipeline from Python: `tile`, `embed`, `pretrain_warmup` and `train`, `generate` and
`evaluate` (see `hinge_cli.api`). Importing the package is light: torch and anndata load
when a stage runs.
"""

import sys
import types
from importlib.metadata import PackageNotFoundError, version

from hinge_cli.errors import HingeError

try:
    __version__ = version("hinge-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from hinge_cli.api import embed, evaluate, generate, generate_samples, pretrain_warmup, tile, train  # noqa: E402

__all__ = ["HingeError", "__version__", "embed", "evaluate", "generate", "generate_samples", "pretrain_warmup", "tile", "train"]


class _Package(types.ModuleType):
    """Keeps `hinge_cli.tile` etc. the API functions: importing the stage modules of the same name
    (hinge_cli/tile.py, embed.py, train.py, generate.py) would otherwise rebind them to the modules.
    `from hinge_cli.tile import ...` is unaffected: it reads sys.modules."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
