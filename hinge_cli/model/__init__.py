"""The model core: CellFM-compatible backbone, SoftAdaLN conditioning, masked diffusion, sampler.

A library: no CLI, no terminal output. Typical use:

    net = Hinge(backbone, gene_ids, image_dim, cfg.model, cfg.diffusion)
    out = net.generate(image, n_samples=8, seed=0)  # prediction: out.mean, out.std
    checkpoint = load_checkpoint(path)              # a saved one: checkpoint.net and its card
"""

from hinge_cli.model.backbone import Backbone
from hinge_cli.model.cellfm import ImportReport, convert_cellfm, import_cellfm, map_panel, read_mindspore_checkpoint, read_vocab
from hinge_cli.model.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_card, save_checkpoint, sidecar_path
from hinge_cli.model.conditioning import ConditionNet, SoftAdaLN
from hinge_cli.model.diffusion import MaskSchedule, automatic_alpha, corrupt, diffusion_loss
from hinge_cli.model.hinge import Hinge
from hinge_cli.model.lora import POLICIES, apply_policy, count_parameters
from hinge_cli.model.pretrain import pretrain_loss, select_genes
from hinge_cli.model.sampler import Samples, sample

__all__ = [
    "POLICIES",
    "Backbone",
    "Checkpoint",
    "ConditionNet",
    "Hinge",
    "ImportReport",
    "MaskSchedule",
    "Samples",
    "SoftAdaLN",
    "apply_policy",
    "automatic_alpha",
    "convert_cellfm",
    "corrupt",
    "count_parameters",
    "diffusion_loss",
    "import_cellfm",
    "load_checkpoint",
    "map_panel",
    "pretrain_loss",
    "read_mindspore_checkpoint",
    "read_checkpoint_card",
    "read_vocab",
    "sample",
    "save_checkpoint",
    "select_genes",
    "sidecar_path",
]
