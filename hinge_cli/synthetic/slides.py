"""Synthetic H&E slides with matching spot expression, for tests and the demo.

The slide is painted from four tissue classes (tumour, stroma, immune, fat) that
differ in nuclear density and size, eosin texture and colour, as in real H&E.
Each spot's expression is driven by what lies under it: the class fractions
switch gene modules on (co-expressed groups), nuclear density scales a
proliferation module, and sequencing depth varies from spot to spot. So a model
that reads the histology can learn real signal, and metrics can measure it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import ndimage

from hinge_cli.core.files import atomic_path, write_text_atomic
from hinge_cli.slide.writer import write_pyramidal_tiff

CLASSES = ("tumour", "stroma", "immune", "fat")
# Optical densities of haematoxylin and eosin (Ruifrok & Johnston), scaled.
OD_H = np.array([0.65, 0.70, 0.29])
OD_E = np.array([0.07, 0.99, 0.11])
# Per class: nuclei per 1000 µm², nucleus radius µm, haematoxylin and eosin strength.
NUCLEI = {"tumour": (9.0, 3.5, 1.1, 0.6), "stroma": (1.5, 2.0, 0.9, 1.1), "immune": (22.0, 2.2, 1.4, 0.3), "fat": (0.4, 2.0, 0.8, 0.35)}
BIOLOGY_SEED = 1234  # gene programmes are shared by every synthetic sample


@dataclass(frozen=True)
class SyntheticSample:
    sample_id: str
    slide: Path
    spots: Path
    mpp: float
    n_spots: int


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-9)


def _class_map(rng: np.random.Generator, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Tissue outline and class labels at full resolution, regions a few hundred µm wide."""
    low = max(size // 16, 32)
    scale = size / low
    region_sigma = 120.0 / mpp / scale
    fields = np.stack([_smooth_noise(rng, (low, low), region_sigma) for _ in CLASSES])
    yy, xx = np.mgrid[0:low, 0:low] / (low - 1) - 0.5
    edge = (xx**2 + yy**2) * 4.4 + 0.25 * _smooth_noise(rng, (low, low), low / 10)
    zoom = size / low  # smooth fields are upsampled before thresholding: boundaries stay curved
    labels = np.argmax(np.stack([ndimage.zoom(f, zoom, order=1)[:size, :size] for f in fields]), axis=0)
    outline = ndimage.zoom(edge, zoom, order=1)[:size, :size] < 1.0
    return outline, labels


def _render(rng: np.random.Generator, outline: np.ndarray, labels: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Paint H&E; returns the RGB image and the nucleus-centre map (for nuclear density)."""
    size = labels.shape[0]
    hema = np.zeros((size, size), np.float32)
    eosin = np.zeros((size, size), np.float32)
    centres = np.zeros((size, size), np.float32)
    fibres = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), (0.6 / mpp, 4.0 / mpp))
    fibres = np.abs(fibres) / (np.abs(fibres).mean() + 1e-9)
    membranes = np.abs(_smooth_noise(rng, (size, size), 12.0 / mpp).astype(np.float32))
    for k, name in enumerate(CLASSES):
        density, radius_um, h_strength, e_strength = NUCLEI[name]
        region = (labels == k) & outline
        if not region.any():
            continue
        p = density / 1000.0 * mpp**2
        points = (rng.random((size, size)) < p) & region
        centres += points
        r = max(radius_um / mpp, 1.0)
        span = int(math.ceil(r))
        y, x = np.mgrid[-span : span + 1, -span : span + 1]
        disc = ((x**2 + y**2) <= r**2).astype(np.float32)
        hema += h_strength * np.clip(ndimage.convolve(points.astype(np.float32), disc, mode="constant"), 0, 1.5)
        texture = {"stroma": fibres, "fat": (membranes < 0.15) * 3.0}.get(name, 1.0)
        eosin += region * e_strength * (0.55 + 0.45 * texture) * 0.6
    hema = ndimage.gaussian_filter(hema, 0.4)
    od = hema[..., None] * OD_H + eosin[..., None] * OD_E
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 3.0, od.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8), centres


def _spot_grid(outline: np.ndarray, mpp: float, pitch_um: float) -> tuple[np.ndarray, list[str]]:
    """Legacy-ST-like hex spot centres over the tissue, named `<col>x<row>`."""
    pitch = pitch_um / mpp
    size = outline.shape[0]
    coords, names = [], []
    for row in range(1, int(size / (pitch * math.sqrt(3) / 2))):
        for col in range(1, int(size / pitch)):
            x = (col + 0.5 * (row % 2)) * pitch
            y = row * pitch * math.sqrt(3) / 2
            if x < size and y < size and outline[int(y), int(x)]:
                coords.append((x, y))
                names.append(f"{col}x{row}")
    return np.array(coords, dtype=np.float64), names


def _gene_programme(n_genes: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Gene names, module membership (-1 = none), baseline log-rates and module loadings."""
    rng = np.random.default_rng(BIOLOGY_SEED)
    n_modules = len(CLASSES) + 1  # one per class, plus proliferation (nuclear density)
    per_module = max(2, (n_genes * 3 // 5) // n_modules)
    module = np.full(n_genes, -1)
    module[: per_module * n_modules] = np.repeat(np.arange(n_modules), per_module)
    housekeeping = ["MT-CO1", "MT-ND1", "RPL13", "RPS6"]
    names = []
    for g in range(n_genes):
        if module[g] >= 0:
            label = CLASSES[module[g]].upper() if module[g] < len(CLASSES) else "PROLIF"
            names.append(f"{label[:4]}{g:03d}")
        else:
            k = g - per_module * n_modules
            names.append(housekeeping[k] if k < len(housekeeping) else f"BG{g:03d}")
    base = rng.normal(-1.0, 1.0, n_genes)
    base[[names.index(h) for h in housekeeping if h in names]] += 3.0
    loading = np.zeros((n_genes, n_modules))
    members = module >= 0
    loading[members, module[members]] = rng.uniform(1.5, 3.0, members.sum())
    return names, module, base, loading


def _activity(fractions: np.ndarray, density: np.ndarray) -> np.ndarray:
    """The gene modules' activities: the tissue-class fractions, and proliferation from the standardised nuclear density."""
    return np.concatenate([fractions, (0.5 + 0.5 * np.tanh(density))[..., None]], axis=-1)


def _composition(log_rate: np.ndarray) -> np.ndarray:
    """Each spot's (or bin's) share of its counts per gene: the softmax of its log-rates over the last axis."""
    prob = np.exp(log_rate - log_rate.max(axis=-1, keepdims=True))
    return prob / prob.sum(axis=-1, keepdims=True)


def _expression(
    rng: np.random.Generator, spots: np.ndarray, labels: np.ndarray, centres: np.ndarray, mpp: float, spot_um: float, n_genes: int
) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    names, module, base, loading = _gene_programme(n_genes)
    r = spot_um / 2 / mpp
    span = int(math.ceil(r))
    y, x = np.mgrid[-span : span + 1, -span : span + 1]
    disc = (x**2 + y**2) <= r**2
    fractions = np.zeros((len(spots), len(CLASSES)))
    nuclei = np.zeros(len(spots))
    for i, (sx, sy) in enumerate(spots):
        ys, xs = int(sy) + y[disc], int(sx) + x[disc]
        ok = (ys >= 0) & (ys < labels.shape[0]) & (xs >= 0) & (xs < labels.shape[1])
        fractions[i] = np.bincount(labels[ys[ok], xs[ok]], minlength=len(CLASSES)) / ok.sum()
        nuclei[i] = centres[ys[ok], xs[ok]].sum()
    density = (nuclei - nuclei.mean()) / (nuclei.std() + 1e-9)
    activity = _activity(fractions, density)
    activity = activity + rng.normal(0, 0.08, activity.shape)  # shared within a module: co-expression
    log_rate = base[None] + activity @ loading.T + rng.normal(0, 0.15, (len(spots), n_genes))
    prob = _composition(log_rate)
    depth = np.exp(rng.normal(math.log(6000), 0.35, len(spots)))
    counts = rng.poisson(prob * depth[:, None]).astype(np.float32)
    obs = pd.DataFrame({f"frac_{c}": fractions[:, k] for k, c in enumerate(CLASSES)})
    obs["tissue_class"] = pd.Categorical([CLASSES[k] for k in fractions.argmax(axis=1)], categories=CLASSES)
    obs["nuclei"] = nuclei
    var = pd.DataFrame({"module": [CLASSES[m] if 0 <= m < len(CLASSES) else ("prolif" if m >= 0 else "none") for m in module]}, index=names)
    return counts, obs, var


def hd_section(rng: np.random.Generator, size_px: int, mpp: float, n_genes: int,
               umi_per_bin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.Index]:
    """A painted section and the counts of its 2 µm bins: (tissue outline, RGB, counts (rows, columns, genes), genes).

    A bin's activities are the class fractions within 12 µm of it (a cell and its neighbours) and the nuclear density
    within 25 µm, with the gene programmes of `_expression`; its depth is `umi_per_bin` on tissue, Poisson counts."""
    outline, labels = _class_map(rng, size_px, mpp)
    rgb, centres = _render(rng, outline, labels, mpp)
    per = round(2.0 / mpp)
    if per < 1 or abs(per * mpp - 2.0) > 1e-9 or size_px % per:
        raise ValueError(f"2 µm bins need a whole number of pixels at {mpp} µm/px that divides {size_px}")
    n = size_px // per

    def binned(image: np.ndarray) -> np.ndarray:
        return image.reshape(n, per, n, per).mean(axis=(1, 3))

    tissue = binned(outline.astype(np.float32))
    fractions = np.stack([ndimage.gaussian_filter(binned((labels == k) & outline), 6.0) for k in range(len(CLASSES))], axis=-1)
    fractions /= np.maximum(fractions.sum(-1, keepdims=True), 1e-6)
    nuclei = ndimage.gaussian_filter(binned(centres), 12.5)
    density = (nuclei - nuclei[tissue > 0.5].mean()) / (nuclei[tissue > 0.5].std() + 1e-9)
    names, _, base, loading = _gene_programme(n_genes)
    prob = _composition(base + _activity(fractions, density) @ loading.T)
    counts = rng.poisson(prob * (umi_per_bin * tissue)[..., None]).astype(np.int32)
    return outline, rgb, counts, pd.Index(names)


def make_synthetic_sample(
    out_dir: Path,
    sample_id: str = "synth0",
    size_px: int = 2048,
    mpp: float = 0.5,
    seed: int = 0,
    n_genes: int = 100,
    pitch_um: float = 100.0,
    spot_um: float = 55.0,
    compression: str = "jpeg",
) -> SyntheticSample:
    """Write `<sample_id>.tif` (pyramidal, µm/px in its tags) and `<sample_id>.h5ad` (raw counts)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    outline, labels = _class_map(rng, size_px, mpp)
    rgb, centres = _render(rng, outline, labels, mpp)
    slide = write_pyramidal_tiff(out_dir / f"{sample_id}.tif", rgb, mpp, compression=compression)
    spots, barcodes = _spot_grid(outline, mpp, pitch_um)
    counts, obs, var = _expression(rng, spots, labels, centres, mpp, spot_um, n_genes)
    obs.index = barcodes
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = spots
    adata.uns["synthetic"] = {"seed": seed, "mpp": mpp, "spot_um": spot_um, "pitch_um": pitch_um}
    spots_path = out_dir / f"{sample_id}.h5ad"
    with atomic_path(spots_path) as tmp:
        adata.write_h5ad(tmp)
    return SyntheticSample(sample_id, slide, spots_path, mpp, len(barcodes))


def make_synthetic_dataset(out_dir: Path, n_samples: int = 3, seed: int = 0, **kwargs: object) -> list[SyntheticSample]:
    """Several sections of the same synthetic 'patient': shared gene programmes, different tissue."""
    return [make_synthetic_sample(out_dir, f"synth{i}", seed=seed + i, **kwargs) for i in range(n_samples)]


def make_synthetic_prediction(path: Path, n_spots: int = 400, n_genes: int = 20, seed: int = 0, draws: int = 2,
                              sample: str = "synthetic") -> Path:
    """A prediction file as `hinge generate` writes it, at any size and with no model: Visium-like spots (55 µm every
    100 µm at 0.5 µm/px) over a painted tissue image, smooth values in log2(counts + 1), spread layers and draws."""
    from hinge_cli.data.expression import Transform
    from hinge_cli.formats.prediction import PredictedBatch, PredictionSpots, SpatialFrame, write_prediction

    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(n_spots))
    rows, cols = np.divmod(np.arange(n_spots), side)
    coords = np.column_stack([cols * 200.0 + (rows % 2) * 100.0 + 300, rows * 200.0 * math.sqrt(3) / 2 + 300])
    extent = coords.max(0) + 300
    scale = min(1.0, 2000 / float(extent.max()))
    shape = (int(extent[1] * scale), int(extent[0] * scale))
    tint = _smooth_noise(rng, shape, 8)[..., None]
    image = np.clip(np.array([236, 190, 222]) - 60 * tint * np.array([0.4, 1.0, 0.3]), 0, 255).astype(np.uint8)
    phase = rng.uniform(0, 2 * np.pi, (2, n_genes))
    values = (3 + np.sin(coords[:, :1] / 900 + phase[0]) + np.cos(coords[:, 1:] / 1300 + phase[1])).astype(np.float32)
    std = (0.1 + 0.08 * values).astype(np.float32)  # a model's spread follows its mean
    batch = PredictedBatch(values, std, values - 1.645 * std, values + 1.645 * std,
                           (values[:, None] + std[:, None] * rng.normal(size=(n_spots, draws, n_genes))).astype(np.float32))
    spots = PredictionSpots([f"spot{i}" for i in range(n_spots)], coords, np.ones(n_spots))
    provenance = {"transform": Transform().to_dict(), "sample_id": sample, "model": "hinge", "mpp": 0.5, "encoders": ["default"],
                  "samples": draws, "seed": seed}
    with atomic_path(Path(path)) as tmp, write_prediction(tmp, sample, spots, [f"GENE{j:03d}" for j in range(n_genes)],
                                                          SpatialFrame.of_slide(image, scale, 110.0), provenance, keep_draws=draws) as writer:
        writer.write(0, n_spots, batch)
    return Path(path)


def main(argv: list[str] | None = None) -> None:
    """`python -m hinge_cli.synthetic.slides OUT`: a demo dataset with a sample sheet and an expression-only corpus."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=4, help="sections with slide + spots")
    parser.add_argument("--corpus", type=int, default=6, help="extra expression-only sections for pre-training")
    parser.add_argument("--size", type=int, default=2048, help="slide side in pixels (0.5 µm/px)")
    args = parser.parse_args(argv)
    sections = make_synthetic_dataset(args.out, args.samples, size_px=args.size)
    rows = "".join(f"{s.sample_id},{s.slide.name},{s.spots.name},\n" for s in sections)
    write_text_atomic(args.out / "samples.csv", "sample_id,slide,spots,mpp\n" + rows)
    for i in range(args.corpus):
        make_synthetic_sample(args.out / "corpus", f"corpus{i}", size_px=args.size, seed=1000 + i, pitch_um=50)
    print(f"wrote {len(sections)} sections and {args.corpus} corpus sections to {args.out}")


if __name__ == "__main__":
    main()
