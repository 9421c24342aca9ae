"""Patches per second and peak memory of the encoders, across batch sizes.

    python benchmarks/embed_speed.py [--device cpu|cuda] [--batch-sizes 1,8,32] [--seconds 5]

Encoders: the weight-free default, and ViT-B/16 and ViT-L/16 (UNI's architecture)
at random init, which run exactly as fast as with real weights. Each
configuration runs in its own process so that peak memory (max RSS on CPU,
max allocated on CUDA) is that configuration's alone. On CUDA, fp32 and bf16
autocast are both measured. Preprocessing (resize, normalisation, views) is
included; reading patches from disk is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from hinge_cli.encoders import ARCHS, REGISTRY, Encoder, Field, get_spec, resolve_device
from hinge_cli.encoders.vit import VisionTransformer

VIT_B16 = ARCHS["uni"].scaled(embed_dim=768, depth=12, num_heads=12)


def make_encoder(name: str, device: str, bf16: bool) -> Encoder:
    if name == "default":
        spec = get_spec("default")
        return Encoder(spec, spec.build(), resolve_device(device))
    arch = VIT_B16 if name == "vit-b16" else ARCHS["uni"]
    spec = dataclasses.replace(REGISTRY["uni"], name=name, dim=arch.out_dim, fields=(Field(224),), autocast=bf16)
    return Encoder(spec, VisionTransformer(arch), resolve_device(device))


def measure(name: str, device: str, batch: int, bf16: bool, seconds: float) -> dict:
    torch.manual_seed(0)
    encoder = make_encoder(name, device, bf16)
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
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"encoder": name, "device": device, "precision": "bf16" if bf16 else "fp32", "batch": batch,
            "patches_per_s": n / elapsed, "peak_mib": peak, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--encoders", default="default,vit-b16,vit-l16")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))))
        return 0
    device = str(resolve_device(args.device))
    precisions = [False, True] if device.startswith("cuda") else [False]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'encoder':10} {'prec':5} {'batch':>5} {'patches/s':>10} {'peak MiB':>9}")
    for name in args.encoders.split(","):
        for bf16 in precisions:
            if name == "default" and bf16:
                continue
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                job = json.dumps({"name": name, "device": device, "batch": batch, "bf16": bf16, "seconds": args.seconds})
                done = subprocess.run([sys.executable, __file__, "--one", job], capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{name:10} {'bf16' if bf16 else 'fp32':5} {batch:5d} failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                r = json.loads(done.stdout)
                print(f"{name:10} {r['precision']:5} {batch:5d} {r['patches_per_s']:10.1f} {r['peak_mib']:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
