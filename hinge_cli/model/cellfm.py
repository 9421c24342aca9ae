"""Import a CellFM MindSpore `.ckpt` without MindSpore, and map gene symbols to its vocabulary.

A MindSpore checkpoint is one protobuf message:
    Checkpoint { repeated Value value = 1; }
    Value      { string tag = 1; TensorProto tensor = 2; ... }
    TensorProto{ repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }
It is read here with a small wire-format parser over a memory map (checkpoints are GBs).
"""

from __future__ import annotations

import csv
import mmap
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import ModelConfig
from hinge_cli.errors import HingeError, setting
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.card import BackboneSource, ModelCard
from hinge_cli.model.checkpoint import save_checkpoint
from hinge_cli.model.hinge import check_architecture

# MindSpore tensor_type string -> (numpy dtype of the raw bytes, torch dtype)
DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "Float16": ("<f2", torch.float16),
    "Float32": ("<f4", torch.float32),
    "Float64": ("<f8", torch.float64),
    "BFloat16": ("<i2", torch.bfloat16),
    "Int8": ("i1", torch.int8),
    "Int16": ("<i2", torch.int16),
    "Int32": ("<i4", torch.int32),
    "Int64": ("<i8", torch.int64),
    "UInt8": ("u1", torch.uint8),
    "Bool": ("?", torch.bool),
}
OPTIMIZER_STATE = re.compile(
    r"^(adam_[mv]|moment[12]?|accum|global_step|learning_rate|beta[12]_power|scale_sense|"
    r"current_iterator_step|last_overflow_iterator_step|epoch_num|step_num)\b"
)


def _varint(buf: memoryview | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview | bytes, start: int, end: int) -> Iterator[tuple[int, int, int | tuple[int, int]]]:
    """(field number, wire type, varint value or (start, end) of a length-delimited payload)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated protobuf message")


@dataclass
class _RawTensor:
    dims: list[int]
    dtype: str
    span: tuple[int, int]


def _parse_tensor(buf: memoryview, start: int, end: int) -> _RawTensor:
    dims: list[int] = []
    dtype, span = "", (start, start)
    for number, wire, value in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dims.append(value)
        elif number == 1 and wire == 2:  # packed repeated int64
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
        elif number == 2:
            dtype = bytes(buf[value[0]:value[1]]).decode()
        elif number == 3:
            span = value
    return _RawTensor(dims, dtype, span)


def read_mindspore_checkpoint(path: Path | str, skip_optimizer: bool = True) -> dict[str, Tensor]:
    """All tensors of a MindSpore `.ckpt` by tag, bit-exact; optimiser moments and counters skipped."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise HingeError(f"CellFM checkpoint {path} does not exist or is empty", "check the path after cellfm:")
    out: dict[str, Tensor] = {}
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            for number, wire, value in _fields(buf, 0, len(buf)):
                if number != 1 or wire != 2:
                    continue
                tag, raw = "", None
                for n2, w2, v2 in _fields(buf, *value):
                    if n2 == 1 and w2 == 2:
                        tag = bytes(buf[v2[0]:v2[1]]).decode()
                    elif n2 == 2 and w2 == 2:
                        raw = _parse_tensor(buf, *v2)
                if raw is None or (skip_optimizer and OPTIMIZER_STATE.match(tag)):
                    continue
                out[tag] = _to_torch(raw, buf, tag, path)
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise HingeError(f"{path} is not a readable MindSpore checkpoint ({exc})", "pass a CellFM .ckpt file") from None
        finally:
            buf.release()
    return out


def _to_torch(raw: _RawTensor, buf: memoryview, tag: str, path: Path) -> Tensor:
    if raw.dtype not in DTYPES:
        raise HingeError(f"{path}: tensor {tag} has unsupported type {raw.dtype!r}", "convert the checkpoint to float32")
    np_dtype, torch_dtype = DTYPES[raw.dtype]
    count = int(np.prod(raw.dims)) if raw.dims else 1
    array = np.frombuffer(buf[raw.span[0]:raw.span[1]], dtype=np_dtype, count=count).copy()
    return torch.from_numpy(array).view(torch_dtype).reshape(raw.dims)


def cellfm_names(n_layers: int) -> dict[str, str]:
    """CellFM parameter name -> our Backbone state-dict key."""
    names = {
        "gene_emb": "gene_emb.weight",
        "cls_token": "cls_token",
        "value_enc.mask_emb": "mask_emb",
        "value_enc.value_enc.w1.weight": "value_enc.w1.weight",
        "value_enc.value_enc.w3.weight": "value_enc.w3.weight",
        "value_enc.value_enc.a": "value_enc.a",
        "value_enc.value_enc.table.weight": "value_enc.table.weight",
        "value_dec.w1.weight": "value_dec.w1.weight",
        "value_dec.w2.weight": "value_dec.w2.weight",
    }
    for i in range(n_layers):
        for p in "qkvuo":
            names[f"encoder.{i}.attn.{p}_proj.weight"] = f"layers.{i}.attn.{p}_proj.weight"
        for p in "uvo":
            names[f"encoder.{i}.ffn.{p}_proj.weight"] = f"layers.{i}.ffn.{p}_proj.weight"
        for j in (1, 2):
            names[f"encoder.{i}.post_norm{j}.gamma"] = f"layers.{i}.post_norm{j}.weight"
            names[f"encoder.{i}.post_norm{j}.beta"] = f"layers.{i}.post_norm{j}.bias"
    return names


@dataclass
class ImportReport:
    """What a CellFM import used: loaded (our keys), skipped (checkpoint tags), missing (our keys kept at init)."""

    config: ModelConfig
    vocab_size: int
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _strip_prefix(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Drop a wrapper prefix (e.g. 'backbone.') found in front of 'gene_emb'."""
    prefixes = [tag[: -len("gene_emb")] for tag in tensors if tag == "gene_emb" or tag.endswith(".gene_emb")]
    if not prefixes:
        raise HingeError(f"{path} has no gene_emb tensor, so it is not a CellFM checkpoint", "pass a CellFM .ckpt file")
    p = prefixes[0]
    return {tag[len(p):] if tag.startswith(p) else tag: t for tag, t in tensors.items()}


def infer_config(tensors: dict[str, Tensor], n_heads: int) -> ModelConfig:
    """Backbone shape from the weights; the head count is not recorded in them, so it is given."""
    layers = {int(m.group(1)) for tag in tensors if (m := re.match(r"encoder\.(\d+)\.", tag))}
    return ModelConfig(
        d_model=tensors["gene_emb"].shape[1],
        n_layers=max(layers) + 1 if layers else 0,
        n_heads=n_heads,
        ffn_dim=tensors["encoder.0.ffn.u_proj.weight"].shape[0] if layers else 0,
        n_bins=tensors["value_enc.value_enc.w1.weight"].shape[0],
    )


def import_cellfm(path: Path | str, cfg: ModelConfig) -> tuple[Backbone, ImportReport]:
    """A Backbone holding CellFM's weights (float32); `cfg` must describe the same architecture."""
    path = Path(path)
    tensors = _strip_prefix(read_mindspore_checkpoint(path), path)
    try:
        shape_cfg = infer_config(tensors, cfg.n_heads)
    except KeyError as exc:
        raise HingeError(f"{path} lacks CellFM tensor {exc}", "pass a complete CellFM .ckpt file") from None
    check_architecture(shape_cfg, cfg, f"CellFM checkpoint {path.name}")
    vocab_size = tensors["gene_emb"].shape[0]
    backbone = Backbone(cfg, vocab_size)
    ours = backbone.state_dict()
    names = cellfm_names(cfg.n_layers)
    report = ImportReport(backbone.cfg, vocab_size)
    state = {}
    for tag, tensor in tensors.items():
        key = names.get(tag)
        if key is None:
            report.skipped.append(tag)
            continue
        if tensor.numel() != ours[key].numel():
            raise HingeError(f"{path}: {tag} has shape {tuple(tensor.shape)}, expected {tuple(ours[key].shape)}",
                             "check that this is a CellFM checkpoint matching the config")
        state[key] = tensor.reshape(ours[key].shape).to(torch.float32)
        report.loaded.append(key)
    report.missing = sorted(set(ours) - set(state))
    backbone.load_state_dict(state, strict=False)
    return backbone, report


def read_vocab(path: Path | str) -> list[str]:
    """CellFM's gene CSV: a header row, then one gene per row with its symbol in the first column (id = row)."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except FileNotFoundError:
        raise HingeError(f"gene vocabulary {path} does not exist", f"pass CellFM's gene CSV with {setting('vocab')}") from None
    genes = [row[0].strip() for row in rows[1:] if row and row[0].strip()]
    if not genes:
        raise HingeError(f"gene vocabulary {path} lists no genes", f"pass CellFM's gene CSV with {setting('vocab')}")
    return genes


def map_panel(panel: Sequence[str], vocab: Sequence[str]) -> tuple[list[int], list[str]]:
    """Backbone ids (vocab row + 1) of the panel's genes, exact match first, then case-insensitive.

    Returns (ids, missing): ids holds 0 for each panel gene the vocabulary lacks.
    """
    exact = {g: i + 1 for i, g in enumerate(vocab)}
    folded: dict[str, int] = {}
    for i, g in enumerate(vocab):
        folded.setdefault(g.upper(), i + 1)
    ids = [exact.get(g) or folded.get(g.upper(), 0) for g in panel]
    return ids, [g for g, i in zip(panel, ids, strict=True) if i == 0]


def convert_cellfm(ckpt: Path | str, vocab_csv: Path | str, out: Path | str, cfg: ModelConfig) -> ImportReport:
    """Import once and save as safetensors + sidecar (with the vocabulary) for fast reloads."""
    backbone, report = import_cellfm(ckpt, cfg)
    vocab = read_vocab(vocab_csv)
    if len(vocab) >= report.vocab_size:
        raise HingeError(f"{vocab_csv} lists {len(vocab)} genes but the checkpoint embeds only {report.vocab_size - 1}",
                         "pass the gene CSV released with this checkpoint")
    source = BackboneSource("cellfm", str(ckpt), skipped=report.skipped, missing=report.missing)
    save_checkpoint(out, backbone, ModelCard("cellfm-import", vocab=vocab, backbone=source))
    return report
