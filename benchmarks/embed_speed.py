"""Patches per second and peak memory of the encoders.

    python benchmarks/embed_speed.py [--device cpu|cuda] [--batch-sizes 1,8,32] [--seconds 5] [--slide-px 4096]

ViT-B/16 and ViT-L/16 (UNI's architecture) run at random init, which is exactly
as fast as with real weights, on batches of patches across batch sizes;
preprocessing (resize, normalisation, views) is included, reading patches from
disk is not. The weight-free default encoder runs as `hinge embed` runs it:
over every spot of a whole synthetic slide (`--slide-px` square at 0.5 µm/px,
spots every `--pitch-um`), its tiles read from the slide and its block maps
pooled per spot, so its figure is spots per second, reading included, and does
not depend on a batch size. Each configuration runs in its own process so that
peak memory (max RSS on CPU, max allocated on CUDA) is that configuration's
alone. On CUDA, fp32 and bf16 autocast are both measured for the ViTs (the
default encoder's statistics stay fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hinge_cli.core.devices import resolve_device
from hinge_cli.encoders.embedding import read_plan_tiles
from hinge_cli.encoders.registry import ARCHS, REGISTRY, Encoder, Field, build_encoder
from hinge_cli.encoders.vit import VisionTransformer
from hinge_cli.slide.reader import open_slide
from hinge_cli.synthetic.slides import make_synthetic_sample

VIT_B16 = ARCHS["uni"].scaled(embed_dim=768, depth=12, num_heads=12)


def make_vit(name: str, device: str, bf16: bool) -> Encoder:
    arch = VIT_B16 if name == "vit-b16" else ARCHS["uni"]
    spec = dataclasses.replace(REGISTRY["uni"], name=name, dim=arch.out_dim, fields=(Field(224),), autocast=bf16, preprocess=None)
    return Encoder(spec, VisionTransformer(arch), resolve_device(device))


def peak_mib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, device: str, batch: int, bf16: bool, seconds: float) -> dict:
    """A ViT on random uint8 batches, repeated for `seconds`."""
    torch.manual_seed(0)
    encoder = make_vit(name, device, bf16)
    rng = np.random.default_rng(0)
    fields = [torch.from_numpy(rng.integers(0, 256, (batch, f.px, f.px, 3), dtype=np.uint8)) for f in encoder.spec.fields]
    encoder(fields)  # warm-up: kernel selection, allocator
    cuda = encoder.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n, start = 0, time.perf_counter()
    while True:
        encoder(fields)
        n += batch
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"encoder": name, "device": device, "precision": "bf16" if bf16 else "fp32", "batch": str(batch),
            "patches_per_s": n / elapsed, "peak_mib": peak_mib(cuda), "threads": torch.get_num_threads()}


def make_slide(folder: str, slide_px: int, pitch_um: float) -> dict:
    """A synthetic slide with spots, made once in a process of its own (Linux carries peak RSS across fork + exec)."""
    import anndata as ad

    sample = make_synthetic_sample(Path(folder), "bench", size_px=slide_px, mpp=0.5, seed=0, pitch_um=pitch_um)
    centres = Path(folder) / "centres.npy"
    np.save(centres, np.asarray(ad.read_h5ad(sample.spots).obsm["spatial"], dtype=np.float64))
    return {"slide": str(sample.slide), "centres": str(centres)}


def measure_slide(device: str, slide: str, centres: str, workers: int) -> dict:
    """The default encoder over every spot of one slide, as `hinge embed` runs it (tile reads included)."""
    points = np.load(centres)
    encoder = build_encoder("default", device=device)
    cuda = encoder.device.type == "cuda"
    with open_slide(slide) as wsi:
        read = lambda f, p: read_plan_tiles(wsi, f, p, workers)
        if cuda:  # warm-up: kernel selection, allocator
            encoder.encode_slide(encoder.plan_slide(points[:1], wsi.mpp), read)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        feats = encoder.encode_slide(encoder.plan_slide(points, wsi.mpp), read)
        elapsed = time.perf_counter() - start
    assert feats.shape == (len(points), 1, encoder.dim)
    return {"encoder": "default", "device": device, "precision": "fp32", "batch": f"{len(points)} spots",
            "patches_per_s": len(points) / elapsed, "peak_mib": peak_mib(cuda), "threads": torch.get_num_threads()}


def run_one(job: dict) -> dict | str:
    """`job` in a fresh process: keyword arguments of make_slide ("folder"), measure_slide ("slide") or measure."""
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1]}"
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoders", default="default,vit-b16,vit-l16")
    parser.add_argument("--batch-sizes", default="1,8,32", help="for the ViTs")
    parser.add_argument("--seconds", type=float, default=5.0, help="per ViT configuration")
    parser.add_argument("--slide-px", type=int, default=4096, help="default encoder: synthetic slide side at 0.5 µm/px")
    parser.add_argument("--pitch-um", type=float, default=100.0, help="default encoder: spot spacing (Visium: 100)")
    parser.add_argument("--workers", type=int, default=2, help="default encoder: tile-reading threads")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        work = make_slide if "folder" in job else measure_slide if "slide" in job else measure
        print(json.dumps(work(**job)))
        return 0
    device = str(resolve_device(args.device))
    precisions = [False, True] if device.startswith("cuda") else [False]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'encoder':10} {'prec':5} {'batch':>10} {'patches/s':>10} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.encoders.split(","):
            if name == "default":
                made = run_one({"folder": tmp, "slide_px": args.slide_px, "pitch_um": args.pitch_um})
                if isinstance(made, str):
                    print(f"synthetic slide {made}")
                    continue
                jobs = [{"device": device, "workers": args.workers, **made}]
            else:
                jobs = [{"name": name, "device": device, "batch": int(b), "bf16": bf16, "seconds": args.seconds}
                        for bf16 in precisions for b in args.batch_sizes.split(",")]
            for job in jobs:
                r = run_one(job)
                if isinstance(r, str):
                    print(f"{name:10} {'bf16' if job.get('bf16') else 'fp32':5} {job.get('batch', 'slide')!s:>10} {r}")
                    continue
                print(f"{name:10} {r['precision']:5} {r['batch']:>10} {r['patches_per_s']:10.1f} {r['peak_mib']:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
