"""The weight-type registry (qkvgguf/quants/registry.py) and the consumers it drives.

1. Every registered type round-trips: our quantizer (the registry's selector) -> bytes -> our
   dequantizer, and gguf.quants reads the same bytes to the same values bit for bit (where gguf-py has
   the type); where gguf.quants quantizes the type too, its bytes equal ours. With an importance
   matrix the bytes are still the type's standard layout (gguf.quants reads them alike).
2. A throw-away type (a copy of Q8_0 under a ggml id gguf-py does not know) registered once appears in
   every consumer: the Triton dequant kernel and the quantized matmul (under TRITON_INTERPRET=1 on
   the CPU), inspect's layout table, decoder and --tensor report, the converter's outtypes, policy,
   fallback table and encoder, and the --outtype auto candidates; it is gone from all of them after.
"""

from __future__ import annotations

import dataclasses

import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from qkvgguf import quants
from qkvgguf.errors import UnsupportedError
from qkvgguf.quants import FORMATS, Layout, Tiling, has_reference

TYPES = list(FORMATS)
FAKE = 1000  # no ggml type has this id (gguf-py's enum ends far below)


def _values(rows: int, row_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, row_len)).astype(np.float32) * rng.uniform(0.01, 2.0, (rows, 1)).astype(np.float32)
    x[1] = 0.0  # an all-zero row
    x[2, :256] = 0.0  # all-zero blocks
    x[3, 7] = 30.0  # an outlier
    return x


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: quants.type_name(t))
def test_every_registered_type_round_trips(qtype):
    fmt = FORMATS[qtype]
    x = _values(6, 512, int(qtype))
    raw = np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(6, -1)
    assert raw.shape == (6, 512 // fmt.block_size * fmt.type_size)
    ours = quants.dequantize(torch.from_numpy(raw), qtype).numpy()
    assert ours.shape == x.shape and ours.dtype == np.float32
    # the error is what the bits per weight allow (random bytes would give ~1.4, a wrong layout > 0.5)
    rel = np.sqrt(((ours - x) ** 2).sum() / (x ** 2).sum())
    assert rel < max(2.0 ** (2 - fmt.bits_per_weight), 2.0 ** -8), (fmt.name, rel)
    assert not ours[1].any()  # zeros stay zeros
    assert has_reference(qtype), f"gguf.quants lost {fmt.name}"  # every type we register today
    assert _same(gguf.quants.dequantize(raw, qtype).reshape(ours.shape), ours), fmt.name
    try:
        theirs = gguf.quants.quantize(x, qtype)
    except NotImplementedError:  # Q4_K..IQ4_XS: only llama.cpp quantizes them (test_*quantize.py)
        theirs = None
    if theirs is not None:
        assert np.array_equal(np.ascontiguousarray(theirs).view(np.uint8).reshape(raw.shape), raw), fmt.name
    if fmt.quantize_weighted is not None:
        imp = np.random.default_rng(1).random(512).astype(np.float32) ** 3
        wraw = quants.quantize(x, qtype, imp)
        assert wraw.shape == raw.shape and wraw.dtype == np.uint8
        w_ours = quants.dequantize(torch.from_numpy(wraw), qtype).numpy()
        assert _same(gguf.quants.dequantize(wraw, qtype).reshape(x.shape), w_ours), fmt.name
        e_w, e_p = ((w_ours - x) ** 2 * imp).sum(), ((ours - x) ** 2 * imp).sum()
        assert e_w <= e_p * 1.05, (fmt.name, e_w, e_p)  # weighted rounding: no worse (within 5%) in its metric


def test_the_records_are_consistent_with_gguf_py():
    from gguf import GGML_QUANT_SIZES

    for qtype, fmt in FORMATS.items():
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype], fmt.name
        assert fmt.layout is not None and fmt.layout.n_bytes == fmt.type_size, fmt.name
        assert (fmt.decode is None) == (fmt.block_size == 1), fmt.name  # every quantized type has a decoder
        assert (fmt.tiling is None) == (fmt.block_size == 1), fmt.name  # and a Triton kernel
        if fmt.fallback is not None:  # a 256-block type falls back to a 32-block one
            assert FORMATS[fmt.fallback].block_size < fmt.block_size, fmt.name


def test_register_checks_the_arithmetic():
    q8 = FORMATS[T.Q8_0]
    with pytest.raises(ValueError, match="registered already"):
        quants.register(q8)
    with pytest.raises(ValueError, match="gguf-py says"):
        quants.register(dataclasses.replace(q8, type=T.IQ2_XXS, name="x"))
    with pytest.raises(ValueError, match="fields add up to 33"):
        quants.register(dataclasses.replace(q8, type=FAKE, name="x", layout=Layout.of([("d", 1, ""), ("qs", 32, "")], "")))
    with pytest.raises(ValueError, match="does not cover"):
        quants.register(dataclasses.replace(q8, type=FAKE, name="x", tiling=Tiling(1, 16, 1)))
    assert FAKE not in FORMATS
    with pytest.raises(UnsupportedError, match="1000 is not supported"):
        quants.get_format(FAKE)


# -- a throw-away type seen by every consumer ------------------------------------------------------
@pytest.fixture
def fake_type():
    """Q8_0's record under the id FAKE: its own name, outtype and fallback; the kernel decodes it with
    Q8_0's branch (Tiling.branch). Removed after the test."""
    q8 = FORMATS[T.Q8_0]
    fmt = dataclasses.replace(q8, type=FAKE, name="Q8_0_COPY", outtype="q8_0_copy", file_type=FT.GUESSED,
                              fallback=T.Q4_0, tiling=dataclasses.replace(q8.tiling, branch=T.Q8_0))
    quants.register(fmt)
    try:
        yield fmt
    finally:
        quants.unregister(FAKE)


def test_a_new_type_appears_in_every_consumer(fake_type, tmp_path):
    from qkvgguf.convert import mixed, writer
    from qkvgguf.inspect import tensor as inspect_tensor

    x = _values(4, 256, 5)
    q8_raw = quants.quantize(x, T.Q8_0)
    raw = quants.quantize(x, FAKE)
    assert np.array_equal(raw, q8_raw) and quants.type_name(FAKE) == "Q8_0_COPY"
    want = quants.dequantize(torch.from_numpy(raw), FAKE).numpy()

    # the Triton kernels (interpreted on the CPU): block decode and matmul
    pytest.importorskip("triton")
    from qkvgguf.runtime.kernels import qmatmul
    from qkvgguf.runtime.kernels.dequant import LAYOUTS, dequantize_rows

    assert LAYOUTS[FAKE].branch == T.Q8_0 and LAYOUTS[FAKE].name == "Q8_0_COPY"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.from_numpy(raw).to(dev)
    assert torch.equal(dequantize_rows(w, FAKE).cpu(), torch.from_numpy(want))
    a = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)).to(dev)
    y = qmatmul(a, w, FAKE).cpu()
    torch.testing.assert_close(y, a.cpu() @ torch.from_numpy(want).T, rtol=1e-4, atol=1e-4)

    # inspect: layout table, decoder, and a --tensor report of a tensor of that type
    assert inspect_tensor.LAYOUTS[FAKE].fields == FORMATS[T.Q8_0].layout.fields
    dec = inspect_tensor.DECODERS[FAKE](raw.reshape(-1, 34))
    assert np.array_equal(dec.values().reshape(x.shape), want)
    from gguf import GGUFWriter

    from qkvgguf.gguf_file import GGUFFile

    path = tmp_path / "q8.gguf"
    gw = GGUFWriter(str(path), "llama")
    gw.add_tensor("t", q8_raw, raw_dtype=T.Q8_0)
    gw.write_header_to_file(), gw.write_kv_data_to_file(), gw.write_tensors_to_file(), gw.close()
    g = GGUFFile(str(path))
    g.tensors["t"] = dataclasses.replace(g.tensors["t"], type=FAKE)  # as if the file held the new type
    r = inspect_tensor.tensor_report(g, "t", n_blocks=2)
    assert r["type"] == "Q8_0_COPY" and r["dequantizer"] == "qkvgguf.quants" and "note" not in r
    assert r["layout"]["formula"] == "x = d * q" and len(r["blocks"]) == 2 and "q" in r["blocks"][0]
    assert (r["stats"]["min"], r["stats"]["max"]) == (float(want.min()), float(want.max()))
    assert "Q8_0_COPY" in inspect_tensor.render_tensor(r)

    # the converter: outtype, policy, fallback table, encoder, sizes
    assert list(writer.OUTTYPES)[:11] == ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1",
                                          "q4_k", "q5_k", "q6_k"]
    ot = writer.get_outtype("Q8_0_COPY")
    assert (ot.weight_type, ot.file_type, ot.mixture) == (FAKE, FT.GUESSED, False)
    assert writer.tensor_type("blk.0.attn_q.weight", (64, 256), ot).type == FAKE
    assert writer.tensor_type("blk.0.attn_q.weight", (64, 48), ot).type == T.F16  # no block fits 48
    assert writer.FALLBACK[FAKE] == T.Q4_0
    assert np.array_equal(writer.encode(x, FAKE), q8_raw) and writer.n_bytes((4, 256), FAKE) == q8_raw.nbytes

    # --outtype auto: a candidate, measured like Q8_0
    assert FAKE in mixed.auto_candidates() and FAKE in mixed.candidates(256)
    (opt,), (ref,) = mixed.sensitivity(x, None, [FAKE]), mixed.sensitivity(x, None, [T.Q8_0])
    assert (opt.n_bytes, opt.error) == (ref.n_bytes, ref.error)


def test_a_removed_type_leaves_every_consumer(fake_type):
    from qkvgguf.convert import mixed, writer
    from qkvgguf.inspect import tensor as inspect_tensor

    quants.unregister(FAKE)
    assert FAKE not in inspect_tensor.LAYOUTS and FAKE not in inspect_tensor.DECODERS
    assert "q8_0_copy" not in writer.OUTTYPES and FAKE not in writer.FALLBACK
    assert FAKE not in mixed.auto_candidates()
    pytest.importorskip("triton")
    from qkvgguf.errors import QkvggufError
    from qkvgguf.runtime.kernels.dequant import LAYOUTS, dequantize_rows

    assert FAKE not in LAYOUTS
    with pytest.raises(QkvggufError, match="ggml type 1000 has no Triton kernel"):
        dequantize_rows(torch.zeros((1, 34), dtype=torch.uint8), FAKE)
