"""Closed-form ridge on patch embeddings, leave-one-section-out: the HER2ST acceptance benchmark.

    python benchmarks/her2st/ridge.py --run RUN [--encoder default] [--samples C2,C3,C4,C5,C6]

Reads `embeddings/<encoder>/<sample>.h5` and each sample's expression `.h5ad`
(the manifest's `expression.path`) from a run that `hinge tile` and `hinge embed`
have filled. For each held-out section: the 50 most variable genes (log1p
counts) are chosen on the training sections only; features are standardised on
the training spots; the ridge penalty is chosen by an inner leave-one-section-out
over the training sections only. Reported per fold:

- pearson: mean per-gene Pearson on log1p counts,
- partial: depth-partial Pearson on CP10k-log targets (both sides regressed on
  the spot's log total counts within the held-out slide, residuals correlated),
- mse / mse_mean: MSE of the ridge and of the training-mean predictor (log1p).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hinge_cli.eval import metrics

LAMBDAS = tuple(float(v) for v in np.logspace(-3, 3, 13))


@dataclass
class Section:
    features: np.ndarray  # (N, D)
    counts: np.ndarray  # (N, G) raw counts of the genes shared by all sections
    totals: np.ndarray  # (N,) total counts over all genes of the spot


def log1p_counts(counts: np.ndarray) -> np.ndarray:
    """This benchmark's target space: natural-log counts, as the ridge acceptance test was specified."""
    return np.log1p(np.asarray(counts, dtype=np.float64))


def fit_ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardise x, centre y, solve (XᵀX + λ n I) W = Xᵀ y; returns (mu, sd, W, y_mean)."""
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = (x - mu) / sd
    y_mean = y.mean(0)
    gram = z.T @ z + lam * len(z) * np.eye(z.shape[1])
    w = np.linalg.solve(gram, z.T @ (y - y_mean))
    return mu, sd, w, y_mean


def predict_ridge(model: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mu, sd, w, y_mean = model
    return ((x - mu) / sd) @ w + y_mean


def choose_lambda(xs: list[np.ndarray], ys: list[np.ndarray], score) -> tuple[float, float]:
    """The penalty with the best mean inner leave-one-section-out score, and that score.

    Only training sections take part, so the outer held-out section never steers
    the penalty (nor, when comparing feature designs by this score, the design).
    """
    best, best_score = LAMBDAS[0], -np.inf
    for lam in LAMBDAS:
        scores = []
        for i in range(len(xs)):
            train_x = np.concatenate([x for j, x in enumerate(xs) if j != i])
            train_y = np.concatenate([y for j, y in enumerate(ys) if j != i])
            scores.append(score(predict_ridge(fit_ridge(train_x, train_y, lam), xs[i]), ys[i], i))
        if np.mean(scores) > best_score:
            best, best_score = lam, float(np.mean(scores))
    return best, best_score


def out_of_fold_residual_std(xs: list[np.ndarray], ys: list[np.ndarray], lam: float) -> np.ndarray:
    """Each gene's residual std when every training section is predicted by a fit on the others (at `lam`).

    In-sample residuals understate the error on a new section; these include the shift between sections.
    """
    residuals = []
    for i in range(len(xs)):
        train_x = np.concatenate([x for j, x in enumerate(xs) if j != i])
        train_y = np.concatenate([y for j, y in enumerate(ys) if j != i])
        residuals.append(ys[i] - predict_ridge(fit_ridge(train_x, train_y, lam), xs[i]))
    return np.sqrt(np.mean(np.concatenate(residuals) ** 2, axis=0))


def evaluate_fold(sections: dict[str, Section], test: str, n_genes: int = 50) -> dict[str, float]:
    train = [s for s in sections if s != test]
    log_train = [log1p_counts(sections[s].counts) for s in train]
    genes = metrics.top_variable(np.concatenate(log_train), n_genes)
    xs = [sections[s].features for s in train]
    ys_log = [y[:, genes] for y in log_train]
    ys_cp = [metrics.cp10k_log(sections[s].counts[:, genes], sections[s].totals) for s in train]
    depths = [np.log(np.maximum(sections[s].totals, 1.0)) for s in train]

    lam_log, inner_log = choose_lambda(xs, ys_log, lambda p, t, i: np.nanmean(metrics.pearson_per_gene(p, t)))
    lam_cp, inner_cp = choose_lambda(xs, ys_cp, lambda p, t, i: np.nanmean(metrics.depth_partial_pearson(p, t, depths[i])))

    x_all = np.concatenate(xs)
    held = sections[test]
    truth_log = log1p_counts(held.counts[:, genes])
    truth_cp = metrics.cp10k_log(held.counts[:, genes], held.totals)
    pred_log = predict_ridge(fit_ridge(x_all, np.concatenate(ys_log), lam_log), held.features)
    pred_cp = predict_ridge(fit_ridge(x_all, np.concatenate(ys_cp), lam_cp), held.features)
    train_mean = np.concatenate(ys_log).mean(0, keepdims=True)
    return {
        "pearson": float(np.nanmean(metrics.pearson_per_gene(pred_log, truth_log))),
        "partial": float(np.nanmean(metrics.depth_partial_pearson(pred_cp, truth_cp, np.log(np.maximum(held.totals, 1.0))))),
        "mse": metrics.mse(pred_log, truth_log),
        "mse_mean": metrics.mse(np.broadcast_to(train_mean, truth_log.shape), truth_log),
        "inner_pearson": inner_log,
        "inner_partial": inner_cp,
        "lambda_log": lam_log,
        "lambda_cp": lam_cp,
        "n_spots": len(held.features),
    }


def evaluate(sections: dict[str, Section], n_genes: int = 50) -> dict[str, dict[str, float]]:
    return {test: evaluate_fold(sections, test, n_genes) for test in sections}


def load_run(run_dir: Path, encoder: str, samples: list[str]) -> dict[str, Section]:
    """Embeddings and expression of `samples` from a run, rows matched by barcode, shared genes only."""
    import anndata as ad
    import h5py

    from hinge_cli.run.directory import Run

    run = Run(run_dir)
    loaded = {}
    for sample in samples:
        with h5py.File(run.embeddings(encoder, sample), "r") as f:
            feats = f["embeddings"][:]
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in f["barcodes"][:]]
        if feats.ndim == 3:  # (N, V, D) views kept for training: the benchmark uses their mean
            feats = feats.mean(1)
        adata = ad.read_h5ad(run.sample(sample)["expression"]["path"])
        adata = adata[barcodes]
        counts = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=np.float64)
        loaded[sample] = (feats.astype(np.float64), counts, list(adata.var_names))
    shared = sorted(set.intersection(*(set(v[2]) for v in loaded.values())))
    out = {}
    for sample, (feats, counts, names) in loaded.items():
        index = {g: i for i, g in enumerate(names)}
        out[sample] = Section(feats, counts[:, [index[g] for g in shared]], counts.sum(1))
    return out


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'section':8} {'spots':>5} {'pearson':>8} {'partial':>8} {'mse':>7} {'mse_mean':>8} {'beats':>5}  inner-CV pearson/partial"]
    for name, r in results.items():
        beats = "yes" if r["mse"] < r["mse_mean"] else "NO"
        lines.append(
            f"{name:8} {r['n_spots']:5d} {r['pearson']:8.4f} {r['partial']:8.4f} {r['mse']:7.4f} {r['mse_mean']:8.4f} {beats:>5}  {r['inner_pearson']:.4f}/{r['inner_partial']:.4f}"
        )
    mean = {k: np.mean([r[k] for r in results.values()]) for k in ("pearson", "partial", "mse", "mse_mean", "inner_pearson", "inner_partial")}
    lines.append(
        f"{'mean':8} {'':5} {mean['pearson']:8.4f} {mean['partial']:8.4f} {mean['mse']:7.4f} {mean['mse_mean']:8.4f} {'':5}"
        f"  {mean['inner_pearson']:.4f}/{mean['inner_partial']:.4f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--encoder", default="default")
    parser.add_argument("--samples", default="C2,C3,C4,C5,C6")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--json", type=Path, help="Also write the per-fold results here.")
    args = parser.parse_args(argv)
    sections = load_run(args.run, args.encoder, args.samples.split(","))
    results = evaluate(sections, args.genes)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
