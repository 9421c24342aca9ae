"""CellFM import: a synthetic MindSpore .ckpt written here in the wire format must read back bit-exactly."""

import numpy as np
import pytest
import torch

from hinge_cli.config import load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Backbone, Hinge, convert_cellfm, import_cellfm, load_checkpoint, map_panel, read_mindspore_checkpoint, read_vocab
from hinge_cli.model.cellfm import cellfm_names

TYPES = {np.float32: "Float32", np.float16: "Float16", np.int32: "Int32"}


def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor_proto(array, packed):
    dims = b"".join(varint(d) for d in array.shape)
    dims = field(1, dims) if packed else b"".join(varint(1 << 3) + varint(d) for d in array.shape)
    return dims + field(2, TYPES[array.dtype.type].encode()) + field(3, array.tobytes())


def write_ckpt(path, tensors):
    body = b"".join(
        field(1, field(1, tag.encode()) + field(2, tensor_proto(arr, packed=i % 2 == 0)))
        for i, (tag, arr) in enumerate(tensors.items())
    )
    path.write_bytes(body)


@pytest.fixture
def cellfm_ckpt(tmp_path):
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    bb = Backbone(cfg, 24)  # 23 genes + padding row, a multiple of 8 like CellFM
    ours = bb.state_dict()
    tensors = {cf: ours[key].numpy() for cf, key in cellfm_names(cfg.n_layers).items()}
    tensors["adam_m.gene_emb"] = np.ones((24, cfg.d_model), np.float32)  # optimiser moment: skipped
    tensors["global_step"] = np.array([1000], np.int32)
    tensors["cellwise_dec.map.weight"] = np.zeros((4, 4), np.float16)  # not part of our backbone
    path = tmp_path / "cellfm.ckpt"
    write_ckpt(path, tensors)
    return path, bb, tensors


def test_reader_is_bit_exact(cellfm_ckpt):
    path, _, tensors = cellfm_ckpt
    read = read_mindspore_checkpoint(path)
    assert "adam_m.gene_emb" not in read and "global_step" not in read
    for tag, arr in tensors.items():
        if tag in read:
            assert read[tag].numpy().dtype == arr.dtype and np.array_equal(read[tag].numpy(), arr)
            assert read[tag].numpy().tobytes() == arr.tobytes()
    assert "global_step" in read_mindspore_checkpoint(path, skip_optimizer=False)


def test_import_maps_every_parameter(cellfm_ckpt):
    path, bb, _ = cellfm_ckpt
    imported, report = import_cellfm(path, load_config("tiny").model)
    assert report.missing == [] and report.skipped == ["cellwise_dec.map.weight"] and report.vocab_size == 24
    assert len(report.loaded) == len(bb.state_dict())
    for (k, a), b in zip(bb.state_dict().items(), imported.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    ids, values, visible = torch.arange(1, 11).expand(2, -1), torch.rand(2, 10), torch.rand(2, 10) < 0.5
    torch.testing.assert_close(imported(ids, values, visible), bb(ids, values, visible), rtol=0, atol=0)


def test_wrong_config_or_file_is_a_user_error(cellfm_ckpt, tmp_path):
    path, _, _ = cellfm_ckpt
    with pytest.raises(HingeError, match="d_model"):
        import_cellfm(path, load_config("small").model)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(HingeError):
        import_cellfm(junk, load_config("tiny").model)


def test_vocabulary_and_conversion(cellfm_ckpt, tmp_path):
    path, bb, _ = cellfm_ckpt
    csv = tmp_path / "gene_info.csv"
    csv.write_text("gene,ensembl\n" + "".join(f"GENE{i},ENSG{i}\n" for i in range(23)))
    vocab = read_vocab(csv)
    assert vocab[0] == "GENE0" and len(vocab) == 23
    ids, missing = map_panel(["GENE5", "gene7", "NOTAGENE"], vocab)
    assert ids == [6, 8, 0] and missing == ["NOTAGENE"]
    out = tmp_path / "cellfm.safetensors"
    convert_cellfm(path, csv, out, load_config("tiny").model)
    checkpoint = load_checkpoint(out)
    assert checkpoint.card.vocab == vocab and checkpoint.card.kind == "backbone"
    model = Hinge(checkpoint.net, ids[:2], 3)
    assert model.n_genes == 2
    with pytest.raises(HingeError, match="outside"):
        Hinge(checkpoint.net, ids, 3)
