"""The run directory as a record: a sample is done only when the manifest says so, whatever a kill left on disk."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from kills import Killed, count_writes, h5_content, kill_at, rerun_after_each_kill
from stand_in import tiled_synthetic, trained_tiny, write_features

from hinge_cli.config import EmbedConfig, GenerateConfig, load_config
from hinge_cli.core.files import LEFTOVER_AGE_S, atomic_path, output_lock
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders import registry as enc
from hinge_cli.encoders.registry import REGISTRY
from hinge_cli.errors import HingeError
from hinge_cli.eval import evaluate
from hinge_cli.model.checkpoint import read_checkpoint_card
from hinge_cli.run.directory import Run
from hinge_cli.stages.calibrate import recalibrate
from hinge_cli.stages.embed import embed_samples
from hinge_cli.stages.generate import Target, generate
from hinge_cli.stages.tile import tile_samples
from hinge_cli.stages.train import pretrain_warmup, train


@pytest.fixture
def small_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = (enc.Field(32, 4.0), enc.Field(32, 8.0))
    spec = dataclasses.replace(REGISTRY["default"], fields=fields, build=lambda: enc.MultiFieldHandcrafted(fields, tile_px=32))
    monkeypatch.setitem(REGISTRY, "default", spec)


def _tile(run: Run, synth) -> None:
    cfg = load_config("tiny").tile
    cfg.patch_px = 16
    tile_samples(run, [SampleSpec("s0", synth.slide, synth.spots)], cfg)


@pytest.mark.slow
def test_tile_killed_at_every_write_resumes_to_the_uninterrupted_result(tmp_path: Path, synth) -> None:
    ref = Run(tmp_path / "ref")
    writes = count_writes(lambda: _tile(ref, synth))
    assert writes >= 4  # running record, tiles file, thumbnail, sample registration, ok record
    expected = h5_content(ref.tiles("s0"))
    for n in range(writes):
        run = Run(tmp_path / f"kill{n}")
        with kill_at(n), pytest.raises(Killed):
            _tile(run, synth)
        assert not run.is_done("s0", "tile", run.tiles("s0"))
        _tile(run, synth)
        assert run.is_done("s0", "tile", run.tiles("s0")), n
        assert h5_content(run.tiles("s0")) == expected, n
        assert run.sample("s0")["expression"] == ref.sample("s0")["expression"]


def test_a_tiles_file_without_its_record_is_redone_not_skipped(tmp_path: Path, synth) -> None:
    run = Run(tmp_path / "run")
    with kill_at(3), pytest.raises(Killed):  # after the tiles file landed, before the sample was finished
        _tile(run, synth)
    assert run.tiles("s0").exists()
    cfg = load_config("tiny").tile
    cfg.patch_px = 16
    summary = tile_samples(run, [SampleSpec("s0", synth.slide, synth.spots)], cfg)
    assert summary.done == ["s0"] and summary.skipped == []


@pytest.mark.slow
def test_embed_killed_at_every_write_resumes_to_the_uninterrupted_result(tmp_path: Path, synth, small_default: None) -> None:
    ref = Run(tmp_path / "ref")
    _tile(ref, synth)
    cfg = EmbedConfig(device="cpu", batch_size=64, workers=1)
    writes = count_writes(lambda: embed_samples(ref, cfg))
    expected = h5_content(ref.embeddings("default", "s0"), ref.root)  # the tiles file it names, inside its run
    for n in range(writes):
        run = Run(tmp_path / f"kill{n}")
        _tile(run, synth)
        with kill_at(n), pytest.raises(Killed):
            embed_samples(run, cfg)
        assert embed_samples(run, cfg).done == ["s0"], n
        assert h5_content(run.embeddings("default", "s0"), run.root) == expected, n
        assert embed_samples(run, cfg).skipped == ["s0"]


def test_embed_rechecks_under_the_lock_and_keeps_a_finished_output(tmp_path: Path, synth, small_default: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard job that finished the sample while this one waited: its output is kept, not replaced."""
    run = Run(tmp_path / "run")
    _tile(run, synth)
    cfg = EmbedConfig(device="cpu", batch_size=64, workers=1)
    embed_samples(run, cfg)
    made = run.embeddings("default", "s0").stat().st_mtime_ns
    real, asked = Run.is_done, []

    def stale_listing(self: Run, sample: str, stage: str, output: Path) -> bool:
        """The first look at the embeddings (building the to-do list) predates the other job's finish."""
        if stage.startswith("embed") and not asked:
            asked.append(stage)
            return False
        return real(self, sample, stage, output)

    monkeypatch.setattr(Run, "is_done", stale_listing)
    summary = embed_samples(run, cfg)  # the to-do list says "not done"; under the lock it is
    assert summary.skipped == ["s0"] and summary.done == []
    assert run.embeddings("default", "s0").stat().st_mtime_ns == made


def test_an_empty_lock_file_is_explained_then_taken_over(tmp_path: Path) -> None:
    import os

    from hinge_cli.core.files import EMPTY_LOCK_GRACE_S, OutputLocked, output_lock

    target = tmp_path / "x.h5"
    lock = tmp_path / "x.h5.lock"
    lock.write_text("")  # a job died on a full disk between creating and filling its lock
    with pytest.raises(OutputLocked, match="empty or unreadable") as info:
        with output_lock(target):
            pass
    assert str(lock) in str(info.value)
    old = lock.stat().st_mtime - EMPTY_LOCK_GRACE_S - 1
    os.utime(lock, (old, old))
    with output_lock(target):
        assert lock.read_text().startswith("{")
    assert not lock.exists()


def test_embed_refuses_embeddings_of_replaced_tiles_until_told_to_redo_them(tmp_path: Path, synth, small_default: None) -> None:
    import anndata as ad

    run = Run(tmp_path / "run")
    _tile(run, synth)
    cfg = EmbedConfig(device="cpu", batch_size=64, workers=1)
    embed_samples(run, cfg)
    fewer = ad.read_h5ad(synth.spots)[::2].copy()  # corrected spots: a different set
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    tile_cfg = load_config("tiny").tile
    tile_cfg.patch_px = 16
    tile_samples(run, [SampleSpec("s0", synth.slide, tmp_path / "fewer.h5ad")], tile_cfg, overwrite=True)
    with pytest.raises(HingeError, match="stale") as info:
        embed_samples(run, cfg)
    assert "hinge embed --encoder default --overwrite" in str(info.value)
    assert embed_samples(run, cfg, overwrite=True).done == ["s0"]
    assert embed_samples(run, cfg).skipped == ["s0"]
    (tmp_path / "fewer.h5ad").write_bytes((tmp_path / "fewer.h5ad").read_bytes() + b"\0")  # the spot file changed under the tiles
    with pytest.raises(HingeError, match="tiles are stale: its spots file"):
        embed_samples(run, cfg)


def test_a_rerun_with_other_settings_says_which_differ(tmp_path: Path, synth, caplog: pytest.LogCaptureFixture) -> None:
    run = Run(tmp_path / "run")
    _tile(run, synth)
    cfg = load_config("tiny").tile
    cfg.patch_px, cfg.spot_um, cfg.tissue.open_um = 16, 40.0, 8.0
    summary = tile_samples(run, [SampleSpec("s0", synth.slide, synth.spots)], cfg)
    assert summary.skipped == ["s0"]
    assert "spot_um" in caplog.text and "tissue.open_um" in caplog.text and "--overwrite" in caplog.text


def test_a_full_disk_while_taking_a_lock_leaves_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import hinge_cli.core.files as files

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.json, "dump", full)
    with pytest.raises(OSError), files.output_lock(tmp_path / "x.h5"):
        pass
    assert not (tmp_path / "x.h5.lock").exists()
    assert "free disk space" in str(files.user_os_error(OSError(errno.ENOSPC, "No space left on device")))


def test_a_copied_run_keeps_its_finished_samples(tmp_path: Path, synth) -> None:

    run = Run(tmp_path / "run")
    _tile(run, synth)
    copy = Run(shutil.copytree(run.root, tmp_path / "copy", copy_function=shutil.copy))  # new modification times
    assert copy.tiles("s0").stat().st_mtime_ns != run.tiles("s0").stat().st_mtime_ns
    assert copy.is_done("s0", "tile", copy.tiles("s0"))
    with open(copy.tiles("s0"), "r+b") as fh:  # same size, other content
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert not copy.is_done("s0", "tile", copy.tiles("s0"))


def _warmup_base(root: Path, corpus: bool) -> tuple[Run, object]:
    """Two tiled synthetic samples with stand-in features, ready for the warm-up, and its config (with `corpus`, a
    backbone pre-trained first on their expression as an expression-only corpus)."""
    run, samples = tiled_synthetic(root, "w", 2, 40, size_px=384, mpp=2.0, n_genes=40)
    for i, s in enumerate(samples):
        write_features(run, s.sample_id, i)
    cfg = run.config("tiny")
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction = 12, 1, 0.2
    if corpus:
        cfg.warmup.corpus, cfg.pretrain.epochs = [str(s.spots) for s in samples], 1
    return run, cfg


@pytest.mark.slow
@pytest.mark.parametrize("corpus", [False, True], ids=["random backbone", "pre-trained on a corpus"])
def test_pretrain_warmup_killed_at_every_write_finishes_when_run_again(tmp_path: Path, corpus: bool) -> None:
    """Never "exists, pass --overwrite" after a kill: a warm-up the manifest does not record as finished is redone,
    and the re-run ends with the uninterrupted run's pre-trained backbone, warm-up checkpoint, panel and record."""
    base, cfg = _warmup_base(tmp_path / "base", corpus)
    kept = ("checkpoints/warmup.safetensors", "genes.txt", *(("checkpoints/pretrain.safetensors",) if corpus else ()))
    for n, run, ref in rerun_after_each_kill(base.root, tmp_path, lambda r: pretrain_warmup(r, cfg)):
        for name in kept:
            assert (run.root / name).read_bytes() == (ref.root / name).read_bytes(), (n, name)
        assert run.manifest()["stages"]["pretrain-warmup"]["status"] == "ok"
    with pytest.raises(HingeError, match="warmup.safetensors exists"):
        pretrain_warmup(ref, cfg)  # a finished warm-up still needs --overwrite


def _die_while_writing(final: Path) -> None:
    """A writer killed mid-write (a child process that exits at once: no finally runs), as a job at its time limit."""
    with output_lock(final), atomic_path(final) as tmp:
        tmp.write_bytes(b"half a file")
        os._exit(9)


def test_leftovers_of_killed_jobs_go_at_the_next_stage_and_a_live_writers_stay(tmp_path: Path, synth,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    run = Run(tmp_path / "run")
    final = run.root / "tiles" / "gone.h5"
    child = multiprocessing.get_context("fork").Process(target=_die_while_writing, args=(final,))
    child.start()
    child.join()
    host = socket.gethostname()
    temporary, lock = final.with_name(f".gone.h5.tmp-{host}-{child.pid}"), final.with_name("gone.h5.lock")
    assert temporary.exists() and lock.exists()  # a dead process of this host: its leftovers go at once
    long_ago = time.time() - 2 * LEFTOVER_AGE_S
    elsewhere = final.with_name(f".far.h5.tmp-node17-{child.pid}")  # another node's, touched just now: its writer may live
    abandoned = final.with_name(f".old.h5.tmp-node17-{os.getpid()}")  # another node's, untouched for two hours
    mine = final.with_name(f".mine.h5.tmp-{host}-{os.getpid()}")  # a live process's, however old
    for path in (elsewhere, abandoned, mine):
        path.write_bytes(b"in progress")
    for path in (abandoned, mine):
        os.utime(path, (long_ago, long_ago))
    with caplog.at_level(logging.DEBUG, logger="hinge_cli.run.directory"):
        _tile(run, synth)  # any stage that records its work
    assert not temporary.exists() and not lock.exists() and not abandoned.exists()
    assert elsewhere.exists() and mine.exists()
    assert "removed 3 files left by killed jobs" in caplog.text


@pytest.mark.slow
def test_calibrate_and_eval_killed_at_every_write_end_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """A kill at any write of `hinge calibrate` or `hinge eval`, then the same command again (no --overwrite), ends with
    the uninterrupted run's spread scale, gene coupling, metrics and report."""
    base, _ = trained_tiny(tmp_path / "base")
    generate(base, [Target("t1")], GenerateConfig(n_samples=2, device="cpu"))
    cfg = base.config()

    def fitted(run: Run) -> list[object]:
        return [(card.calibration, card.coupling) for card in (read_checkpoint_card(run.checkpoint(n)) for n in ("selected", "best"))]

    for n, run, ref in rerun_after_each_kill(base.root, tmp_path / "calibrate", lambda r: recalibrate(r, cfg)):
        assert fitted(run) == fitted(ref), n

    pred, truth = base.prediction("t1"), Path(base.sample("t1")["expression"]["path"])
    outputs = ("metrics.json", "report.md")

    def scored(out: Path) -> dict[str, str]:
        return {name: (out / name).read_text().replace(str(out), "OUT") for name in outputs}

    writes = count_writes(lambda: evaluate([pred], [truth], out=tmp_path / "eval-ref", maps=False))
    for n in range(writes):
        out = tmp_path / f"eval{n}"
        with kill_at(n), pytest.raises(Killed):
            evaluate([pred], [truth], out=out, maps=False)
        evaluate([pred], [truth], out=out, maps=False)
        assert scored(out) == scored(tmp_path / "eval-ref"), n


def test_embed_counts_a_sample_with_damaged_tiles_as_failed_not_left_out(tmp_path: Path, small_default: None) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    run, samples = tiled_synthetic(tmp_path, "d", 2, 50, size_px=384, mpp=2.0, n_genes=20)
    damaged = run.tiles("d1")
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    embed = ["embed", "--run", str(run.root), "--device", "cpu"]
    stopped = CliRunner().invoke(app, embed)
    assert stopped.exit_code == 2 and "d1.h5 is not the one `hinge tile` recorded" in stopped.output, stopped.output
    went_on = CliRunner().invoke(app, [*embed, "--keep-going"])
    assert went_on.exit_code == 3 and "1 failed" in went_on.output, went_on.output
    assert run.embeddings("default", "d0").exists() and not run.embeddings("default", "d1").exists()


def test_tile_again_with_other_spots_is_refused_until_overwrite(tmp_path: Path, synth) -> None:
    import anndata as ad

    run = Run(tmp_path / "run")
    _tile(run, synth)
    fewer = tmp_path / "fewer.h5ad"
    ad.read_h5ad(synth.spots)[::2].copy().write_h5ad(fewer)
    cfg = load_config("tiny").tile
    cfg.patch_px = 16
    with pytest.raises(HingeError, match=r"s0 was tiled from the spots file .* not .*fewer.h5ad"):
        tile_samples(run, [SampleSpec("s0", synth.slide, fewer)], cfg)
    assert run.sample("s0")["expression"]["path"] == str(Path(synth.spots).resolve())  # the old counts, untouched
    tile_samples(run, [SampleSpec("s0", synth.slide, fewer)], cfg, overwrite=True)
    assert run.sample("s0")["expression"]["path"] == str(fewer.resolve())


@pytest.mark.slow
def test_a_training_log_cut_short_by_a_kill_is_whole_again_after_the_rerun(tmp_path: Path) -> None:
    """Killed after the last epoch's checkpoint landed but before its log line: the re-run has no epoch left to train,
    and still leaves the log with every epoch."""
    run, _ = trained_tiny(tmp_path)
    log_file = run.log("train")
    whole = log_file.read_text()
    log_file.write_text(whole.splitlines(keepends=True)[0])
    cfg = run.config()
    cfg.train.epochs = 2  # as trained_tiny trained it: the same command again, with nothing left to train
    train(run, cfg)
    assert log_file.read_text() == whole


@pytest.mark.slow
def test_an_eval_of_several_slides_killed_at_every_write_finishes_when_run_again(tmp_path: Path) -> None:
    """Killed after some slides' results landed but before the summary: the same command scores them again (the same
    figures) instead of "results already exist"; results of another evaluation are still kept without --overwrite."""
    run, _ = trained_tiny(tmp_path / "base")
    generate(run, [Target("t0"), Target("t1")], GenerateConfig(n_samples=2, device="cpu"))
    preds = [run.prediction(s) for s in ("t0", "t1")]
    truths = [Path(run.sample(s)["expression"]["path"]) for s in ("t0", "t1")]

    def evaluated(out: Path) -> dict[str, str]:
        return {str(p.relative_to(out)): p.read_text().replace(str(out), "OUT") for p in sorted(out.rglob("*.json"))}

    writes = count_writes(lambda: evaluate(preds, truths, out=tmp_path / "ref", maps=False))
    for n in range(writes):
        out = tmp_path / f"eval{n}"
        with kill_at(n), pytest.raises(Killed):
            evaluate(preds, truths, out=out, maps=False)
        evaluate(preds, truths, out=out, maps=False)
        assert evaluated(out) == evaluated(tmp_path / "ref"), n
    with pytest.raises(HingeError, match="evaluation results already exist"):
        evaluate(preds, truths, out=tmp_path / "ref", maps=False)  # finished: kept
    other, reseeded = tmp_path / "other", tmp_path / "seed7" / "t0.h5ad"
    generate(run, [Target("t0")], GenerateConfig(n_samples=2, device="cpu", seed=7), out=reseeded)
    evaluate([reseeded], truths[:1], out=other / "t0", maps=False)  # another prediction's result where this one would go
    with pytest.raises(HingeError, match="evaluation results already exist"):
        evaluate(preds, truths, out=other, maps=False)
