"""What a bin-level prediction is worth: train on 55 µm pseudo-spots, predict 16 µm bins of a held-out section.

Synthetic Visium HD sections (`synthetic.fixtures.make_visium_hd_section`: painted H&E whose 2 µm bins are counted
from the tissue in and around them) stand in for real HD data, which this machine does not have. A model (`small`,
30 genes, default encoder) is trained on the 55 µm pseudo-spots pooled from the 8 µm bins of the training sections,
with the ridge baseline beside it on the same spots and features. The held-out section is predicted at every 16 µm bin
by both, and `hinge eval` scores them against its HD folder: at bin level (depth-partial Pearson, the Poisson
observation model for calibration) and with both sides pooled to 32, 55 and 112 µm. Nothing is tuned or selected on
the held-out section. Each --seeds value trains and predicts again with that seed; the table gives mean ± std.

These are sections of one synthetic "patient" (shared gene programmes): an in-patient figure, not generalisation.

    python benchmarks/visium_hd_quality.py [--out DIR] [--seeds 0,1,2] [--size-px 3072] [--picture docs/visium_hd_bins.png]
    python benchmarks/visium_hd_quality.py --rescore      # score the stored predictions again (eval changed)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from hinge_cli.synthetic.fixtures import make_visium_hd_section

TRAIN_SEEDS, HELD_OUT_SEED = (10, 11), 12
PICTURE_GENE = "TUMO000"


def hinge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hinge_cli", *args, "-q"], check=True)


def sections(root: Path, size_px: int) -> tuple[list[tuple[Path, Path]], tuple[Path, Path]]:
    made = {}
    for seed in (*TRAIN_SEEDS, HELD_OUT_SEED):
        folder = root / f"section{seed}"
        hd = make_visium_hd_section(folder / "outs", size_px=size_px, fullres=folder / "fullres.tif", seed=seed, sizes=(8, 16))
        made[seed] = (hd.outs, hd.fullres)
    return [made[s] for s in TRAIN_SEEDS], made[HELD_OUT_SEED]


def one_seed(root: Path, train: list[tuple[Path, Path]], held_out: tuple[Path, Path], seed: int) -> dict[str, list[dict]]:
    """Train with `seed`, predict the held-out section with HINGE and the ridge, and score both."""
    run = root / f"run-seed{seed}"
    for outs, fullres in train:
        hinge("tile", "--visium-hd", str(outs), "--image", str(fullres), "--bin-um", "8", "--run", str(run), "--config", "small")
    hinge("embed", "--run", str(run))
    hinge("pretrain-warmup", "--run", str(run), "--n-genes", "30", "--seed", str(seed))
    hinge("train", "--run", str(run))
    outs, fullres = held_out
    pred = root / f"pred-seed{seed}" / "bins.h5ad"
    for model in ("hinge", "ridge"):
        hinge("generate", "--visium-hd", str(outs), "--image", str(fullres), "--bin-um", "16", "--run", str(run), "--out",
              str(pred if model == "hinge" else pred.with_name("bins.ridge.h5ad")), "--model", model, "--seed", str(seed),
              "--genes-to-plot", PICTURE_GENE)
    return score(root, outs, seed)


def score(root: Path, outs: Path, seed: int) -> dict[str, list[dict]]:
    """`hinge eval` of one seed's two predictions against the held-out section: pooling curves and calibration."""
    pred = root / f"pred-seed{seed}" / "bins.h5ad"
    curves = {}
    for model, file in (("hinge", pred), ("ridge", pred.with_name("bins.ridge.h5ad"))):
        folder = root / f"eval-seed{seed}-{model}"
        hinge("eval", "--pred", str(file), "--truth", str(outs), "--out", str(folder), "--no-maps", "--overwrite")
        metrics = json.loads((folder / "metrics.json").read_text())
        curves[model] = metrics["pooling"]
        curves[f"{model}_calibration"] = metrics.get("calibration")
    return curves


def stat(results: list[dict[str, list[dict]]], model: str, level: int, key: str) -> str:
    """Mean ± std over seeds of one figure of one pooling level."""
    values = np.array([r[model][level][key] for r in results])
    return f"{values.mean():.3f}" + (f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else "")


def table(results: list[dict[str, list[dict]]]) -> str:
    lines = ["| pooled to | spots | median UMI | left out (< 100 UMI) | HINGE depth-partial | ridge depth-partial | "
             "HINGE Pearson | ridge Pearson | HINGE co-expression | ridge co-expression |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, level in enumerate(results[0]["hinge"]):
        cells = [stat(results, model, i, key) for key in ("depth_partial_pearson", "pearson", "coexpression_depth_partial")
                 for model in ("hinge", "ridge")]
        lines.append(f"| {level['pool_um']:g} µm | {level['n_spots']} | {level['median_umi']:.0f} | {level['dropped_low_count']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/visium-hd-quality"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size-px", type=int, default=3072, help="section side at 0.5 µm/px (3072: 1.5 mm)")
    parser.add_argument("--picture", type=Path, default=None, help="copy the first seed's bin map of one gene here")
    parser.add_argument("--rescore", action="store_true", help="score the predictions already in --out again (no training)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.rescore:
        results = [score(args.out, args.out / f"section{HELD_OUT_SEED}" / "outs", seed) for seed in seeds]
    else:
        if args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True)
        train, held_out = sections(args.out, args.size_px)
        results = [one_seed(args.out, train, held_out, seed) for seed in seeds]
    (args.out / "results.json").write_text(json.dumps({"seeds": seeds, "size_px": args.size_px, "results": results}, indent=1))
    print(f"held-out synthetic HD section, 16 µm bins; {len(seeds)} seeds (mean ± std); model trained on 55 µm pseudo-spots\n")
    print(table(results))
    for model in ("hinge", "ridge"):
        within = [r[f"{model}_calibration"]["within_1std"] for r in results if r.get(f"{model}_calibration")]
        if within:
            print(f"\n{model}: bin-level share of measured values within ± 1 std (Poisson observation model): "
                  f"{np.mean(within):.3f} (nominal 0.683)")
    if args.picture is not None:
        write_picture(args.out / f"pred-seed{seeds[0]}" / f"bins_{PICTURE_GENE}.png", args.picture)
        print(f"\nwrote {args.picture}")


def write_picture(source: Path, target: Path, width: int = 1400) -> None:
    """The README's picture: the first seed's map of one gene, 1,400 px wide in a 256-colour palette (a few hundred KB)."""
    from PIL import Image

    with Image.open(source) as image:
        small = image.convert("RGB").resize((width, round(image.size[1] * width / image.size[0])), Image.Resampling.LANCZOS)
    small.quantize(256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


if __name__ == "__main__":
    main()
