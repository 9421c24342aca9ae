"""The `hinge` command line: one small function per subcommand that maps its flags onto `hinge_cli.api`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hinge_cli import __version__, api
from hinge_cli.cli.options import (
    ConfigOpt,
    CountsLayer,
    GenesFile,
    GenesToPlot,
    HingeGroup,
    Image,
    KeepGoing,
    LogFormat,
    Mpp,
    Overwrite,
    Quiet,
    RunDir,
    SampleIds,
    ShardOpt,
    Slides,
    Spots,
    Verbose,
    Visium,
    VisiumHD,
    Weights,
    bin_um_option,
    command_decorator,
    deprecated,
    device_setting,
    ids,
    path_option,
    ranged_option,
    run_command,
    setting,
    switch,
    text_option,
)
from hinge_cli.cli.terminal import say, setup_output
from hinge_cli.config import POSITIVE, EmbedConfig, GenerateConfig, TileConfig, TissueConfig, TrainConfig, WarmupConfig
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run, Shard

app = typer.Typer(
    name="hinge",
    cls=HingeGroup,
    help="Predict spatial gene expression from H&E histology (HINGE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
command = command_decorator(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"hinge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Verbose = False,
    quiet: Quiet = False,
    log_format: LogFormat = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    setup_output(verbose, quiet, log_format, fresh=True)


@command
def tile(
    slides: Slides = None,
    run: RunDir = None,
    spots: Spots = None,
    sample_id: SampleIds = None,
    mpp: Mpp = None,
    samples: path_option("CSV with columns sample_id, slide[, spots, mpp, layer].", "file", "--samples") = None,
    visium: Visium = None,
    visium_hd: VisiumHD = None,
    bin_um: bin_um_option(8) = 8,
    pool_um: Annotated[float, typer.Option("--pool-um", help="With --visium-hd: the side of a pseudo-spot in µm (default: 55, "
                                           "a Visium spot's neighbourhood).", metavar="<float>", show_default=False)] = 55.0,
    image: Image = None,
    hest: path_option("A HEST-1k folder (wsis/, st/, metadata/): every sample, or --ids.", "folder", "--hest") = None,
    ids_: text_option("With --hest: the sample ids to tile, comma-separated.", "--ids") = None,
    layer: CountsLayer = None,
    config: ConfigOpt = None,
    target_mpp: setting(TileConfig, "target_mpp", "µm/px of the patches") = None,
    patch_px: setting(TileConfig, "patch_px", "Patch side in pixels") = None,
    grid: setting(TileConfig, "grid", "Lattice without spots: hex|square") = None,
    spot_um: setting(TileConfig, "spot_um", "Grid spot diameter in µm") = None,
    pitch_um: setting(TileConfig, "pitch_um", "Grid centre-to-centre spacing in µm") = None,
    min_tissue: setting(TileConfig, "min_tissue", "Grid spots keep this tissue fraction") = None,
    tissue_threshold: setting(TissueConfig, "threshold", "Saturation cut-off 0-1 for tissue", none="Otsu") = None,
    no_images: switch("--no-images", "Store coordinates only, no pixels.") = False,
    workers: setting(TileConfig, "workers", "Patch-reading threads") = None,
    shard: ShardOpt = None,
    keep_going: KeepGoing = False,
    overwrite: Overwrite = False,
) -> None:
    """Detect tissue and cut patches at a fixed µm/px: one per spot, or on a grid over the tissue; with --visium-hd,
    training spots pooled from HD bins."""
    names = ids(sample_id)
    if len(names) > 1:
        raise HingeError("tile takes one --sample-id, for one slide", "tile one slide per call, or use --samples sheet.csv")
    tile_settings = {"target_mpp": target_mpp, "patch_px": patch_px, "grid": grid, "spot_um": spot_um, "pitch_um": pitch_um,
                     "min_tissue": min_tissue, "workers": workers, "images": False if no_images else None,
                     "tissue": {"threshold": tissue_threshold}}
    run_command("tile", lambda reporter: api.tile(
        slides or (), run=run, spots=spots, sample_id=names[0] if names else None, mpp=mpp, sheet=samples, visium=visium,
        image=image or "hires", hest=hest, ids=ids(ids_), layer=layer, visium_hd=visium_hd, bin_um=bin_um, pool_um=pool_um,
        config=config, settings={"tile": tile_settings},
        shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going, progress=reporter), Run(run).root / "tiles")


@command
def embed(
    run: RunDir = None,
    encoder: setting(EmbedConfig, "encoder", "NAME,NAME...: features concatenated in that order") = None,
    weights: Weights = None,
    views: setting(EmbedConfig, "views", "1, or 8 dihedral views (test-time augmentation)") = None,
    average_views: switch("--average-views", "With --views 8: store the mean (N, D), not every view (N, 8, D).") = False,
    batch_size: setting(EmbedConfig, "batch_size", "Items per batch (patches to embed, spots to train or predict)") = None,
    device: device_setting(EmbedConfig) = None,
    workers: setting(EmbedConfig, "workers", "Patch-reading threads") = None,
    config: ConfigOpt = None,
    list_encoders: switch("--list", "List encoders, dimensions and whether weights were found.") = False,
    import_features: path_option("TRIDENT/HEST feature .h5 files (a folder of <sample>.h5) to use instead of embedding; "
                                 "--encoder names their model.", "either", "--import-features") = None,
    patch_size_level0: ranged_option(POSITIVE, "--patch-size-level0",
                                     "With --import-features: patch side in level-0 px, when the files do not say") = None,
    shard: ShardOpt = None,
    keep_going: KeepGoing = False,
    overwrite: Overwrite = False,
) -> None:
    """Turn every tiled sample into one feature vector per spot (pathology encoders)."""
    if list_encoders:
        from hinge_cli.encoders.embedding import parse_weights
        from hinge_cli.encoders.registry import REGISTRY, weights_status

        given = parse_weights(weights or [], list(REGISTRY.values())) if weights else {}
        for spec in REGISTRY.values():
            typer.echo(f"{spec.name:12} {spec.dim:5d}  {spec.description}  [{weights_status(spec, given.get(spec.name))}]")
        return
    embed_settings = {"encoder": encoder, "views": views, "average_views": True if average_views else None,
                      "batch_size": batch_size, "device": device, "workers": workers}
    run_command("embed", lambda reporter: api.embed(
        run, weights=weights or (), import_features=import_features, patch_size_level0=patch_size_level0, config=config,
        settings={"embed": embed_settings}, shard=Shard.parse(shard), overwrite=overwrite, keep_going=keep_going,
        progress=reporter), Run(run).root / "embeddings")


@command
def pretrain_warmup(
    run: RunDir = None,
    config: ConfigOpt = None,
    backbone: setting(WarmupConfig, "backbone", "random | cellfm:CKPT | FILE.safetensors (an earlier pre-training)") = None,
    vocab: path_option("CellFM gene list (CSV, symbol first) for cellfm:CKPT.", "file", "--vocab") = None,
    corpus: Annotated[Optional[list[str]], typer.Option(
        help="Expression-only .h5ad to pre-train the backbone on; repeat, quote a glob, or give a .txt list.")] = None,
    layer: CountsLayer = None,
    holdout: text_option("Sample ids kept out of training, comma-separated.", "--holdout") = None,
    genes: GenesFile = None,
    n_genes: setting(WarmupConfig, "n_genes", "Panel size when choosing genes") = None,
    select: setting(WarmupConfig, "select", "Panel selection: hvg | hmhvg") = None,
    normalize: setting(WarmupConfig, "normalize", "total: ln(counts per 10,000 of the spot + 1), units that do not depend on "
                       "sequencing depth; none: log2(counts + 1), at the training data's depth") = None,
    fill_missing: setting(WarmupConfig, "fill_missing", "none: a panel gene missing in a sample is an error; zero: treat as 0") = None,
    feature_norm: setting(WarmupConfig, "feature_norm",
                          "slide: standardise each slide's image features by its own spots first; training: by training spots only") = None,
    val_fraction: setting(WarmupConfig, "val_fraction", "Fraction of spots for validation") = None,
    val_samples: text_option("Whole samples for validation instead, comma-separated.", "--val-samples") = None,
    warmup_epochs: setting(WarmupConfig, "epochs", "Warm-start curriculum epochs") = None,
    warmup_mask_ratio: setting(WarmupConfig, "mask_ratio", "Curriculum cap on the hidden fraction") = None,
    seed: setting(TrainConfig, "seed", "Random seed: the same seed gives the same result") = None,
    batch_size: setting(TrainConfig, "batch_size", "Items per batch (patches to embed, spots to train or predict)") = None,
    lr: setting(TrainConfig, "lr", "Peak learning rate") = None,
    device: device_setting(TrainConfig) = None,
    overwrite: Overwrite = False,
) -> None:
    """Choose the gene panel, get a backbone (CellFM, pre-training on a corpus, or random) and run the warm-start curriculum."""
    warmup = {
        "backbone": backbone, "vocab": vocab, "corpus": corpus, "holdout": ids(holdout) if holdout is not None else None,
        "genes": genes, "n_genes": n_genes, "select": select, "normalize": normalize, "fill_missing": fill_missing,
        "feature_norm": feature_norm, "val_fraction": val_fraction, "val_samples": ids(val_samples) if val_samples is not None else None,
        "epochs": warmup_epochs, "mask_ratio": warmup_mask_ratio, "corpus_layer": layer,
    }
    train_settings = {"seed": seed, "batch_size": batch_size, "lr": lr, "device": device}
    run_command("pretrain-warmup", lambda reporter: api.pretrain_warmup(
        run, config=config, settings={"warmup": warmup, "train": train_settings}, overwrite=overwrite, progress=reporter))


@command
def train(
    run: RunDir = None,
    config: ConfigOpt = None,
    epochs: setting(TrainConfig, "epochs", "Epochs") = None,
    batch_size: setting(TrainConfig, "batch_size", "Items per batch (patches to embed, spots to train or predict)") = None,
    lr: setting(TrainConfig, "lr", "Peak learning rate") = None,
    patience: setting(TrainConfig, "patience", "Early stopping: epochs without a better validation loss") = None,
    device: device_setting(TrainConfig) = None,
    overwrite: Overwrite = False,
) -> None:
    """Train on all timesteps from the warm-up; resumes from checkpoints/last, or starts again with --overwrite."""
    train_settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "patience": patience, "device": device}
    run_command("train", lambda reporter: api.train(
        run, config=config, settings={"train": train_settings}, warmup=False, overwrite=overwrite, progress=reporter))


SAMPLER_HELP = "coupled (one pass; genes drawn jointly, conditioned on --given genes) or reverse (a draw at each reveal step)"
N_SAMPLES_HELP = "Samples per spot (draws in obsm['samples'])"


@command
def calibrate(
    run: RunDir = None,
    sampler: setting(GenerateConfig, "sampler", SAMPLER_HELP) = None,
    n_samples: setting(GenerateConfig, "n_samples", N_SAMPLES_HELP) = None,
) -> None:
    """Fit a trained model's spread scale and gene coupling again (models trained before them); no retraining."""
    run_command("calibrate", lambda reporter: api.calibrate(
        run, settings={"generate": {"sampler": sampler, "n_samples": n_samples}}, progress=reporter))


@command
def eval(  # noqa: A001 - the subcommand is called eval
    pred: Annotated[list[Path], typer.Option("--pred", help="Prediction .h5ad from `hinge generate`; repeat for several slides.",
                                             exists=True, dir_okay=False)],
    truth: Annotated[list[Path], typer.Option("--truth", help="Measured counts .h5ad, one per --pred, in the same order; for a "
                                              "prediction of Visium HD bins, the HD outs/ folder.", exists=True)],
    out: path_option("Output folder (default: <run>/eval/<sample> with a run, else ./hinge-eval).", "folder", "--out",
                     exists=False) = None,
    baseline: Annotated[Optional[list[Path]], typer.Option(
        "--baseline", help="A baseline prediction of the same slide, one per --pred, reported side by side (default: the "
        "<name>.ridge.h5ad of `hinge generate --model ridge` beside each <name>.h5ad).", exists=True, dir_okay=False)] = None,
    run: Annotated[Optional[Path], typer.Option(
        "--run", help="Run directory: outputs go to <run>/eval/<sample> (default: $HINGE_RUN, else none).", file_okay=False)] = None,
    genes: GenesFile = None,
    genes_to_plot: GenesToPlot = None,
    layer: CountsLayer = None,
    no_maps: switch("--no-maps", "Write metrics and reports only, no pictures (seconds faster a slide).") = False,
    overwrite: Overwrite = False,
) -> None:
    """Score predictions against measured expression: metrics.json, report.md and maps."""
    the_run = run if run is not None else os.environ.get("HINGE_RUN") or None
    run_command("eval", lambda reporter: api.evaluate(
        pred, truth, out=out, run=the_run, genes=genes, genes_to_plot=ids(genes_to_plot), layer=layer, maps=not no_maps,
        baseline=baseline, overwrite=overwrite, progress=reporter))


@command
def view(
    pred: Annotated[Path, typer.Argument(help="Prediction .h5ad from `hinge generate`.", exists=True, dir_okay=False, show_default=False)],
    truth: path_option("Measured counts .h5ad of the same slide: adds the measured values and the error as layers.", "file",
                       "--truth") = None,
    out: path_option("The page to write (default: the prediction's name with .html).", "file", "--out", exists=False) = None,
    layer: CountsLayer = None,
    overwrite: Overwrite = False,
) -> None:
    """Write one self-contained HTML page to look at a prediction over its tissue: no server, no network."""
    page = api.view(pred, truth=truth, out=out, layer=layer, overwrite=overwrite)
    say(f"wrote {page} ({page.stat().st_size / 2**20:.1f} MB): open it in a browser")


@command
def generate(
    slides: Slides = None,
    slide: Annotated[Optional[list[Path]], typer.Option("--slide", hidden=True, exists=True, dir_okay=False)] = None,
    sample_id: SampleIds = None,
    out: path_option("Output .h5ad (one sample) or folder (<sample>.h5ad each) (default: the run's predictions/).", "either",
                     "--out", exists=False) = None,
    run: RunDir = None,
    spots: Spots = None,
    mpp: Mpp = None,
    visium: Visium = None,
    visium_hd: VisiumHD = None,
    bin_um: bin_um_option(16) = 16,
    image: Image = None,
    checkpoint: path_option("Model to use (default: the run's checkpoints/best.safetensors).", "file", "--checkpoint") = None,
    model: Annotated[str, typer.Option("--model", help="hinge, or ridge: the closed-form baseline `hinge train` fitted "
                                       "beside the checkpoint, written to <sample>.ridge.h5ad (default: hinge).")] = "hinge",
    sampler: setting(GenerateConfig, "sampler", SAMPLER_HELP) = None,
    n_samples: setting(GenerateConfig, "n_samples", N_SAMPLES_HELP) = None,
    samples: Annotated[Optional[int], typer.Option("--samples", hidden=True)] = None,
    steps: setting(GenerateConfig, "steps", "Reverse-process steps (--sampler reverse)", none="5, or the trained T if fewer") = None,
    temperature: setting(GenerateConfig, "temperature", "Scales the spread of the draws; 0 makes every draw the mean") = None,
    point: setting(GenerateConfig, "point", "X: one-shot (the mean with every gene hidden) or samples (their mean)") = None,
    calibrated: setting(GenerateConfig, "calibrated", "Widen the spread by the per-gene scale fitted on the validation section") = None,
    seed: setting(GenerateConfig, "seed", "Random seed: the same seed gives the same result") = None,
    genes_to_plot: GenesToPlot = None,
    plot: text_option("", "--plot", hidden=True) = None,
    keep_samples: setting(GenerateConfig, "keep_samples", "Store every sample in obsm['samples'] (N, S, G), for eval's CRPS and energy score") = None,
    batch_size: setting(GenerateConfig, "batch_size", "Items per batch (patches to embed, spots to train or predict)") = None,
    device: device_setting(GenerateConfig) = None,
    view: setting(GenerateConfig, "view", "Also write <sample>.html beside each prediction: the page `hinge view` writes") = None,
    weights: Weights = None,
    given: path_option("Panel completion: an .h5ad of genes measured on this slide's spots (by barcode or obsm['spatial']); "
                       "they are held fixed and the rest of the panel is generated.", "file", "--given") = None,
    given_genes: path_option("Give only the genes listed in this file (one per line) of --given.", "file", "--given-genes") = None,
    given_layer: text_option("The layer with raw counts in --given (default: X, else layers['counts']).", "--given-layer") = None,
    shard: ShardOpt = None,
    keep_going: KeepGoing = False,
    overwrite: Overwrite = False,
) -> None:
    """Predict spot expression for new slides (or tiled samples) and write AnnData files scanpy can plot; with
    --visium-hd, at every in-tissue bin of --bin-um."""
    if samples is not None:
        deprecated("generate --samples", "--n-samples")
        n_samples = samples if n_samples is None else n_samples
    if plot is not None:
        deprecated("generate --plot", "--genes-to-plot")
        genes_to_plot = plot if genes_to_plot is None else genes_to_plot
    generate_settings = {"sampler": sampler, "n_samples": n_samples, "steps": steps, "seed": seed, "batch_size": batch_size, "device": device,
                         "keep_samples": keep_samples, "temperature": temperature, "point": point, "calibrated": calibrated, "view": view}
    run_command("generate", lambda reporter: api.generate_samples(
        [*(slides or []), *(slide or [])], sample_ids=ids(sample_id), spots=spots, mpp=mpp, visium=visium,
        visium_hd=visium_hd, bin_um=bin_um, image=image or "hires", run=run, checkpoint=checkpoint, out=out, weights=weights or (),
        genes_to_plot=ids(genes_to_plot), settings={"generate": generate_settings}, shard=Shard.parse(shard),
        overwrite=overwrite, keep_going=keep_going, model=model, given=given, given_genes=given_genes, given_layer=given_layer,
        progress=reporter))


def main() -> None:
    app()
