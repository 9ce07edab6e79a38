"""Float formats F32, F16, BF16, and the block helpers every quant format module shares.

Layouts (elements, bytes per block); a "block" of a float type is one element:

    F32:  (1, 4)   # IEEE binary32, little-endian
    F16:  (1, 2)   # IEEE binary16
    BF16: (1, 2)   # top 16 bits of a binary32: sign, 8-bit exponent, 7-bit mantissa

Dequantizing is exact: f16 and bf16 values are all representable in float32. Torch quiets
signalling NaNs when it widens f16 (it sets the quiet bit, numpy keeps the payload), so an f16 NaN
stays a NaN with possibly other payload bits; every other value is bit-identical to
`gguf.quants.dequantize`.

"Quantizing" is conversion: F16 rounds to nearest even (numpy's cast), BF16 follows ggml's
`ggml_compute_fp32_to_bf16`: NaNs become quiet NaNs with the same sign and top mantissa bits, the
rest round to nearest even on the upper 16 bits.

Block helpers (used by q4, q5, q8, kquants): `as_blocks` turns raw bytes (rows, row_bytes) into a
(rows, n_blocks, type_size) view without copying, `f16_at` reads an f16 field of every block as
float32, `shifts` makes the small shift vectors for bit unpacking (on the device, no host copy), and `np_blocks`/`np_f16_bytes`
do the same jobs for the numpy quantizers; `np_quantize_rows(_weighted)` feed a block quantizer a chunk of blocks at a
time (with the matching importance-matrix columns), and `codes_input` hands inspect's decoders (numpy
blocks in) to the same torch unpack helpers the dequantizers use.

Subsets of rows: every dequantizer reads only the rows it is given, so callers slice first
(`raw[a:b]`, `raw[::2]`, `raw[ids]`); strided row views are read in place, without a copy. Inputs
are never written to (they are often read-only views of a memory map) and the output is always a
new contiguous float32 tensor the caller owns.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from .registry import Layout, QuantFormat, register, type_name


# -- shared block helpers ------------------------------------------------------------------------
def as_blocks(raw: torch.Tensor, qtype: T, type_size: int, align: int = 2) -> torch.Tensor:
    """uint8 (rows, row_bytes) -> uint8 (rows, n_blocks, type_size), a view when possible.

    Fields are later reinterpreted with `.view(torch.float16)` etc., which needs the storage offset
    and the row stride to be multiples of the widest field read (`align` bytes: 2 for the f16
    scales, 4 for F32); a tensor that is not (an odd-offset slice of a bigger buffer) is copied once.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 2:
        raise ValueError(f"{type_name(qtype)}: expected uint8 (rows, row_bytes), "
                         f"got {raw.dtype} {tuple(raw.shape)}")
    rows, row_bytes = raw.shape
    if row_bytes % type_size:
        raise ValueError(f"{type_name(qtype)}: {row_bytes:,} bytes per row is not a multiple of the "
                         f"{type_size}-byte block")
    if raw.stride(-1) != 1 or raw.storage_offset() % align or (rows > 1 and raw.stride(0) % align):
        raw = raw.clone(memory_format=torch.contiguous_format)
    return raw.unflatten(-1, (row_bytes // type_size, type_size))


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 at byte `offset` of every block, widened to float32: (rows, n_blocks)."""
    return blocks[..., offset:offset + 2].view(torch.float16)[..., 0].float()


def shifts(n: int, step: int, like: torch.Tensor) -> torch.Tensor:
    """uint8 shift amounts 0, step, .., (n - 1) * step shaped (n, 1), on `like`'s device.

    Made by `arange` on the device, never copied from host memory: the embedding gather runs
    inside a captured CUDA graph (runtime/cuda_graph.py), where a host-to-device copy aborts capture.
    """
    return (torch.arange(n, dtype=torch.uint8, device=like.device) * step).view(-1, 1)


def np_blocks(values: np.ndarray, qtype: T, block_size: int) -> np.ndarray:
    """float32 (rows, row_len) -> float32 (rows, n_blocks, block_size), a view when possible."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[1] % block_size:
        raise ValueError(f"{type_name(qtype)}: expected (rows, row_len) with row_len a multiple of "
                         f"{block_size}, got {values.shape}")
    return values.reshape(values.shape[0], values.shape[1] // block_size, block_size)


def np_quantize_rows(values: np.ndarray, qtype: T, block_size: int, type_size: int,
                     quantize_blocks: Callable[[np.ndarray], np.ndarray],
                     chunk_blocks: int = 1 << 12) -> np.ndarray:
    """float32 (rows, row_len) -> uint8 (rows, row_len // block_size * type_size).

    `quantize_blocks` maps float32 (n, block_size) -> uint8 (n, type_size). Blocks are independent,
    so we feed them `chunk_blocks` at a time: temporaries stay about 0.5 MB (cache-sized and
    reused by the allocator), whatever the tensor size.
    """
    blocks = np_blocks(values, qtype, block_size).reshape(-1, block_size)
    out = np.empty((len(blocks), type_size), dtype=np.uint8)
    for start in range(0, len(blocks), chunk_blocks):
        out[start:start + chunk_blocks] = quantize_blocks(blocks[start:start + chunk_blocks])
    return out.reshape(len(values), values.shape[1] // block_size * type_size)


def np_quantize_rows_weighted(qtype: T, block_size: int, type_size: int,
                              quantize_blocks: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """A registry `quantize_weighted` (values (rows, n), imatrix (n,)) -> bytes from a blocks quantizer
    (float32 (b, block_size), importance (b, block_size)) -> uint8 (b, type_size): ggml's
    `quant_weights` are the imatrix columns of each block, as llama.cpp's quantizer passes them."""
    def quantize(values: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
        blocks = np_blocks(values, qtype, block_size)  # checks the shape
        rows, nb, _ = blocks.shape
        imatrix = np.asarray(imatrix, dtype=np.float32)
        if imatrix.shape != (nb * block_size,):
            raise ValueError(f"{type_name(qtype)}: importance matrix has {imatrix.shape} entries, the rows have "
                             f"{nb * block_size}")
        per_block = imatrix.reshape(nb, block_size)  # block j of the flattened rows has columns j % nb
        flat = blocks.reshape(-1, block_size)
        out = np.empty((len(flat), type_size), dtype=np.uint8)
        step = 1024 if block_size == 256 else 8192
        for s in range(0, len(flat), step):
            j = np.arange(s, min(s + step, len(flat)))
            out[s:s + step] = quantize_blocks(flat[s:s + step], per_block[j % nb])
        return out.reshape(rows, nb * type_size)
    return quantize


def codes_input(blocks: np.ndarray) -> torch.Tensor:
    """numpy blocks (n, type_size) uint8 (often a read-only map) -> a torch copy, for the decoders."""
    return torch.from_numpy(np.array(blocks, dtype=np.uint8))


def np_f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (..., 1) -> the f16 (round to nearest even) as uint8 (..., 2)."""
    return x.astype(np.float16).view(np.uint8)


# -- F32 -----------------------------------------------------------------------------------------
def dequantize_f32(raw: torch.Tensor) -> torch.Tensor:
    # a copy: the bytes are usually a read-only memory map, the caller owns what we return
    values = as_blocks(raw, T.F32, 4, align=4).flatten(-2).view(torch.float32)
    return values.clone(memory_format=torch.contiguous_format)


def quantize_f32(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np_blocks(values, T.F32, 1)[..., 0]).view(np.uint8)


# -- F16 -----------------------------------------------------------------------------------------
def dequantize_f16(raw: torch.Tensor) -> torch.Tensor:
    return as_blocks(raw, T.F16, 2).flatten(-2).view(torch.float16).float()


def quantize_f16(values: np.ndarray) -> np.ndarray:
    return np_blocks(values, T.F16, 1)[..., 0].astype(np.float16, order="C").view(np.uint8)


# -- BF16 ----------------------------------------------------------------------------------------
def dequantize_bf16(raw: torch.Tensor) -> torch.Tensor:
    # torch widens bf16 by shifting the bits up 16, NaN payloads included: same as gguf's int shift
    return as_blocks(raw, T.BF16, 2).flatten(-2).view(torch.bfloat16).float()


def quantize_bf16(values: np.ndarray) -> np.ndarray:
    n = np.ascontiguousarray(np_blocks(values, T.BF16, 1)[..., 0]).view(np.uint32)
    # NaN -> quiet NaN keeping sign and top mantissa bits (ggml_compute_fp32_to_bf16)
    n = np.where((n & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000),
                 (n & np.uint32(0xFFFF0000)) | np.uint32(0x00400000), n)
    # round to nearest even on bit 16; the sum stays below 2**32 (largest: 0xFFFF0000 + 0x8000)
    n = (n + (np.uint32(0x7FFF) + ((n >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return n.astype(np.uint16).view(np.uint8)


register(QuantFormat(T.F32, 1, 4, dequantize_f32, Layout.of([("x", 4, "IEEE binary32")], "x"),
                     quantize=quantize_f32, outtype="f32", file_type=FT.ALL_F32))
register(QuantFormat(T.F16, 1, 2, dequantize_f16, Layout.of([("x", 2, "IEEE binary16")], "x"),
                     quantize=quantize_f16, outtype="f16", file_type=FT.MOSTLY_F16,
                     act_type=T.F16))
register(QuantFormat(T.BF16, 1, 2, dequantize_bf16, Layout.of([("x", 2, "bfloat16: the top 16 bits of a binary32")], "x"),
                     quantize=quantize_bf16, outtype="bf16", file_type=FT.MOSTLY_BF16,
                     act_type=T.BF16))
