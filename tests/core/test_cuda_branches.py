"""Every CUDA branch of hinge_cli/, run on the CPU.

The suite has no GPU, so each place that asks "is this a GPU?" is made to answer yes: `devices.is_cuda`
patched to True (tensors stay on the CPU), `torch.cuda.is_available`, `device_count`, `max_memory_allocated`,
`is_bf16_supported` and the process-group calls patched where a branch reaches them. `torch.autocast("cuda", ...)`
is then really constructed (disabled by torch on a CPU-only build), so a misspelt helper or a wrong keyword
fails here instead of on a user's GPU. The branches, as `file::function: test`:

- `hinge_cli/core/devices.py::is_cuda`: test_training_and_generation_take_every_cuda_branch
- `hinge_cli/core/devices.py::resolve_device`: test_resolve_device_picks_this_process_gpu_and_names_the_ones_that_exist
- `hinge_cli/core/devices.py::autocast`: test_autocast_is_bf16_on_a_gpu_and_fp32_with_one_warning_without_bf16
- `hinge_cli/core/devices.py::images_layout`: test_encoder_on_a_gpu_is_channels_last_and_autocast
- `hinge_cli/core/devices.py::place_module`: test_encoder_on_a_gpu_is_channels_last_and_autocast
- `hinge_cli/core/devices.py::peak_memory_mb`: test_training_and_generation_take_every_cuda_branch
- `hinge_cli/core/distributed.py::Dist.from_env`: test_torchrun_on_gpus_joins_nccl_on_this_rank_gpu
- `hinge_cli/core/distributed.py::Dist.wrap`: test_ddp_wraps_on_this_rank_gpu

`test_every_cuda_branch_is_listed` reads this list and fails when a branch is added without a test.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from stand_in import tiled_synthetic, write_features
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.core import devices, distributed
from hinge_cli.core.distributed import Dist
from hinge_cli.encoders.registry import REGISTRY, Encoder, Field
from hinge_cli.encoders.vit import VisionTransformer
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import Target, generate
from hinge_cli.stages.train import pretrain_warmup, train

PACKAGE = Path(__file__).resolve().parents[2] / "hinge_cli"
BRANCH_LINE = re.compile(r"^- `(hinge_cli/[\w/]+\.py)::([\w.]+)`: (test_\w+)$", re.M)


class RecordedAutocast(torch.autocast):
    """torch.autocast that remembers how it was asked for (device, dtype, enabled)."""

    made: list[tuple[str, torch.dtype | None, bool]] = []

    def __init__(self, device_type: str, dtype: torch.dtype | None = None, enabled: bool = True, cache_enabled: bool | None = None):
        RecordedAutocast.made.append((device_type, dtype, enabled))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast": expected on a CPU build
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, torch.dtype | None, bool]]:
    """Every `is_cuda` answers yes, on CPU tensors; returns the autocasts made while it holds."""
    RecordedAutocast.made = []
    monkeypatch.setattr(devices, "is_cuda", lambda device: True)
    monkeypatch.setattr(torch, "autocast", RecordedAutocast)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7 * 2**20)
    return RecordedAutocast.made


@pytest.fixture(scope="module")
def run_with_features(tmp_path_factory: pytest.TempPathFactory) -> Run:
    run, samples = tiled_synthetic(tmp_path_factory.mktemp("cuda"), "c", 2, 40, size_px=320, mpp=2.0, n_genes=30)
    for i, s in enumerate(samples):
        write_features(run, s.sample_id, i)
    return run


def _cuda_branches() -> set[tuple[str, str]]:
    """(file, function) of every `.type == "cuda"`, `is_available()` and `is_cuda(...)` in hinge_cli/."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())

        def visit(node: ast.AST, scope: tuple[str, ...], path: Path = path) -> None:
            for child in ast.iter_child_nodes(node):
                inner = (*scope, child.name) if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else scope
                asks = (isinstance(child, ast.Compare) and isinstance(child.left, ast.Attribute) and child.left.attr == "type"
                        and any(isinstance(c, ast.Constant) and c.value == "cuda" for c in child.comparators))
                if isinstance(child, ast.Call):
                    called = child.func.attr if isinstance(child.func, ast.Attribute) else getattr(child.func, "id", "")
                    asks = asks or called in ("is_available", "is_cuda")
                if asks:
                    found.add((f"hinge_cli/{path.relative_to(PACKAGE)}", ".".join(scope) or "<module>"))
                visit(child, inner)

        visit(tree, ())
    return found


def test_every_cuda_branch_is_listed() -> None:
    listed = {(path, func): test for path, func, test in BRANCH_LINE.findall(__doc__)}
    assert _cuda_branches() == set(listed), "list each CUDA branch in this module's docstring with the test that runs it"
    missing = sorted(test for test in listed.values() if not callable(globals().get(test)))
    assert not missing, f"the docstring names tests that do not exist: {missing}"


def test_the_branch_finder_sees_a_new_branch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "hinge_cli"
    package.mkdir()
    (package / "new.py").write_text("class K:\n    def f(self, d):\n        return d.type == 'cuda'\n\ndef g():\n    import torch\n"
                                    "    return torch.cuda.is_available()\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    assert _cuda_branches() == {("hinge_cli/new.py", "K.f"), ("hinge_cli/new.py", "g")}


def test_resolve_device_picks_this_process_gpu_and_names_the_ones_that_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(HingeError, match="no CUDA GPU is visible"):
        devices.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on this node
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    assert devices.resolve_device("cuda") == torch.device("cuda", 1)
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(HingeError, match=r"no GPU 7; this machine shows 2: cuda:0 \(Fake GPU 0\), cuda:1 \(Fake GPU 1\)"):
        devices.resolve_device("cuda:7")
    with pytest.raises(HingeError, match="not supported"):
        devices.resolve_device("meta")
    with pytest.raises(HingeError, match="unknown device"):
        devices.resolve_device("gpu")


def test_autocast_is_bf16_on_a_gpu_and_fp32_with_one_warning_without_bf16(
        fake_cuda: list, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    gpu = torch.device("cuda", 0)
    devices.autocast(gpu)
    devices.autocast(gpu, enabled=False)
    assert fake_cuda == [("cuda", torch.bfloat16, True), ("cpu", None, False)]
    monkeypatch.setattr(devices, "_warned_no_bf16", set())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla V100")
    with caplog.at_level(logging.WARNING, logger="hinge_cli.core.devices"):
        first, second = devices.autocast(gpu), devices.autocast(gpu)
    assert not first._enabled and not second._enabled
    assert [r.getMessage() for r in caplog.records] == ["GPU 0 (Tesla V100) has no bf16: running in fp32, the same results but slower"]


def test_encoder_on_a_gpu_is_channels_last_and_autocast(fake_cuda: list) -> None:
    arch = REGISTRY["uni"].arch.scaled(embed_dim=32, depth=1, num_heads=2, img_size=32)
    spec = dataclasses.replace(REGISTRY["uni"], dim=32, fields=(Field(32),), preprocess=None)
    torch.manual_seed(0)
    module = VisionTransformer(arch)
    patches = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    with pytest.MonkeyPatch.context() as plain:
        plain.setattr(devices, "is_cuda", lambda device: False)
        expected = Encoder(spec, VisionTransformer(arch), torch.device("cpu"))
        expected.module.load_state_dict(module.state_dict())
        want = expected([patches])
    encoder = Encoder(spec, module, torch.device("cpu"))
    assert module.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert encoder._prepare(patches, spec.fields[0], 1).is_contiguous(memory_format=torch.channels_last)
    got = encoder([patches], views=8)
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-5, atol=1e-5)
    assert ("cuda", torch.bfloat16, True) in fake_cuda


@pytest.mark.slow
def test_training_and_generation_take_every_cuda_branch(run_with_features: Run, fake_cuda: list, tmp_path: Path) -> None:
    """The tiny pipeline with every `is_cuda` saying yes: bf16 autocast is built for training, validation and both
    samplers (the old `torch._autocast` in generate failed here), and the log's peak memory is the GPU's."""
    run = run_with_features
    cfg = run.config("tiny")
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction, cfg.train.epochs = 10, 1, 0.2, 1
    cfg.train.device = "cpu"
    pretrain_warmup(run, cfg, overwrite=True)
    train(run, cfg, overwrite=True)
    records = [json.loads(line) for line in run.log("train").read_text().splitlines() if line.strip()]
    assert records and all(r.get("peak_memory_mb") == 7.0 for r in records if "epoch" in r)
    assert ("cuda", torch.bfloat16, True) in fake_cuda
    for sampler in ("coupled", "reverse"):
        fake_cuda.clear()
        out = tmp_path / f"{sampler}.h5ad"
        generate(run, [Target("c1")], GenerateConfig(n_samples=2, steps=3, device="cpu", sampler=sampler), out=out)
        assert fake_cuda and all(made == ("cuda", torch.bfloat16, True) for made in fake_cuda)
        assert np.isfinite(ad.read_h5ad(out).X).all()


def test_torchrun_on_gpus_joins_nccl_on_this_rank_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    joined, current = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.tdist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(distributed.tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.tdist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(device))
    assert Dist.from_env(torch.device("cuda", 1)) == Dist(1, 2, 1)
    assert joined == ["nccl"] and current == [torch.device("cuda", 1)]
    assert Dist.from_env(torch.device("cpu")) == Dist(1, 2, 1)
    assert joined == ["nccl", "gloo"] and len(current) == 1


def test_ddp_wraps_on_this_rank_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    monkeypatch.setattr(distributed, "DistributedDataParallel", lambda net, device_ids: made.append(device_ids) or net)
    net = torch.nn.Linear(2, 2)
    assert Dist().wrap(net, torch.device("cuda", 1)) is net and made == []  # one process: no wrapper
    Dist(1, 2, 1).wrap(net, torch.device("cuda", 1))
    Dist(1, 2, 1).wrap(net, torch.device("cpu"))
    assert made == [[1], None]


@pytest.mark.parametrize("command", [["embed"], ["pretrain-warmup"], ["train"], ["generate", "--sample-id", "c0", "--out", "x.h5ad"]])
def test_device_cuda_without_a_gpu_is_one_line_for_every_stage(run_with_features: Run, command: list[str], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--run", str(run_with_features.root), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("no CUDA GPU is visible" in line for line in lines) and "Traceback" not in result.output, result.output
