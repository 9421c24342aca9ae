"""`pretrain-warmup` and `train` on a synthetic run: panel, curriculum, learning, resume, DDP, frozen policy.

Image features are written directly from each synthetic spot's tissue composition
(what a good encoder extracts), so these tests measure training, not the encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stand_in import tiled_synthetic

from hinge_cli.data.samples import SampleSpec
from hinge_cli.errors import HingeError
from hinge_cli.formats.embeddings import EmbeddingAttrs, write_embeddings
from hinge_cli.model import load_checkpoint
from hinge_cli.model.diffusion import MaskSchedule
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import tiles_made_from
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.stages import train as train_module
from hinge_cli.stages.train import pretrain_warmup, train
from hinge_cli.synthetic.slides import CLASSES, make_synthetic_sample
from hinge_cli.training.fit import LoopSettings, LoopState, fit

pytestmark = pytest.mark.slow  # training itself

ENCODER = "default"


def write_features(run: Run, sample: str, spots: Path, seed: int) -> None:
    """Embeddings from the synthetic truth of each spot's appearance, plus nuisance dimensions."""
    adata = ad.read_h5ad(spots)
    rng = np.random.default_rng(seed)
    signal = np.column_stack([adata.obs[f"frac_{c}"] for c in CLASSES] + [np.log1p(adata.obs["nuclei"])])
    features = np.column_stack([signal * 3 + rng.normal(0, 0.05, signal.shape), rng.normal(0, 1, (adata.n_obs, 3))])
    path = run.embeddings(ENCODER, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = EmbeddingAttrs(ENCODER, encoders=[ENCODER], dims=[features.shape[1]], views=1)
    coords = np.rint(adata.obsm["spatial"]).astype(np.int64)
    with write_embeddings(path, attrs, list(adata.obs_names), coords, features.shape) as out:
        out.write(features.astype(np.float32))
    run.record_output(sample, f"embed:{ENCODER}", path, tiles_file=tiles_made_from(run, sample))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiled synthetic samples with expression and features; no model yet."""
    run, samples = tiled_synthetic(tmp_path_factory.mktemp("train"), "s", 3, 10, size_px=1024, mpp=0.5, pitch_um=40, n_genes=60)
    for i, s in enumerate(samples):
        write_features(run, s.sample_id, s.spots, i)
    return run.root


def copy_run(base: Path, dest: Path) -> Run:
    shutil.copytree(base, dest)
    return Run(dest)


def warm(run: Run, **kw: object) -> None:
    pretrain_warmup(run, run.config(None, {"warmup": {"n_genes": 30, "holdout": ["s2"], **kw}, "train": {"seed": 0}}, record=False))


def test_panel_is_chosen_without_the_held_out_sample(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "a")
    warm(run, epochs=1)
    genes = (run.root / "genes.txt").read_text()
    other = copy_run(base_run, tmp_path / "b")
    held = ad.read_h5ad(other.sample("s2")["expression"]["path"])
    rng = np.random.default_rng(0)
    held.X = rng.poisson(rng.gamma(0.3, 300, held.shape)).astype(np.float32)  # wildly different expression
    path = tmp_path / "s2_changed.h5ad"
    held.write_h5ad(path)
    other.register_sample("s2", expression={"path": str(path)})
    warm(other, epochs=1)
    assert (other.root / "genes.txt").read_text() == genes
    assert len(genes.split()) == 30


def test_warmup_never_exceeds_the_mask_cap(base_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.Tensor, MaskSchedule, float | None]] = []
    original = MaskSchedule.sample_t

    def spy(self: MaskSchedule, batch: int, generator=None, max_hidden_fraction=None, all_hidden_share=0.0):
        t = original(self, batch, generator, max_hidden_fraction, all_hidden_share)
        seen.append((t, self, max_hidden_fraction))
        return t

    monkeypatch.setattr(MaskSchedule, "sample_t", spy)
    run = copy_run(base_run, tmp_path / "run")
    warm(run, epochs=2, mask_ratio=0.2)
    capped = [(t, s) for t, s, cap in seen if cap is not None]
    assert capped, "the warm-up drew no capped timesteps"
    for t, schedule in capped:
        assert (schedule.hidden_counts[t] <= 0.2 * schedule.n_genes).all()
    assert any(cap is None for _, _, cap in seen)  # validation scores every timestep


def test_pretraining_lowers_the_masked_loss(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "run")
    corpus = []
    for i in range(4):  # more sections of the same 'patient', expression only
        s = make_synthetic_sample(tmp_path / "corpus", f"c{i}", size_px=1024, mpp=0.5, seed=100 + i, pitch_um=30, n_genes=60)
        corpus.append(s.spots)
    cfg = run.config(None, {"warmup": {"corpus": [str(c) for c in corpus], "n_genes": 30, "holdout": ["s2"], "epochs": 1}}, record=False)
    cfg.pretrain.epochs = 6
    pretrain_warmup(run, cfg)
    history = [json.loads(line) for line in run.log("pretrain").read_text().splitlines()]
    assert len(history) == 6 and history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    card = load_checkpoint(run.checkpoint("pretrain")).card
    panel = (run.root / "genes.txt").read_text().split()
    assert set(panel) <= set(card.vocab) and card.kind == "backbone"


def _pearson_on_holdout(run: Run, path: Path) -> float:
    checkpoint = load_checkpoint(path)
    net, card = checkpoint.net, checkpoint.card
    with h5py.File(run.embeddings(ENCODER, "s2")) as h5:
        features = h5["embeddings"][()]
        barcodes = [b.decode() for b in h5["barcodes"][()]]
    truth = ad.read_h5ad(run.sample("s2")["expression"]["path"])[barcodes, card.genes]
    target = card.transform.apply(np.asarray(truth.X))
    norm = card.feature_norm
    pred = net.generate(torch.from_numpy(norm(features)), n_samples=2, seed=0).mean.numpy()
    rs = [np.corrcoef(pred[:, g], target[:, g])[0, 1] for g in range(target.shape[1]) if target[:, g].std() > 0 and pred[:, g].std() > 0]
    return float(np.mean(rs))


@pytest.fixture(scope="module")
def trained(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = copy_run(base_run, tmp_path_factory.mktemp("trained") / "run")
    warm(run, epochs=2)
    shutil.copytree(run.root, run.root.parent / "warm")  # for the resume and DDP tests
    cfg = run.config()
    cfg.train.epochs, cfg.train.lr = 30, 0.01  # clean features: a short, brisk run suffices
    train(run, cfg)
    return run


def test_training_learns_the_synthetic_signal(trained: Run) -> None:
    r_trained = _pearson_on_holdout(trained, trained.checkpoint("best"))
    untrained = trained.root.parent / "untrained.safetensors"
    from hinge_cli.model import save_checkpoint

    checkpoint = load_checkpoint(trained.checkpoint("warmup"))
    torch.manual_seed(1)
    for p in checkpoint.net.parameters():  # a random-init, untrained model of the same shape
        torch.nn.init.normal_(p, 0, 0.05)
    save_checkpoint(untrained, checkpoint.net, checkpoint.card)
    r_random = _pearson_on_holdout(trained, untrained)
    assert r_trained > 0.4 and r_trained > r_random + 0.3, (r_trained, r_random)
    history = [json.loads(line) for line in trained.log("train").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"epoch", "train_loss", "val_loss", "lr", "seconds", "peak_memory_mb"} <= set(history[0])
    assert trained.plot("train").exists()
    assert trained.manifest()["stages"]["train"]["status"] == "ok"


def test_frozen_backbone_is_unchanged_by_training(trained: Run) -> None:
    warm_w = load_file(str(trained.checkpoint("warmup")))
    best_w = load_file(str(trained.checkpoint("best")))
    backbone = [k for k in warm_w if k.startswith("backbone.")]
    assert backbone
    for k in backbone:
        assert torch.equal(warm_w[k], best_w[k]), k
    assert any(not torch.equal(warm_w[k], best_w[k]) for k in warm_w if not k.startswith("backbone."))


class Interrupt(Exception):
    pass


class KillAt:
    """A progress sink that dies at a given step, like a killed process (nothing after it runs)."""

    def __init__(self, step: int):
        self.left = step

    def task(self, label: str, total: int | None):
        import contextlib

        @contextlib.contextmanager
        def cm():
            def advance(n: int = 1, status: str | None = None) -> None:
                self.left -= n
                if self.left <= 0 and label.startswith("train"):
                    raise Interrupt

            yield advance

        return cm()


def test_resume_after_a_kill_mid_epoch_is_bit_exact(trained: Run, tmp_path: Path) -> None:
    warm_dir = trained.root.parent / "warm"
    straight, killed = copy_run(warm_dir, tmp_path / "straight"), copy_run(warm_dir, tmp_path / "killed")
    epochs = 4
    cfg = straight.config()
    cfg.train.epochs, cfg.train.patience = epochs, 100
    train(straight, cfg)
    n_train = load_checkpoint(killed.checkpoint("warmup")).card.training.n_train_spots
    steps = int(2.5 * -(-n_train // cfg.train.batch_size))
    with pytest.raises(Interrupt):
        train(killed, cfg, progress=KillAt(steps))  # dies half-way through the third epoch
    done = json.loads(killed.checkpoint("last.state").with_suffix(".json").read_text())["loop"]["epoch"]
    assert 1 <= done < epochs
    train(killed, cfg)
    a, b = load_file(str(straight.checkpoint("last"))), load_file(str(killed.checkpoint("last")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.log("train").read_text() != "" and len(killed.log("train").read_text().splitlines()) == epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(trained: Run, tmp_path: Path) -> None:
    warm_dir = trained.root.parent / "warm"
    single, double = copy_run(warm_dir, tmp_path / "single"), copy_run(warm_dir, tmp_path / "ddp")
    args = ["train", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "hinge_cli", *args], check=True, env={**env, "HINGE_RUN": str(single.root)}, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
                    "-m", "hinge_cli", *args], check=True, env={**env, "HINGE_RUN": str(double.root)}, timeout=300)
    one = [json.loads(line) for line in single.log("train").read_text().splitlines()]
    two = [json.loads(line) for line in double.log("train").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_train_without_warmup_and_refusing_to_redo_warmup(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "run")
    with pytest.raises(HingeError, match="pretrain-warmup"):
        train(run, run.config())
    with pytest.raises(HingeError, match="not in the run"):
        warm(run, holdout=["nope"], epochs=1)
    warm(run, epochs=1)
    with pytest.raises(HingeError, match="--overwrite"):
        warm(run, epochs=1)


def test_training_refuses_a_stale_chain_until_the_named_stage_is_redone(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "run")
    warm(run, epochs=1)
    spots = Path(run.sample("s0")["expression"]["path"])
    fewer = ad.read_h5ad(spots)[::2].copy()  # re-tiled with corrected spots
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    cfg = run.config()
    cfg.tile.images = False
    tile_sample(run, SampleSpec("s0", Path(run.sample("s0")["slide"]), tmp_path / "fewer.h5ad"), cfg.tile)
    cfg.train.epochs = 1
    with pytest.raises(HingeError, match="stale") as info:
        train(run, cfg)
    assert "hinge embed" in str(info.value)
    write_features(run, "s0", tmp_path / "fewer.h5ad", 0)  # what `hinge embed --overwrite` does
    with pytest.raises(HingeError, match="changed after `hinge pretrain-warmup`") as info:
        train(run, cfg)
    assert "pretrain-warmup --overwrite" in str(info.value)
    pretrain_warmup(run, run.config(None, {"warmup": {"n_genes": 30, "holdout": ["s2"], "epochs": 1}}, record=False),
                    overwrite=True)
    train(run, cfg)
    assert run.manifest()["stages"]["train"]["status"] == "ok"


def test_a_loop_without_validation_keeps_its_last_epoch_and_never_stops_early() -> None:
    """A refit holds nothing out: no validation figures, every epoch the newest best, patience ignored."""
    torch.manual_seed(0)
    net, x, y = torch.nn.Linear(3, 1), torch.randn(32, 3), torch.randn(32, 1)

    def batch_loss(wrapped: torch.nn.Module, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return ((wrapped(x[rows]) - y[rows]) ** 2).mean()

    state = fit(net, 32, batch_loss, None, LoopSettings(stage="refit", epochs=4, batch_size=8, lr=1e-2, patience=1))
    assert (state.epoch, state.best_epoch, state.best_val, state.stopped_early) == (4, 4, None, False)
    assert [sorted(r) for r in state.history] == [["epoch", "lr", "peak_memory_mb", "seconds", "step", "train_loss"]] * 4


def test_the_loss_plot_is_drawn_at_most_every_interval_and_at_the_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    monkeypatch.setattr(train_module, "loss_curves", lambda path, series, *a, **k: drawn.append(len(series["train"])))
    run, state = Run(tmp_path / "run"), LoopState()
    training_log = train_module.TrainingLog(run, "train")

    def epoch() -> None:
        state.history.append({"epoch": len(state.history) + 1, "train_loss": 1.0, "val_loss": 2.0})
        training_log.epoch_end(state)

    for _ in range(3):
        epoch()
    assert drawn == [] and len(run.log("train").read_text().splitlines()) == 3  # the log every epoch, no plot yet
    training_log.finish(state)
    assert drawn == [3]
    monkeypatch.setattr(train_module, "PLOT_INTERVAL_S", 0.0)
    epoch()
    assert drawn == [3, 4]


def test_an_unknown_learning_rate_schedule_is_a_user_error() -> None:
    with pytest.raises(HingeError, match="cosine, constant"):
        LoopSettings(stage="train", epochs=1, batch_size=8, lr=1e-3, schedule="linear")


def test_train_killed_at_every_write_resumes_bit_identically(trained: Run, tmp_path: Path) -> None:
    """Weights, cards and resume state land as one unit: a kill at any write of an epoch resumes to the same model."""
    from kills import Killed, count_writes, kill_at

    start = copy_run(trained.root.parent / "warm", tmp_path / "start")
    cfg = start.config()
    cfg.train.epochs, cfg.train.patience = 1, 100
    train(start, cfg)  # the unit a kill in epoch 2 must fall back to
    cfg.train.epochs = 2
    straight = copy_run(start.root, tmp_path / "straight")
    writes = count_writes(lambda: train(straight, cfg))
    names = ("last", "best", "last.state")
    expected = {n: load_file(str(straight.checkpoint(n))) for n in names}
    for n in range(writes):
        killed = copy_run(start.root, tmp_path / f"kill{n}")
        with kill_at(n), pytest.raises(Killed):
            train(killed, cfg)
        train(killed, cfg)
        for name in names:
            got = load_file(str(killed.checkpoint(name)))
            assert got.keys() == expected[name].keys() and all(torch.equal(got[k], expected[name][k]) for k in got), (n, name)
        assert load_checkpoint(killed.checkpoint("last")).card.training.epochs == 2


def test_a_second_training_process_is_refused(trained: Run, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    run = copy_run(trained.root.parent / "warm", tmp_path / "run")
    (run.root / "training.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # a live job
    for stage in (["train", "--epochs", "1"], ["pretrain-warmup", "--overwrite"]):
        result = CliRunner().invoke(app, [*stage, "--run", str(run.root), "-q"])
        assert result.exit_code == 2 and "being trained by another process" in result.output, result.output
        assert "Traceback" not in result.output
    assert not run.checkpoint("last").exists()


def test_a_mean_only_model_trains_to_the_end_without_a_coupling(base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path / "run")
    cfg = run.config(None, {"warmup": {"n_genes": 30, "holdout": ["s2"], "epochs": 1}, "diffusion": {"likelihood": "mse"},
                            "train": {"seed": 0, "epochs": 2}}, record=False)
    pretrain_warmup(run, cfg)
    train(run, cfg)
    best = load_checkpoint(run.checkpoint("best"))
    assert not best.net.has_spread and best.card.coupling is None and best.card.calibration is not None
