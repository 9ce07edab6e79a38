"""GGUF reading: agreement with gguf-py's reader, and clear errors on bad files."""

import os
import struct

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter, GGMLQuantizationType

from qkvgguf import GGUFError, GGUFFile, ModelConfig, UnsupportedError


def test_matches_gguf_reader(smollm2_path):
    ours = GGUFFile(smollm2_path)
    ref = GGUFReader(smollm2_path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
        assert ours.metadata_types[key] == list(field.types), key
    assert len(ours.tensors) == len(ref.tensors) == 272
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.type, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert info.shape == tuple(reversed(t.shape.tolist()))
    for name in ("token_embd.weight", "blk.7.ffn_down.weight", "output_norm.weight"):
        assert np.array_equal(ours.raw(name).reshape(-1), ref.get_tensor(
            [t.name for t in ref.tensors].index(name)).data.reshape(-1).view(np.uint8))


def test_smollm2_config(smollm2_path):
    cfg = ModelConfig.from_gguf(GGUFFile(smollm2_path))
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_ff) == ("llama", 30, 576, 1536)
    assert (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rep) == (9, 3, 64, 3)
    assert (cfg.vocab_size, cfg.n_ctx_train, cfg.rope_base) == (49152, 8192, 100000.0)
    assert cfg.tied_embeddings and not cfg.rope_neox


# -- a small valid file to break in various ways ------------------------------------------------

def _write(path, arch="llama", skip=(), tensor_type=GGMLQuantizationType.F32):
    w = GGUFWriter(str(path), arch)
    keys = {
        "block_count": lambda: w.add_block_count(1), "context_length": lambda: w.add_context_length(64),
        "embedding_length": lambda: w.add_embedding_length(32), "feed_forward_length": lambda: w.add_feed_forward_length(64),
        "head_count": lambda: w.add_head_count(4), "rms_eps": lambda: w.add_layer_norm_rms_eps(1e-5),
    }
    for k, add in keys.items():
        if k not in skip:
            add()
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((16, 32), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture
def good(tmp_path):
    return _write(tmp_path / "good.gguf")


def _error(path, cls=GGUFError):
    with pytest.raises(cls) as e:
        ModelConfig.from_gguf(GGUFFile(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_good_file_opens(good):
    g = GGUFFile(good)
    assert g.tensors["token_embd.weight"].shape == (16, 32)
    assert np.array_equal(g.raw("output_norm.weight").view(np.float32), np.ones((1, 32), np.float32))


def test_wrong_magic(tmp_path, good):
    data = bytearray(open(good, "rb").read())
    data[:4] = b"GGML"
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    assert "not a GGUF file" in _error(tmp_path / "bad.gguf")


def test_not_gguf_at_all(tmp_path):
    (tmp_path / "x.gguf").write_text("hello")
    assert "not a GGUF file" in _error(tmp_path / "x.gguf")


def test_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [10, 30, 200, 600])
def test_truncated_header(tmp_path, good, keep):
    (tmp_path / "t.gguf").write_bytes(open(good, "rb").read()[:keep])
    msg = _error(tmp_path / "t.gguf")
    assert "truncated" in msg or "more than" in msg


def test_tensor_data_past_end(tmp_path, good):
    data = open(good, "rb").read()
    (tmp_path / "t.gguf").write_bytes(data[:-64])
    msg = _error(tmp_path / "t.gguf")
    assert "tensor 'output_norm.weight'" in msg and "past the end" in msg


def _patch_tensor_type(path, name: str, new_type: int):
    data = bytearray(open(path, "rb").read())
    i = data.index(name.encode()) + len(name)
    (n_dims,) = struct.unpack_from("<I", data, i)
    struct.pack_into("<I", data, i + 4 + 8 * n_dims, new_type)
    open(path, "wb").write(bytes(data))


def test_unknown_tensor_type(good):
    _patch_tensor_type(good, "token_embd.weight", 250)
    msg = _error(good)
    assert "tensor 'token_embd.weight'" in msg and "unknown ggml type 250" in msg


def test_row_length_not_multiple_of_block(good):
    _patch_tensor_type(good, "token_embd.weight", int(GGMLQuantizationType.Q4_K))  # 32-wide rows, 256 blocks
    assert "not a multiple" in _error(good)


def test_hostile_counts(tmp_path, good):
    data = bytearray(open(good, "rb").read())
    struct.pack_into("<Q", data, 16, 2**62)  # kv_count
    (tmp_path / "h.gguf").write_bytes(bytes(data))
    assert "more than" in _error(tmp_path / "h.gguf")
    data = bytearray(open(good, "rb").read())
    struct.pack_into("<Q", data, 24, 2**60)  # length of the first key string
    (tmp_path / "h2.gguf").write_bytes(bytes(data))
    assert "truncated" in _error(tmp_path / "h2.gguf")


def test_missing_required_key(tmp_path):
    path = _write(tmp_path / "k.gguf", skip=("block_count",))
    assert "'llama.block_count' is missing" in _error(path)


def test_unsupported_architecture(tmp_path):
    path = _write(tmp_path / "a.gguf", arch="gpt2")
    msg = _error(path, UnsupportedError)
    assert "'gpt2'" in msg and "llama" in msg


def test_open_reads_only_the_header(smollm2_path):
    """Opening maps the file; no tensor bytes are copied (the raw views share the map)."""
    g = GGUFFile(smollm2_path)
    assert g.raw("token_embd.weight").base is not None
    assert os.path.getsize(smollm2_path) == g.file_size
