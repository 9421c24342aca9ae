"""Panel completion on HER2ST: give k measured genes of the held-out section, score the other genes.

    python benchmarks/her2st/completion.py --bench bench-out/her2st-v3 --out bench-out/her2st-v3/completion.md
    python benchmarks/her2st/completion.py --folds C2 --ks 10 --n-samples 2      # a smoke run of one fold

Takes the fold runs benchmark.py trained (`<bench>/folds/hvg50/<fold>/hinge/seed<N>`, N < --model-seeds; each best
checkpoint never saw `<fold>`). For k = 5, 10 and 25 of the 50 panel genes, chosen at random
(a fixed seed) or as the most variable on the four training sections, the held-out section's
true values of those genes are given, and every method is scored by `hinge eval`'s alignment and
metrics on the OTHER genes only (the predictions mark the given genes, which eval never scores):

- HINGE with no gene given (image only), and HINGE given the k genes (`generate --given`'s path, the
  image weighed by how well it predicts the given genes on the section); beside it the same with the
  image's weight from training alone (before the slide's own check);
- ridge on the image features, ridge on the image features plus the k given genes, and ridge on
  the k given genes alone (`generate --model ridge --given`'s genes-only baseline), refitted per k
  on the training sections (penalty by inner leave-one-section-out, as benchmark.py's ridge);
- kNN imputation: the mean of the training spots nearest in the given genes (standardised), the
  neighbours' profiles as its draws; k neighbours chosen by inner leave-one-section-out.

Nothing is written into the fold runs. Prints a markdown table (mean ± std over folds of the
remaining genes' depth-partial Pearson and CRPS) and writes it, with per-fold numbers as JSON, to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from benchmark import SECTIONS, BaselineInputs, run_baseline
from sampling_grid import write_results
from scipy.spatial import cKDTree

from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import Expression, read_expression
from hinge_cli.eval import HEADLINE, Prediction, align, metric_table, metrics, score_slide
from hinge_cli.formats.embeddings import open_embeddings
from hinge_cli.formats.tiles import read_tiles
from hinge_cli.predict.given import GivenGenes, GivenSource, read_given
from hinge_cli.predict.trained import TrainedModel, load_trained_model
from hinge_cli.run.directory import Run
from hinge_cli.stages.predictors import completion_predictor, hinge_predictor

KS = (5, 10, 25)
CHOICES = ("random", "variable")
NEIGHBOURS = (5, 10, 20, 50)
METHODS = ("HINGE, image only", "HINGE + given", "HINGE + given, training weight", "ridge, image", "ridge, image + given",
           "ridge, given genes only", "kNN on given")
METRIC_COLUMNS = (("depth-partial", HEADLINE.key), ("CRPS", "calibration.crps"))
COLUMNS = (*METRIC_COLUMNS, ("image weight", "image_weight"))  # the weight `generate --given` gave the image (HINGE + given)


def choose_genes(genes: list[str], train_targets: np.ndarray, k: int, choice: str, seed: int) -> list[str]:
    """k panel genes: at random (seeded by k as well, so each k draws its own set), or the most variable on training spots."""
    if choice == "random":
        picked = np.random.default_rng([seed, k]).choice(len(genes), k, replace=False)
    else:
        picked = np.argsort(-train_targets.var(0), kind="stable")[:k]
    return [genes[i] for i in sorted(picked)]


def given_on_section(run: Run, fold: str, truth_path: Path, model: TrainedModel, chosen: list[str], tmp: Path) -> GivenGenes:
    """The chosen genes' true values on the held-out spots, read as `hinge generate --given --given-genes` reads them."""
    listed = tmp / "given.txt"
    listed.write_text("".join(g + "\n" for g in chosen))
    return read_given(GivenSource(truth_path, listed), read_tiles(run.tiles(fold)), model.genes, model.card.transform)


def hinge_prediction(run: Run, fold: str, model: TrainedModel, cfg: GenerateConfig, given: GivenGenes | None,
                     chosen: list[str], weighed: bool = True) -> tuple[Prediction, dict]:
    """`generate`'s predictor on the held-out section's cached features, kept in memory; `chosen` marked as given.
    With `weighed` and given genes, the image weighed on the section as `generate --given` does; else as trained."""
    tiles = read_tiles(run.tiles(fold))
    predictor = (completion_predictor(model, cfg, given, run.embeddings(model.key, fold), fold) if weighed and given
                 else hinge_predictor(model, cfg, given))
    predict = predictor.predict
    batches = []
    slide_rows = model.slide_features(run.embeddings(model.key, fold), fold)
    with open_embeddings(run.embeddings(model.key, fold)) as features:
        for start in range(0, len(tiles.barcodes), cfg.batch_size):
            stop = min(len(tiles.barcodes), start + cfg.batch_size)
            batches.append(predict(slide_rows(features.rows(start, stop)), start, stop))
    stack = {name: np.concatenate([getattr(b, name) for b in batches]) for name in ("mean", "std", "q05", "q95", "draws")}
    return Prediction(Path(f"hinge:{fold}"), fold, tiles.barcodes, model.genes, stack["mean"], stack["std"],
                      tiles.coords.astype(np.float64), model.card.transform, q05=stack["q05"], q95=stack["q95"],
                      draws=stack["draws"], given=chosen), predictor.provenance


def with_given_features(inputs: BaselineInputs, columns: list[int], test_given: np.ndarray) -> BaselineInputs:
    """The same sections with the given genes' values appended to every spot's image features."""
    train = [(np.concatenate([x, y[:, columns]], 1), y, depth) for x, y, depth in inputs.train]
    return replace(inputs, train=train, features=np.concatenate([inputs.features, test_given], 1))


def given_genes_only(inputs: BaselineInputs, columns: list[int], test_given: np.ndarray) -> BaselineInputs:
    """The same sections with the given genes' values as the only features: no image."""
    return replace(inputs, train=[(y[:, columns], y, depth) for _, y, depth in inputs.train], features=test_given)


def _knn(train_given: np.ndarray, train_targets: np.ndarray, query: np.ndarray, n: int) -> np.ndarray:
    """(queries, n, genes): the profiles of each query's n nearest training spots in standardised given-gene space."""
    mu, sd = train_given.mean(0), train_given.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    _, nearest = cKDTree((train_given - mu) / sd).query((query - mu) / sd, k=n)
    return train_targets[nearest.reshape(len(query), n)]


def knn_neighbours(inputs: BaselineInputs, columns: list[int], others: list[int]) -> int:
    """The neighbour count with the best inner leave-one-section-out depth-partial Pearson on the genes not given."""
    scores = {}
    for n in NEIGHBOURS:
        inner = []
        for i, (_, y, depth) in enumerate(inputs.train):
            rest = [s for j, s in enumerate(inputs.train) if j != i]
            ys = np.concatenate([s[1] for s in rest])
            pred = _knn(ys[:, columns], ys, y[:, columns], min(n, len(ys))).mean(1)
            inner.append(metrics.depth_partial_score(pred[:, others], y[:, others], depth)[0])
        scores[n] = float(np.nanmean(inner))
    return max(scores, key=lambda n: scores[n])


def knn_prediction(inputs: BaselineInputs, columns: list[int], test_given: np.ndarray, fold: str, genes: list[str],
                   chosen: list[str]) -> tuple[Prediction, int]:
    """kNN imputation from the given genes over every training spot; the neighbours' profiles are its draws."""
    others = [j for j in range(len(genes)) if j not in set(columns)]
    n = knn_neighbours(inputs, columns, others)
    ys = np.concatenate([y for _, y, _ in inputs.train])
    draws = _knn(ys[:, columns], ys, test_given, n).astype(np.float32)
    q05, q95 = np.quantile(draws, (0.05, 0.95), axis=1)
    return Prediction(Path(f"knn:{fold}"), fold, inputs.barcodes, genes, draws.mean(1), draws.std(1), inputs.coords,
                      inputs.transform, q05=q05, q95=q95, draws=draws, given=chosen), n


def scores_of(pred: Prediction, truth: Expression, truth_path: Path) -> dict[str, float]:
    """The remaining genes' metrics (eval leaves out the genes `pred` marks as given)."""
    table = metric_table(score_slide(align(pred, truth, truth_path=truth_path), pred.transform).metrics)
    return {key: table[key] for _, key in METRIC_COLUMNS}


def fold_results(run: Run, fold: str, ks: list[int], choices: list[str], cfg: GenerateConfig, seed: int) -> list[dict]:
    """Every (k, choice, method) of one fold, scored on the genes not given."""
    model = load_trained_model(run.checkpoint("best"), "cpu")
    genes = model.genes
    truth_path = Path(run.sample(fold)["expression"]["path"])
    truth = read_expression(truth_path)
    inputs = BaselineInputs.read(run, model.key, fold, genes, model.card.per_slide, model.card.transform)
    train_targets = np.concatenate([y for _, y, _ in inputs.train])
    image_only = {"HINGE, image only": hinge_prediction(run, fold, model, cfg, None, [])[0],
                  "ridge, image": run_baseline("ridge", inputs, fold, genes, cfg.n_samples)[0]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            for choice in choices:
                chosen = choose_genes(genes, train_targets, k, choice, seed)
                columns = [genes.index(g) for g in chosen]
                given = given_on_section(run, fold, truth_path, model, chosen, Path(tmp))
                test_given = given.values[:, columns]
                ridge_given, _ = run_baseline("ridge", with_given_features(inputs, columns, test_given), fold, genes, cfg.n_samples)
                genes_only, _ = run_baseline("ridge", given_genes_only(inputs, columns, test_given), fold, genes, cfg.n_samples)
                knn, neighbours = knn_prediction(inputs, columns, test_given, fold, genes, chosen)
                weighed, provenance = hinge_prediction(run, fold, model, cfg, given, chosen)
                preds = {**{method: replace(pred, given=chosen) for method, pred in image_only.items()},
                         "HINGE + given": weighed, "HINGE + given, training weight": hinge_prediction(run, fold, model, cfg, given, chosen, False)[0],
                         "ridge, image + given": replace(ridge_given, given=chosen),
                         "ridge, given genes only": replace(genes_only, given=chosen), "kNN on given": knn}
                for method in METHODS:
                    pred = preds[method]
                    rows.append({"fold": fold, "k": k, "choice": choice, "method": method, "given": chosen,
                                 "spots_given": int(given.per_spot.astype(bool).sum()), "knn_neighbours": neighbours,
                                 "image_weight": provenance.get("image_weight") if method == "HINGE + given" else None,
                                 **scores_of(pred, truth, truth_path)})
                    print(json.dumps({key: rows[-1][key] for key in ("fold", "k", "choice", "method", HEADLINE.key)}), flush=True)
    return rows


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _cell(rows: list[dict], key: str) -> str:
    """Mean ± std over folds of the fold means over model seeds; with several seeds, the std over seeds of the fold mean."""
    per_fold = [_mean([r[key] for r in rows if r["fold"] == f]) for f in sorted({r["fold"] for r in rows})]
    values = [v for v in per_fold if v is not None]
    if not values:
        return "—"
    text = f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")
    per_seed = [_mean([r[key] for r in rows if r["model_seed"] == seed]) for seed in sorted({r["model_seed"] for r in rows})]
    per_seed = [v for v in per_seed if v is not None]
    return text + (f" (seeds ±{np.std(per_seed):.3f})" if len(per_seed) > 1 else "")


def table(rows: list[dict]) -> str:
    """One line per (k, choice, method): mean ± std over folds of the remaining genes' depth-partial Pearson and CRPS."""
    folds = sorted({r["fold"] for r in rows})
    seeds = sorted({r["model_seed"] for r in rows})
    lines = [f"Folds {', '.join(folds)}; HINGE fold runs of seed {', '.join(map(str, seeds))}; scores over the genes NOT "
             "given (mean ± std over folds of each fold's mean over seeds).", "",
             "| k given | chosen | method | " + " | ".join(label for label, _ in COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    keys = list(dict.fromkeys((r["k"], r["choice"], r["method"]) for r in rows))
    for k, choice, method in keys:
        mine = [r for r in rows if (r["k"], r["choice"], r["method"]) == (k, choice, method)]
        lines.append(f"| {k} | {choice} | {method} | " + " | ".join(_cell(mine, key) for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", type=Path, default=Path("bench-out/her2st-v3"), help="benchmark.py's --out")
    parser.add_argument("--panel", default="hvg50")
    parser.add_argument("--folds", default=",".join(SECTIONS), help="held-out sections (those with a trained fold run)")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="numbers of genes given")
    parser.add_argument("--choices", default=",".join(CHOICES), help="random and/or variable")
    parser.add_argument("--seed", type=int, default=0, help="the random choice of genes, and generate's seed")
    parser.add_argument("--model-seeds", type=int, default=1, help="HINGE's fold runs of seeds 0..N-1 (benchmark.py --seeds)")
    parser.add_argument("--n-samples", type=int, default=4, help="HINGE's draws per spot (and ridge's)")
    parser.add_argument("--steps", type=int, default=None, help="reverse-process steps (default: generate's)")
    parser.add_argument("--out", type=Path, help="the table (default: <bench>/completion.md); numbers beside it as .json")
    args = parser.parse_args(argv)
    folds = [f for f in args.folds.split(",") if f]
    cfg = GenerateConfig(n_samples=args.n_samples, steps=args.steps, seed=args.seed, device="cpu")
    rows = []
    for fold in folds:
        for model_seed in range(args.model_seeds):
            root = args.bench / "folds" / args.panel / fold / "hinge" / f"seed{model_seed}"
            if not (root / "checkpoints" / "best.safetensors").is_file():
                raise SystemExit(f"no trained fold run at {root}: run benchmarks/her2st/benchmark.py first, or pass --folds")
            rows += [{**row, "model_seed": model_seed} for row in
                     fold_results(Run(root), fold, [int(k) for k in args.ks.split(",")], args.choices.split(","), cfg, args.seed)]
    write_results(args.out or args.bench / "completion.md", table(rows) + "\n", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
