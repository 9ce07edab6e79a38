"""Quantized matmul: y (M, N) = x (M, K) @ dequant(w).T, reading the raw GGUF bytes of w.

w is a weight as it sits in the GGUF file: (N, K / block_size * type_size) uint8, one row per
output feature. No dequantized copy of w is ever written to memory: each program loads a tile of
block bytes and decodes it in registers (`dequant.py`), so the memory traffic of one call is

    N * row_bytes (weight, read once) + M * K * x.element_size() + M * N * y.element_size()

which for decode (M = 1) is almost all weight bytes: the GEMV is bound by memory bandwidth and its
target is the device-to-device copy bandwidth (benchmarks/gpu_suite.py measures both).

Two launch strategies, chosen by M in `qmatmul`:

- GEMV (M <= GEMV_MAX_M): a program owns BLOCK_N rows of w and walks K in steps of GS groups
  (`dequant.LAYOUTS`: a group is INNER consecutive quant bytes of a block) with 3-D tiles (rows,
  groups, inner bytes). Scales are loaded once per (row, block, group); each plane is multiplied
  by the matching activations and reduced on the CUDA cores, for every one of the M (<= 8) rows
  of x, so the weight tile is read from memory once for all of them. For M = 1 the products
  accumulate in a tile-shaped register accumulator and are reduced once, after the K loop.
- GEMM (prompt chunks): tutorial-03 tiling (BLOCK_M x BLOCK_N programs, grouped along M for L2
  reuse); each plane is dequantized as a K-major tile (GS, INNER, BLOCK_N), reshaped to
  (GS * INNER, BLOCK_N) and fed to `tl.dot` against the activations gathered in the same
  (permuted) element order. fp16 activations: fp16 operands (the dequantized weight rounded to
  fp16); fp32: fp32 operands with `input_precision` TF32 by default on sm80+ (as accurate as
  fp16, fp32's range; "tf32x3" on request: near-fp32, but ptxas spills beyond 16 x 64 tiles),
  "ieee" below sm80 and in the interpreter. fp32 accumulation in all.

Both accumulate in float32 and write `out_dtype` (default: x's dtype).

Autotuning: `gemv_configs` / `gemm_configs` list the candidates; `qmatmul(..., config=...)` pins
one (the tests do; under TRITON_INTERPRET=1 big interpreter tiles are used without tuning, and with
QKVGGUF_AUTOTUNE=0 the first candidate: one compile per format instead of one per candidate, for
correctness runs on a GPU where compile time is the cost, as the GPU suite's tests stage).
`aot.py` compiles every candidate for sm75/sm80/sm90 without a GPU and reports ptxas's
registers and spills.

No repacking: the kernels read the GGUF bytes as loaded (see dequant.py), so a weight costs
exactly its file size in VRAM.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from qkvgguf.errors import QkvggufError
from qkvgguf.quants import get_format

from ..planner import DENSE_MIN_M, DENSE_TILE_BYTES
from .dequant import check_weight, dequant, layout_of
from .launch import autotune_bench, fp32_precision, interpreting, next_pow2

GEMV_MAX_M = 8
# From DENSE_MIN_M rows of x on a GPU, w is dequantized to fp16 tiles of at most DENSE_TILE_BYTES and
# multiplied with cuBLAS (dense_matmul); the VRAM planner counts that scratch, so both constants live there.


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _gemv_kernel(
    x_ptr, w8_ptr, w16_ptr, y_ptr,  # pointers
    M, N, NBLK,  # sizes: x rows, w rows, blocks per w row
    stride_xm, stride_wn, stride_ym,  # strides (stride_wn in bytes)
    QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,  # format
    G: tl.constexpr, INNER: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GS: tl.constexpr,  # meta: GS groups per K step
):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_off = (rn.to(tl.int64) * stride_wn)[:, None, None]  # (BLOCK_N, 1, 1)
    nmask = (rn < N)[:, None, None]
    gs = tl.arange(0, GS)[None, :, None]  # (1, GS, 1)
    ii = tl.arange(0, INNER)[None, None, :]  # (1, 1, INNER)
    rm = tl.arange(0, BLOCK_M)
    NG = NBLK * G  # groups per row
    if BLOCK_M == 1:
        # one row of x (decode): products accumulate element-wise in the tile's own shape and are
        # reduced once at the end, so the K loop has no cross-thread reduction (no shuffles, no
        # barrier per step) and keeps its loads in flight
        acc3 = tl.zeros((BLOCK_N, GS, INNER), dtype=tl.float32)
        for g0 in range(0, NG, GS):
            grp = g0 + gs
            kmask = grp < NG
            for p in tl.static_range(PLANES):
                w, e = dequant(w8_ptr, w16_ptr, row_off, grp // G, grp % G, ii, nmask & kmask, QTYPE, p, BS, TS)
                xv = tl.load(x_ptr + e, mask=kmask & (ii >= 0), other=0.0).to(tl.float32)
                acc3 += w * xv
        acc = tl.sum(tl.sum(acc3, axis=2), axis=1)[None, :]  # (1, BLOCK_N)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, NG, GS):
            grp = g0 + gs
            kmask = grp < NG
            for p in tl.static_range(PLANES):
                w, e = dequant(w8_ptr, w16_ptr, row_off, grp // G, grp % G, ii, nmask & kmask, QTYPE, p, BS, TS)
                for m in tl.static_range(BLOCK_M):
                    xmask = kmask & (tl.zeros_like(grp) + m < M)  # a tensor mask: M may be a constexpr 1
                    xv = tl.load(x_ptr + m * stride_xm + e, mask=xmask, other=0.0).to(tl.float32)
                    part = tl.sum(tl.sum(w * xv, axis=2), axis=1)  # (BLOCK_N,)
                    acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _gemm_kernel(
    x_ptr, w8_ptr, w16_ptr, y_ptr,  # pointers
    M, N, NBLK, M_BUCKET,  # sizes; M_BUCKET (M rounded up to a power of two) only keys the autotuner
    stride_xm, stride_wn, stride_ym,  # strides (stride_wn in bytes)
    QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,  # format
    G: tl.constexpr, INNER: tl.constexpr, PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GS: tl.constexpr, GROUP_M: tl.constexpr,  # meta
    DOT_F16: tl.constexpr, PRECISION: tl.constexpr,
):
    # grouped ordering: GROUP_M row-tiles of x share each column-tile of w while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # the weight tile is K-major, (GS, INNER, BLOCK_N), reshaped to (GS * INNER, BLOCK_N) for tl.dot
    row_off = (rn.to(tl.int64) * stride_wn)[None, None, :]
    nmask = (rn < N)[None, None, :]
    gs = tl.arange(0, GS)[:, None, None]
    ii = tl.arange(0, INNER)[None, :, None]
    xrow = x_ptr + rm[:, None] * stride_xm
    mmask = (rm < M)[:, None]
    NG = NBLK * G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, NG, GS):
        grp = g0 + gs
        kmask = grp < NG
        xkmask = tl.reshape(kmask & (ii >= 0), (GS * INNER,))[None, :]
        for p in tl.static_range(PLANES):
            w, e = dequant(w8_ptr, w16_ptr, row_off, grp // G, grp % G, ii, nmask & kmask, QTYPE, p, BS, TS)
            w = tl.reshape(w, (GS * INNER, BLOCK_N))
            xv = tl.load(xrow + tl.reshape(e, (GS * INNER,))[None, :], mask=mmask & xkmask, other=0.0)
            if DOT_F16:
                acc = tl.dot(xv.to(tl.float16), w.to(tl.float16), acc)
            else:
                acc = tl.dot(xv.to(tl.float32), w, acc, input_precision=PRECISION)
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mmask & (rn[None, :] < N))


# -- autotune candidates -------------------------------------------------------------------------
def gemv_configs(qtype: T) -> list[triton.Config]:
    """GEMV candidates: BLOCK_N rows per program, GS groups (of INNER quant bytes) per K step.

    Kept to 8-32 quant bytes per thread per step: more holds too many activations and values in
    registers (ptxas spills, occupancy falls); fewer leaves too few loads in flight. 1024-byte steps
    were the fastest tiles on an H200 at 4096 and 14336 x 4096 (Q4_K, Q4_0: 18-26% of copy bandwidth
    against 15-20% for the best 512-byte tile; benchmarks/results/gpu-2026-12-04/sweep.json).
    """
    lay, tiling = layout_of(qtype), get_format(qtype).tiling
    inner = lay.inner
    out = []
    for warps in (4, 8):
        for block_n in (2, 4, 8, 16):
            for k_bytes in (64, 128, 256, 512, 1024):  # quant bytes of one row per K step
                per_thread = block_n * k_bytes // (32 * warps)
                if (block_n, k_bytes, warps) in tiling.gemv_skip:
                    continue  # ptxas spills (the record's Tiling.gemv_skip, measured with aot.py)
                if k_bytes >= inner and 8 <= per_thread <= 32:
                    out.append(triton.Config({"BLOCK_N": block_n, "GS": k_bytes // inner}, num_warps=warps, num_stages=2))
    return out


def gemm_configs(qtype: T) -> list[triton.Config]:
    """GEMM candidates: (BLOCK_M, BLOCK_N) tiles, GS groups per K step (32 rows of tl.dot per
    plane). ptxas (sm80, fp16) spills for 64-row K steps, 128 x 128 tiles, and 64 x 128 for the
    K-quants: those are left out."""
    lay, tiling = layout_of(qtype), get_format(qtype).tiling
    tiles = [(64, 64, 8), (128, 64, 8), (32, 64, 4), (16, 64, 4)]
    if lay.block_size == 32:
        tiles.append((64, 128, 8))
    tiles = [t for t in tiles if t[:2] not in tiling.gemm_spills]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GS": max(1, 32 // lay.inner), "GROUP_M": 8},
                          num_warps=warps, num_stages=2)
            for bm, bn, warps in tiles]


# (BLOCK_M, BLOCK_N) tiles that spill for some formats (aot.py --all-configs, sm80, fp16) are the records'
# Tiling.gemm_spills (qkvgguf/quants/): four planes of 2-bit values (Q2_K, Q3_K) or a table decode
# (IQ4_*) hold more registers per tile.


@functools.cache
def _tuned(kind: str, qtype: T):
    """The autotuned kernel of one strategy and format, built on first use (never at import)."""
    kernel, configs = (_gemv_kernel, gemv_configs(qtype)) if kind == "gemv" else (_gemm_kernel, gemm_configs(qtype))
    key = ["M", "N", "NBLK"] if kind == "gemv" else ["M_BUCKET", "N", "NBLK"]  # not one tuning per prompt length
    return triton.autotune(configs=configs, key=key, do_bench=autotune_bench, **_AUTOTUNE_DISK_CACHE)(kernel)


# Triton >= 3.2 can keep autotuning results in its on-disk cache: a second run (another process)
# of the same model skips the timing of every candidate.
_AUTOTUNE_DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


# -- wrapper -------------------------------------------------------------------------------------
def dense_matmul(x: torch.Tensor, w_raw: torch.Tensor, qtype, out: torch.Tensor) -> torch.Tensor:
    """out = x @ dequant(w).T through cuBLAS: w is dequantized to x's dtype a tile of rows at a
    time (at most DENSE_TILE_BYTES of scratch), each tile multiplied as it is made.

    For prompt-sized M the product is compute-bound: cuBLAS's tensor-core GEMM on an fp16 tile
    beats dequantizing inside a Triton GEMM, and the extra traffic (write and read the tile once)
    is small next to M x N x K multiply-adds."""
    from .dequant import dequantize_rows

    N, K = w_raw.shape[0], x.shape[1]
    rows = max(1, DENSE_TILE_BYTES // (K * x.element_size()))
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        tile = dequantize_rows(w_raw[n0:n1], qtype, out_dtype=x.dtype)
        if n1 - n0 == N and out.dtype == x.dtype:
            torch.matmul(x, tile.T, out=out)
        else:
            out[:, n0:n1] = x @ tile.T
    return out


def qmatmul(x: torch.Tensor, w_raw: torch.Tensor, qtype, out_dtype: torch.dtype | None = None,
            *, config: dict | None = None, precision: str | None = None, strategy: str | None = None) -> torch.Tensor:
    """x (M, K) fp16/fp32 @ dequant(w_raw (N, row_bytes) uint8, qtype).T -> (M, N) out_dtype.

    config pins the meta-parameters, e.g. {"BLOCK_N": 16, "GS": 4, "num_warps": 4} for the GEMV
    (M <= 8) or {"BLOCK_M": 16, "BLOCK_N": 32, "GS": 2, "GROUP_M": 8} for the GEMM; GS counts
    groups of dequant.LAYOUTS[qtype].inner quant bytes per K step. precision: tl.dot precision of
    the GEMM with fp32 x (launch.fp32_precision: "tf32" by default on sm80+, or "tf32x3", "ieee").
    strategy: "gemv", "gemm" (the Triton kernels) or "dense" (dense_matmul); default by M: GEMV
    up to GEMV_MAX_M rows, dense from DENSE_MIN_M rows on a CUDA device, the Triton GEMM between.
    """
    qtype, lay, nblk = check_weight(w_raw, qtype, "qmatmul")
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.float32):
        raise QkvggufError(f"qmatmul: x must be 2-D float16/float32, got {tuple(x.shape)} {x.dtype}")
    M, K = x.shape
    N = w_raw.shape[0]
    if nblk * lay.block_size != K:
        raise QkvggufError(f"qmatmul: x has K={K} but the {lay.name} weight rows hold "
                           f"{nblk * lay.block_size} elements ({w_raw.shape[1]} bytes)")
    if x.device != w_raw.device:
        raise QkvggufError(f"qmatmul: x on {x.device} but w_raw on {w_raw.device}")
    out_dtype = out_dtype or x.dtype
    if x.stride(1) != 1:
        x = x.contiguous()
    w16 = w_raw.view(torch.int16)  # the same bytes, for the 2-byte f16 scales
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    fmt = lay.kernel_args()
    args = (x, w_raw, w16, y, M, N, nblk, x.stride(0), w_raw.stride(0), y.stride(0))
    if strategy is None:
        strategy = ("gemv" if M <= GEMV_MAX_M else
                    "dense" if M >= DENSE_MIN_M and x.is_cuda and config is None else "gemm")
    if strategy == "dense":
        return dense_matmul(x, w_raw, qtype, y)
    if strategy == "gemv":
        if M > GEMV_MAX_M:
            raise QkvggufError(f"qmatmul: the GEMV takes at most {GEMV_MAX_M} rows, got {M}")
        fmt["BLOCK_M"] = next_pow2(M)
        if config is None and interpreting():
            config = interpreter_config("gemv", qtype, N)
        elif config is None and not autotuning():
            config = untuned_config("gemv", qtype)
        if config is None:
            kernel = _tuned("gemv", qtype)
            kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **fmt)
        else:
            _gemv_kernel[(triton.cdiv(N, config["BLOCK_N"]),)](*args, **fmt, **config)
        return y
    args = args[:7] + (next_pow2(M),) + args[7:]
    fmt["DOT_F16"] = x.dtype == torch.float16
    fmt["PRECISION"] = fp32_precision(x.device, precision)
    if config is None and interpreting():
        config = interpreter_config("gemm", qtype, N, M)
    elif config is None and not autotuning():
        config = untuned_config("gemm", qtype)
    if config is None:
        kernel = _tuned("gemm", qtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, **fmt)
    else:
        grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        _gemm_kernel[grid](*args, **fmt, **config)
    return y


def autotuning() -> bool:
    """False when QKVGGUF_AUTOTUNE=0: kernels launch with their first candidate, untimed."""
    return os.environ.get("QKVGGUF_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def untuned_config(kind: str, qtype: T) -> dict:
    """The first autotune candidate as a pinned config (QKVGGUF_AUTOTUNE=0)."""
    c = (gemv_configs if kind == "gemv" else gemm_configs)(qtype)[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def interpreter_config(kind: str, qtype: T, N: int = 64, M: int = 32) -> dict:
    """Big tiles for TRITON_INTERPRET=1, where the cost is per program and per statement: BLOCK_N
    grows with N (a 262,144-row output matrix ran in 4,096 programs of 64 rows for 88 s, in 256 of
    1,024 for 16 s), up to 2^19 values in the GEMV's (BLOCK_N, GS, INNER) tile (Triton's cap is 2^20);
    512 values of K per step; the GEMM's BLOCK_M no larger than M needs."""
    inner = layout_of(qtype).inner
    if kind == "gemv":
        gs = max(1, 512 // inner)
        return {"BLOCK_N": max(64, min(next_pow2(N) // 16, (1 << 19) // (gs * inner))), "GS": gs}
    return {"BLOCK_M": max(16, min(64, next_pow2(M))), "BLOCK_N": max(64, min(next_pow2(N) // 16, 1024)),
            "GS": max(1, 512 // inner), "GROUP_M": 8}