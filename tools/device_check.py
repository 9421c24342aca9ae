"""The whole pipeline on one device, checked and timed: what `tools/device_check.sh` runs.

    python tools/device_check.py [--device cuda|cpu] [--size full|tiny] [--work DIR] [--report docs/gpu.md]

Synthetic sections go through the real command line with `--device`: tile, embed (the default encoder,
and a random-initialised UNI-architecture ViT-L/16 through `--weights`), pretrain-warmup and train,
train again under `torchrun --nproc-per-node 1`, generate with both samplers, eval. It asserts that
bf16 ViT features match fp32 on the same patches (cosine >= 0.999 each), that generate on this device
matches the CPU for the same seed, and that the training loss goes down. Then it writes a report:
patches/s of the ViT-L/16 from the tiles file at batch 64 and 256, spots/s of the default encoder,
training steps/s and peak memory at `small` (and `default` on a GPU), sampling spots/s of each sampler,
the device and torch version. `--size tiny` (the default on the CPU) keeps everything small enough for
CI; its numbers check the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hinge_cli.core import devices
from hinge_cli.config import GenerateConfig
from hinge_cli.encoders.registry import ARCHS, build_encoder
from hinge_cli.encoders.vit import VisionTransformer
from hinge_cli.formats.embeddings import read_embeddings
from hinge_cli.formats.tiles import read_tile_images
from hinge_cli.predict.trained import load_trained_model
from hinge_cli.stages.predictors import hinge_predictor
from hinge_cli.run.directory import Run
from hinge_cli.synthetic.slides import make_synthetic_dataset, make_synthetic_sample

HELD_OUT = "synth2"


@dataclass(frozen=True)
class Size:
    slide_px: int  # synthetic training sections (0.5 µm/px)
    vit_slide_px: int  # the slide the ViT embeds
    vit_pitch_um: float  # its grid's spacing
    preset: str
    epochs: int
    sampling_spots: int
    vit_batches: tuple[int, ...]
    default_preset: bool  # also time training at the CellFM-sized `default`


SIZES = {"full": Size(2048, 5120, 30.0, "small", 4, 20000, (64, 256), True),
         "tiny": Size(768, 768, 150.0, "tiny", 3, 64, (4,), False)}


class Check:
    """The figures and the pass/fail lines of the report, as they come."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.failed: list[str] = []

    def figure(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name}: {value}", flush=True)

    def require(self, ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failed.append(what)


def hinge(*args: str, torchrun: Path | None = None) -> float:
    """Run `hinge ARGS`, or under torchrun for the run `torchrun` (given as HINGE_RUN: torchrun's own parser
    would take `--run` for its `--run-path`); the wall seconds."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun else [sys.executable]
    env = {**os.environ, "HINGE_RUN": str(torchrun)} if torchrun else None
    print(("$ HINGE_RUN=%s torchrun --standalone --nproc-per-node 1 -m hinge_cli " % torchrun if torchrun else "$ hinge ") + " ".join(args), flush=True)
    started = time.perf_counter()
    subprocess.run([*launcher, "-m", "hinge_cli", *args, "-q"], check=True, env=env)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if devices.is_cuda(device):
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if devices.is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def random_uni(path: Path) -> Path:
    """A UNI-architecture ViT-L/16 state dict with random weights (speed does not depend on the values)."""
    torch.manual_seed(0)
    state = {k: torch.randn(v.shape) * 0.02 for k, v in VisionTransformer(ARCHS["uni"]).state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def vit_checks(check: Check, work: Path, size: Size, device: str) -> None:
    run = work / "vit-run"
    slide = make_synthetic_sample(work / "vit-slide", "vit", size_px=size.vit_slide_px, seed=5).slide
    hinge("tile", str(slide), "--run", str(run), "--pitch-um", str(size.vit_pitch_um), "--workers", str(min(16, os.cpu_count() or 1)), "--overwrite")
    tiles = Run(run).tiles("vit")
    started = time.perf_counter()
    n = sum(len(p) for _, p in read_tile_images(tiles, 256))
    check.figure("reading 224 px patches from the tiles file", f"{n / (time.perf_counter() - started):,.0f} patches/s ({n} patches)")
    weights = random_uni(work / "uni.safetensors")
    for batch in size.vit_batches:
        hinge("embed", "--run", str(run), "--encoder", "uni", "--weights", f"uni={weights}", "--batch-size", str(batch),
              "--device", device, "--overwrite")
        record = Run(run).stage("vit", "embed:uni")
        check.figure(f"ViT-L/16 (UNI architecture) end to end from the tiles file, batch {batch}",
                     f"{record['n_spots'] / record['seconds']:,.0f} patches/s ({record['n_spots']} patches in {record['seconds']:.1f} s)")
    encoder = build_encoder("uni", weights, device)
    patches = next(read_tile_images(tiles, 32))[1]
    reset_peak(encoder.device)
    mixed = encoder([patches])[:, 0] if devices.is_cuda(encoder.device) else _cpu_bf16(encoder, patches)
    check.figure("ViT-L/16 peak memory", f"{devices.peak_memory_mb(encoder.device):,.0f} MiB")
    full = replace(encoder, spec=replace(encoder.spec, autocast=False))([patches])[:, 0]
    cosine = (mixed * full).sum(1) / (np.linalg.norm(mixed, axis=1) * np.linalg.norm(full, axis=1))
    check.require(bool(cosine.min() >= 0.999), f"bf16 ViT-L/16 features against fp32: cosine per patch >= 0.999 (min {cosine.min():.5f})")


def _cpu_bf16(encoder, patches: np.ndarray) -> np.ndarray:
    """The CPU has no bf16 autocast in hinge; the comparison still checks what bf16 does to the features."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return encoder([patches])[:, 0]


def training_figures(check: Check, run: Path, label: str) -> list[float]:
    records = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "train_loss" in r]
    steps = [b["step"] - a["step"] for a, b in zip([{"step": 0}, *epochs[:-1]], epochs, strict=True)]
    rate = sum(steps[1:]) / sum(r["seconds"] for r in epochs[1:]) if len(epochs) > 1 else steps[0] / epochs[0]["seconds"]
    check.figure(f"training at {label}", f"{rate:,.1f} steps/s (after the first epoch), peak memory {max(r['peak_memory_mb'] for r in epochs):,.0f} MiB")
    return [r["train_loss"] for r in epochs]


def sampling_speed(check: Check, run: Run, device: str, spots: int) -> None:
    """Spots/s of each sampler alone (features in memory), and its peak memory at a quarter and all of `spots`."""
    model = load_trained_model(run.checkpoint("best"), device)
    rows = read_embeddings(run.embeddings(model.key, HELD_OUT)).features
    rows = np.resize(rows, (spots, *rows.shape[1:]))
    for sampler in ("coupled", "reverse"):
        cfg = GenerateConfig(sampler=sampler, device=device)
        predict = hinge_predictor(model, cfg).predict
        predict(rows[:1], 0, 1)  # warm-up
        peaks = []
        for n in (spots // 4, spots):
            reset_peak(model.device)
            synchronize(model.device)
            started = time.perf_counter()
            for start in range(0, n, cfg.batch_size):
                stop = min(n, start + cfg.batch_size)
                predict(rows[start:stop], start, stop)
            synchronize(model.device)
            seconds = time.perf_counter() - started
            peaks.append(devices.peak_memory_mb(model.device))
        check.figure(f"generate, {sampler} sampler, sampling alone ({cfg.n_samples} draws, {len(model.genes)} genes)",
                     f"{spots / seconds:,.0f} spots/s; peak memory {peaks[0]:,.0f} MiB at {spots // 4} spots, {peaks[1]:,.0f} MiB at {spots}")


def pipeline(check: Check, work: Path, size: Size, device: str) -> None:
    data, run = work / "data", work / "run"
    make_synthetic_dataset(data, 3, size_px=size.slide_px)
    sheet = data / "samples.csv"
    sheet.write_text("sample_id,slide,spots\n" + "".join(f"synth{i},{data / f'synth{i}.tif'},{data / f'synth{i}.h5ad'}\n" for i in range(3)))
    hinge("tile", "--samples", str(sheet), "--run", str(run), "--config", size.preset)
    seconds = hinge("embed", "--run", str(run), "--device", device)
    spots = sum(Run(run).stage(f"synth{i}", "embed:default")["n_spots"] for i in range(3))
    embedded = sum(Run(run).stage(f"synth{i}", "embed:default")["seconds"] for i in range(3))
    check.figure("default encoder", f"{spots / embedded:,.1f} spots/s ({spots} spots; the command took {seconds:.1f} s)")
    hinge("pretrain-warmup", "--run", str(run), "--holdout", HELD_OUT, "--n-genes", "50", "--device", device)
    hinge("train", "--run", str(run), "--epochs", str(size.epochs), "--device", device)
    losses = training_figures(check, run, size.preset)
    check.require(losses[-1] < losses[0], f"training loss goes down ({losses[0]:.4f} -> {losses[-1]:.4f})")
    hinge("train", "--epochs", str(size.epochs), "--device", device, "--overwrite", torchrun=run)
    torchrun_losses = [json.loads(line)["train_loss"] for line in (run / "logs" / "train.jsonl").read_text().splitlines() if "train_loss" in line]
    check.require(len(torchrun_losses) == size.epochs, f"train under torchrun --nproc-per-node 1 ran {len(torchrun_losses)} epochs")
    predictions = {}
    for sampler in ("coupled", "reverse"):
        out = work / f"{sampler}.h5ad"
        hinge("generate", "--run", str(run), "--sample-id", HELD_OUT, "--sampler", sampler, "--device", device, "--out", str(out), "--overwrite")
        predictions[sampler] = out
    on_cpu = work / "coupled-cpu.h5ad"
    hinge("generate", "--run", str(run), "--sample-id", HELD_OUT, "--device", "cpu", "--out", str(on_cpu), "--overwrite")
    import anndata as ad

    here, cpu = ad.read_h5ad(predictions["coupled"]).X, ad.read_h5ad(on_cpu).X
    worst = float(np.abs(here - cpu).max())
    check.require(worst <= 0.1 * float(cpu.std()), f"generate on {device} against the CPU, same seed: max abs difference {worst:.4f} "
                  f"(allowed: a tenth of the prediction's std, {0.1 * float(cpu.std()):.4f})")
    hinge("eval", "--pred", str(predictions["coupled"]), "--truth", str(data / f"{HELD_OUT}.h5ad"), "--run", str(run))
    check.require((run / "eval" / HELD_OUT / "metrics.json").exists(), "eval wrote metrics.json")
    sampling_speed(check, Run(run), device, size.sampling_spots)
    if size.default_preset:
        big = work / "run-default"
        hinge("tile", "--samples", str(sheet), "--run", str(big), "--config", "default")
        hinge("embed", "--run", str(big), "--device", device)
        hinge("pretrain-warmup", "--run", str(big), "--holdout", HELD_OUT, "--n-genes", "50", "--backbone", "random",
              "--warmup-epochs", "1", "--device", device)
        hinge("train", "--run", str(big), "--epochs", "2", "--device", device)
        training_figures(check, big, "default (CellFM 1536x40, random backbone)")


def fresh_work(work: Path) -> None:
    """An empty scratch folder: one this script made before (it holds .device-check) is emptied, anything else refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / ".device-check").exists():
            sys.exit(f"device check: {work} is not empty and was not made by this script; give --work a new folder")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".device-check").touch()


def report(check: Check, device: torch.device, size: str, seconds: float) -> str:
    name = torch.cuda.get_device_name(device) if devices.is_cuda(device) else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = ["# hinge on a GPU: the device check", "",
             f"Measured by `tools/device_check.sh --device {device.type}` (size {size}), {time.strftime('%Y-%m-%d')}, in {seconds:.0f} s.", "",
             f"- device: {name}", f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", "",
             "| what | figure |", "|---|---|", *[f"| {a} | {b} |" for a, b in check.rows], "",
             "Checks: " + ("all passed." if not check.failed else "FAILED: " + "; ".join(check.failed))]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: full on a GPU, tiny on the CPU")
    parser.add_argument("--work", type=Path, default=Path("device-check"))
    parser.add_argument("--report", type=Path, help="where the report goes (default: WORK/gpu.md)")
    args = parser.parse_args()
    device = devices.resolve_device(args.device)
    size = args.size or ("full" if devices.is_cuda(device) else "tiny")
    fresh_work(args.work)
    started, check = time.perf_counter(), Check()
    print(f"device check on {device} ({size}), torch {torch.__version__}", flush=True)
    pipeline(check, args.work, SIZES[size], args.device)
    vit_checks(check, args.work, SIZES[size], args.device)
    text = report(check, device, size, time.perf_counter() - started)
    out = args.report or args.work / "gpu.md"
    out.write_text(text)
    print(f"\n{text}\nreport: {out}")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
