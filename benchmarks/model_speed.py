"""Speed and memory of the model core: training and sampling throughput, sampler overhead,
peak memory against panel size, and trainable parameter counts at CellFM size.

    .venv/bin/python benchmarks/model_speed.py [--device cpu|cuda] [--threads N] [--batch 32] [--repeats 5]

On CUDA the CellFM-sized `default` preset is also timed, in bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import time

import torch

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.model import Hinge, count_parameters

IMAGE_DIM = 1536  # UNI (1024) + CONCH (512), the paper's pairing
GENES = 200
CELLFM_VOCAB = 24080  # about CellFM's gene table; only the frozen total depends on it


def build(preset: str, genes: int, device: str) -> Hinge:
    cfg = load_config(preset)
    torch.manual_seed(0)
    model = Hinge.build(cfg.model, genes + 1, torch.arange(1, genes + 1), IMAGE_DIM, DiffusionConfig(steps=50))
    return model.to(device)


def autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def train_step_fn(model: Hinge, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, model.n_genes, generator=g) * 5).to(device)
    image = torch.randn(batch, IMAGE_DIM, generator=g).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = model.loss(x0, image, g)
        loss.backward()
        opt.step()

    return step


def throughput(preset: str, device: str, batch: int, repeats: int) -> None:
    model = build(preset, GENES, device)
    train = timed(train_step_fn(model, batch, device), device, repeats)
    image = torch.randn(batch, IMAGE_DIM, device=device)
    values = torch.rand(batch, GENES, device=device)
    visible = torch.rand(batch, GENES, device=device) < 0.5
    t = torch.full((batch,), 25, device=device)
    model.eval()

    @torch.no_grad()
    def forward():
        with autocast(device):
            model(values, visible, t, image)

    def generate():
        with autocast(device):
            model.generate(image, n_samples=1, steps=50)

    fwd = timed(forward, device, repeats)
    gen = timed(generate, device, max(1, repeats // 3))
    print(f"{preset:8s} train {batch / train:9.1f} spots/s (fwd+bwd+AdamW, batch {batch}, G={GENES})   "
          f"sample {batch / gen:8.1f} spots/s (T=50, 1 sample)   "
          f"sampler overhead {gen / (50 * fwd):.3f} (= sampling / (T x one forward))")


def activation_mib(genes: int, device: str, batch: int) -> float:
    """Peak CUDA memory of one training step beyond the model (CUDA), or the bytes autograd saves
    for the backward pass (CPU, where no allocator reports a peak): both grow with the panel size."""
    model = build("small", genes, device)
    step = train_step_fn(model, batch, device)
    step()  # optimiser state exists from here on, so only the step's own memory is measured
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def memory_scaling(device: str, batch: int) -> None:
    what = "peak CUDA memory" if device == "cuda" else "activations saved for backward"
    print(f"memory of one training step vs panel size (small, batch {batch}, {what}):")
    results = {genes: activation_mib(genes, device, batch) for genes in (50, 200, 1000)}
    for genes, mib in results.items():
        print(f"  G={genes:5d}: {mib:8.1f} MiB   ({mib / genes:.3f} MiB/gene)")
    ratio = ((results[1000] - results[200]) / 800) / ((results[200] - results[50]) / 150)
    print(f"  marginal MiB/gene for 200->1000 over that for 50->200: {ratio:.2f} (1.0 = linear, quadratic ~ 8)")


def parameter_counts() -> None:
    base = load_config("default").model
    print(f"trainable parameters at CellFM size (d=1536, 40 layers, vocab {CELLFM_VOCAB}; image dim {IMAGE_DIM}, G={GENES}; meta device):")
    gene_ids = torch.arange(1, GENES + 1)
    for cond_dim in (base.d_model, 256):
        for policy in ("frozen", "lora", "full"):
            cfg = dataclasses.replace(base, cond_dim=cond_dim, trainable=policy)
            with torch.device("meta"):
                model = Hinge.build(cfg, CELLFM_VOCAB, gene_ids, IMAGE_DIM)
            trainable = count_parameters(model)
            total = count_parameters(model, trainable_only=False)
            print(f"  cond_dim={cond_dim:5d} {policy:6s}: trainable {trainable / 1e6:8.1f}M of {total / 1e6:8.1f}M")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's); 1 on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    presets = ("tiny", "small", "default") if args.device == "cuda" else ("tiny", "small")
    for preset in presets:
        throughput(preset, args.device, args.batch, args.repeats)
    memory_scaling(args.device, args.batch)
    parameter_counts()


if __name__ == "__main__":
    main()
