"""Speed and memory of `hinge generate` on synthetic slides.

    .venv/bin/python benchmarks/generate_speed.py [--device cpu|cuda] [--threads N] [--genes 200]
        [--slide-px 1024] [--memory-spots 1000,4000,16000] [--memory-samples 1] [--no-speed] [--no-memory]

Speed: a new slide goes through tile + embed (the weight-free default encoder) once, then
each sampler runs on the cached features: the reverse process for each (steps, samples), the
coupled sampler (one forward pass; steps do not apply) for each samples. End to end
= spots / (tile + embed + generate); "sampling" = spots / generate alone (model load, sampling
and writing the .h5ad). The model is an untrained `small` HINGE (speed does not depend on the
weights); on CUDA the CellFM-sized `default` preset is timed too, in bf16 autocast.

Memory: peak RSS (VmHWM) of one process that tiles a slide, stores stand-in features (the default
encoder at 16k spots would take hours on a laptop CPU) and runs `generate`, at spot counts
that grow 4x on the same slide (a finer grid). It should stay flat: predictions stream to disk.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import GenerateConfig, load_config
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import FeatureNorm
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders.registry import get_spec
from hinge_cli.formats.embeddings import EmbeddingAttrs, write_embeddings
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.model import Hinge, save_checkpoint
from hinge_cli.model.card import EmbedSettings, GeneCorrelation, ModelCard, TileSettings
from hinge_cli.model.sampler import sampling_steps
from hinge_cli.predict.trained import load_trained_model
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.stages.generate import Target, generate
from hinge_cli.synthetic.slides import make_synthetic_sample

MPP = 0.5
SPEED_GRID = [("reverse", 50, 1), ("reverse", 50, 8), ("reverse", 10, 8), ("reverse", 5, 8), ("reverse", 1, 16),
              ("coupled", None, 8), ("coupled", None, 32)]  # (sampler, steps, samples); generate's default is marked
MEMORY_SLIDE_UM = 4096  # one 4 mm slide; the grid pitch sets the spot count


def make_checkpoint(path: Path, preset: str, genes: int, pitch_um: float = 100.0, spot_um: float = 55.0) -> Path:
    """An untrained HINGE model for the default encoder, with the sidecar `generate` reads."""
    cfg = load_config(preset)
    dim = get_spec("default").dim
    torch.manual_seed(0)
    model = Hinge.build(cfg.model, genes + 1, torch.arange(1, genes + 1), dim, cfg.diffusion)
    card = ModelCard("benchmark", genes=[f"G{i:04d}" for i in range(genes)], transform=Transform(), encoders=["default"],
                     encoder_key="default", feature_norm=FeatureNorm(np.zeros(dim, np.float32), np.ones(dim, np.float32), per_slide=True),
                     tiling=TileSettings(0.5, 224, MPP, spot_um, pitch_um, "hex"), embedding=EmbedSettings(weights_sha256=[None]),
                     config=cfg, coupling=GeneCorrelation((np.eye(genes) * 0.5 + 0.5).tolist(), [], 0, 0.05))
    save_checkpoint(path, model, card)
    return path


def speed(preset: str, device: str, genes: int, size_px: int, root: Path) -> None:
    checkpoint = make_checkpoint(root / f"{preset}.safetensors", preset, genes)
    slide = make_synthetic_sample(root / "slides", "speed", size_px=size_px, mpp=MPP, seed=1).slide
    run = Run(root / f"run-{preset}")
    started = time.perf_counter()
    generate(run, [Target("speed", slide)], GenerateConfig(n_samples=1, steps=1, device=device), checkpoint=checkpoint,
             out=root / "first.h5ad")
    first = time.perf_counter() - started
    inputs = run.stage("speed", "tile")["seconds"] + run.stage("speed", "embed:default")["seconds"]
    n = run.stage("speed", "tile")["n_spots"]
    print(f"\n{preset} on {device} ({'bf16 autocast' if device == 'cuda' else 'fp32'}), {genes} genes, {n} grid spots; "
          f"tile + embed {inputs:.1f}s ({n / inputs:.2f} spots/s), first call {first:.1f}s")
    print(f"{'sampler':>8} {'steps':>5} {'samples':>7} {'generate s':>10} {'sampling spots/s':>16} {'end-to-end spots/s':>18}")
    default, trained_steps = GenerateConfig(), load_config(preset).diffusion.steps
    for sampler, steps, samples in SPEED_GRID:
        t0 = time.perf_counter()
        generate(run, [Target("speed")], GenerateConfig(sampler=sampler, n_samples=samples, steps=steps, device=device),
                 checkpoint=checkpoint, out=root / "speed.h5ad", overwrite=True)
        seconds = time.perf_counter() - t0
        chosen = (default.sampler, default.n_samples) == (sampler, samples)
        mark = "  <- default" if chosen and (sampler == "coupled" or sampling_steps(default.steps, trained_steps) == steps) else ""
        print(f"{sampler:>8} {steps or '-':>5} {samples:7d} {seconds:10.1f} {n / seconds:16.2f} {n / (inputs + seconds):18.2f}{mark}")


def memory_child(root: Path, pitch_um: float, genes: int, samples: int) -> None:
    """Tile, stand-in features, generate; print spots and peak RSS as JSON (runs in its own process)."""
    checkpoint = make_checkpoint(root / f"mem-{pitch_um}.safetensors", "tiny", genes, pitch_um, pitch_um / 2)
    slide = root / "slides" / "memory.tif"
    run = Run(root / f"run-mem-{pitch_um}")
    tile_sample(run, SampleSpec("mem", slide), load_trained_model(checkpoint, "cpu").tile_config())
    dim = get_spec("default").dim
    path = run.embeddings("default", "mem")
    path.parent.mkdir(parents=True)
    tiles = read_tiles(run.tiles("mem"))
    n = len(tiles.barcodes)
    attrs = EmbeddingAttrs("default", ["default"], [dim], [None], [None], sample_id="mem", tiles=str(run.tiles("mem").resolve()))
    rng = np.random.default_rng(0)
    with write_embeddings(path, attrs, tiles.barcodes, tiles.coords, (n, dim)) as writer:
        for start in range(0, n, 4096):
            stop = min(n, start + 4096)
            writer.write(rng.normal(0, 1, (stop - start, dim)).astype(np.float32), rows=slice(start, stop))
    t0 = time.perf_counter()
    generate(run, [Target("mem")], GenerateConfig(n_samples=samples, steps=1, device="cpu"), checkpoint=checkpoint,
             out=root / f"mem-{pitch_um}.h5ad")
    print(json.dumps({"spots": n, "peak_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}))


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM, because ru_maxrss of a child started by vfork/fork + exec
    starts from the parent's peak (here the speed runs'); getrusage elsewhere."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))


def memory(root: Path, targets: list[int], genes: int, samples: int) -> None:
    size_px = int(MEMORY_SLIDE_UM / 2.0)
    make_synthetic_sample(root / "slides", "memory", size_px=size_px, mpp=2.0, seed=2, n_genes=10)
    tissue_um2 = 0.6 * MEMORY_SLIDE_UM**2  # about the synthetic outline's share of the slide
    print(f"\npeak RSS of tile + generate (tiny model, {genes} genes, {samples} samples, 1 step), one {MEMORY_SLIDE_UM} µm slide")
    print(f"{'target':>7} {'spots':>7} {'peak MB':>8} {'generate s':>10}")
    for target in targets:
        pitch = float(np.sqrt(tissue_um2 / target / (np.sqrt(3) / 2)))
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(root), str(pitch), str(genes), str(samples)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"memory run at {target} spots failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{target:7d} {result['spots']:7d} {result['peak_mb']:8.0f} {result['seconds']:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--slide-px", type=int, default=1024, help="side of the speed slide at 0.5 µm/px (1024: ~20 grid spots)")
    parser.add_argument("--memory-spots", default="1000,4000,16000")
    parser.add_argument("--memory-samples", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--memory-child", nargs=4, metavar=("ROOT", "PITCH", "GENES", "SAMPLES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        root, pitch, genes, samples = args.memory_child
        memory_child(Path(root), float(pitch), int(genes), int(samples))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if not args.no_speed:
            speed("small", "cpu", args.genes, args.slide_px, root)
            if args.device == "cuda":
                speed("default", "cuda", args.genes, args.slide_px, root)
        if not args.no_memory:
            memory(root, [int(x) for x in args.memory_spots.split(",")], args.genes, args.memory_samples)


if __name__ == "__main__":
    main()
