"""CPU matmuls that read GGUF blocks where they lie: the torch backend's `linear` on the CPU.

    y = matmul(x, w)     x (T, K) float32, w a weights.QTensor (N, K) of any type the library has
                         -> y (T, N) float32; None when the compiled library is unavailable or lacks
                         w's type (the caller then takes the torch path)

Two paths, chosen by T (the rows of x):

    T <= GEMV_ROWS   (decode)  qmatmul.cpp's qk_matmul: each weight row's blocks dequantized in
                     registers and dotted with each x row (formats without a fused dot: 1,024 values
                     at a time into an L1 buffer). Reads the weight's bytes once: 96 MB per SmolLM2
                     token instead of 540 MB of float32.
    T >  GEMV_ROWS   (prompt)  dequantize a tile of rows (at most TILE_BYTES of float32, a workspace
                     reused across calls) with qk_dequant_rows and multiply with torch's GEMM. A
                     512-token SmolLM2 prompt ran as fast this way as from a float32 copy of every
                     weight (cached copy / tiles time 0.98, median of 4, same process), so no float32
                     copy of the model is kept (--cpu-cache defaults to none). With bf16=True
                     (--numerics bf16, runtime/numerics.py) the tiles are dequantized straight to
                     bfloat16 (qk_dequant_rows_bf16) and the GEMM is torch's bfloat16 one (AMX tiles
                     where the CPU has them: 2-5x the float32 path per type, 2 threads here;
                     benchmarks/cpu_prompt.py).

Why this design (measured on the 2-core AVX-512 Xeon this was written on, loaded by other jobs, so
same-process A/B ratios):
  - torch 2.13's CPU weight-only int4/int8 kernels ran 2-8x slower than a float32 matmul and a
    torch.compile'd Q4 unpack reached 0.08 GB/s (issue 15). A plain C++ loop per format is short,
    covers every block format with one function each, and builds without torch headers in 1.3 s
    (0.5 s of CPU) with g++ 12, so a first run or a CI job pays almost nothing.
  - The fused dots dequantize in registers and FMA in float32 (AVX-512, or AVX2 + FMA): 11.8 G
    weights/s on a hot Q4_1 576x1536 GEMV (5.4x the dequantize-into-a-buffer loop, 1.7x torch's
    float32 GEMV on the same, already dequantized weights). A whole SmolLM2 token's matmuls took
    12.6 ms on 1 thread while llama.cpp's whole decode step took 19.5 ms in the same minutes.
  - Every quantized type has a fused dot (Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS since 2026-12-05: they
    dequantized into a buffer at 0.5-2.8 G weights/s, now 4.5-13 G on a hot 5632 x 2048 GEMV, 1 thread;
    Q4_0 12, Q4_K 8.7). The sub-4-bit types are what `--fit` picks for layers a small GPU computes here.
  - The K-quants' per-block scale work (6-bit scales and mins, d * scale products) was scalar code
    between the vector loops: 53% of a hot Q4_K dot's samples (perf). The scales are now unpacked a
    32-bit word at a time and the products formed in AVX2 vectors, with the same float operations
    (Q2_K, Q3_K, Q6_K: bit-identical outputs, checked against the previous library), and Q4_K/Q5_K
    sum their min terms lane-wise over the row instead of in order within each block (a chain of 8
    dependent adds per block; their rounding order changed). 1B Q4_K_M decode against llama.cpp
    went from 0.63x / 0.59x to 0.90x / 0.77x (1 / 2 threads, benchmarks/RESULTS.md); per-type
    figures: benchmarks/cpu_kernels.py.
  - Prefetching the row 4 rows ahead (the hardware prefetchers stop at 4 KiB pages): 17.0 -> 12.6 ms
    per token's matmuls.
  - int8 activations with VNNI dot products, as llama.cpp does (tried for Q4_0/Q4_1/Q8_0): only ~10%
    faster per token here (the per-block scale work dominates), for outputs rounded away from the
    float32 reference; not kept. Activations stay float32, so outputs are within float32 rounding
    of dequantize-then-matmul.
  - Where a decode step's time goes besides the matmuls (runtime/ops.py attention on an f16 cache,
    norms, rope): benchmarks/RESULTS.md.

Adding a block format: one dequant_<type> function and one row of FORMATS in qmatmul.cpp. A type the
library lacks falls back to the torch path for that tensor (logged once per type).

The decode step (decode.cpp). At SmolLM2's size a decode step made ~100 torch calls per layer of a
few microseconds each, as long in all as the step's matmuls at 2 threads, and each ctypes call costs
5-15 us of Python. So a decode token goes through a whole block in one call (layer.py: llama and
Gemma 3 blocks, qk_decode_layer = these kernels in sequence), and where that does not apply the
small ops are still one call each: `add_rms_norm`, `rope`, `glu`, `attend_one` (one query row over an
f32/f16 cache, read in place: keys split across threads, flash-decoding style). Each returns None
where it does not apply (the caller then takes the torch ops). Measured effect, SmolLM2 decode at
2 threads against llama.cpp in the same run: 0.72x with the small ops, 1.11x with the whole block.

Threads: torch's thread count (set by -t), one OpenMP pool shared with torch.
"""

from __future__ import annotations

import logging

import torch

from qkvgguf.quants import type_name

from . import build

log = logging.getLogger(__name__)

GEMV_ROWS = 8  # x rows up to which the fused dequant-dot kernel runs; above, dequantized tiles + torch GEMM
TILE_BYTES = 32 << 20  # float32 workspace of the prompt path (largest tile of dequantized rows)

_workspace: dict[torch.dtype, torch.Tensor] = {}
_state: dict = {}  # "bf16_checked": has_bf16_matmul asked (and its warning given) once
_by_type: dict = {}  # ggml type -> (the library, or None when it lacks the type,)


def available() -> bool:
    """Whether the compiled kernels are in use (builds them on first call)."""
    return build.load() is not None


def supports(qtype) -> bool:
    lib = build.load()
    return lib is not None and lib.qk_block_elems(int(qtype)) > 0


def _lib_for(qtype):
    """The library when it has a function for qtype, else None (memoized: this runs once per matmul)."""
    hit = _by_type.get(qtype)
    if hit is not None:
        return hit[0]
    lib = build.load()
    if lib is not None and lib.qk_block_elems(int(qtype)) == 0:
        log.warning("the CPU kernels have no function for %s: those tensors use the torch path", type_name(qtype))
        lib = None
    if build.load() is not None:  # only a built library's answer is final (tests switch the build off and on)
        _by_type[qtype] = (lib,)
    return lib


def _tile(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n values of the prompt path's workspace of that dtype (one per dtype, grown as needed, reused)."""
    ws = _workspace.get(dtype)
    if ws is None or ws.numel() < n:
        ws = torch.empty(n, dtype=dtype)
        _workspace[dtype] = ws
    return ws[:n]


def dequantize_rows(w, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Rows [r0, r1) of QTensor w as float32 (r1 - r0, K); None when the library cannot."""
    lib = _lib_for(w.type)
    if lib is None:
        return None
    K = w.shape[-1]
    if out is None:
        out = torch.empty(r1 - r0, K, dtype=torch.float32)
    rc = lib.qk_dequant_rows(int(w.type), w.raw.data_ptr(), w.raw.stride(0), r0, r1, K, out.data_ptr(),
                             torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"tensor '{w.name}': {w.type.name} row of {K} values is not a whole number of blocks")
    return out


def matmul(x: torch.Tensor, w, bf16: bool = False) -> torch.Tensor | None:
    """x (T, K) float32 @ w.T for QTensor w (N, K) -> (T, N) float32; None when the library cannot.
    bf16: above GEMV_ROWS rows, the GEMM takes x and the weight tiles rounded to bfloat16 (to nearest,
    ties to even) and its bfloat16 output becomes float32 again (--numerics bf16); decode rows are
    unaffected (the fused float32 dots)."""
    lib = _lib_for(w.type)
    if lib is None or w.raw.device.type != "cpu" or len(w.shape) != 2:
        return None
    N, K = w.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    T = x.shape[0]
    y = torch.empty(T, N, dtype=torch.float32)
    if T <= GEMV_ROWS:
        rc = lib.qk_matmul(w.type.value, w.raw.data_ptr(), w.raw.stride(0), N, K, x.data_ptr(), T, y.data_ptr(),
                           torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"tensor '{w.name}': {w.type.name} row of {K} values is not a whole number of blocks")
        return y
    if bf16:
        return _matmul_bf16(lib, x, w, y)
    rows = max(1, min(N, TILE_BYTES // (4 * K)))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        tile = dequantize_rows(w, r0, r1, _tile((r1 - r0) * K).view(r1 - r0, K))
        torch.mm(x, tile.T, out=y[:, r0:r1]) if r1 - r0 == N else y[:, r0:r1].copy_(x @ tile.T)
    return y


def _matmul_bf16(lib, x: torch.Tensor, w, y: torch.Tensor) -> torch.Tensor:
    """The prompt path in bfloat16: tiles dequantized straight to bfloat16 by qk_dequant_rows_bf16
    (half the bytes of a float32 tile), one bfloat16 copy of x, torch's bfloat16 GEMM (oneDNN: AMX
    tiles where the CPU has them, float32 accumulation), output rounded to bfloat16 and widened."""
    if not _state.get("bf16_checked"):
        _state["bf16_checked"] = True
        if not has_bf16_matmul():
            log.warning("this CPU has no bfloat16 matrix instructions (AMX-BF16 / AVX512-BF16): --numerics bf16 "
                        "computes the same values as on one that has, but more slowly than --numerics exact")
    N, K = w.shape
    xb = x.to(torch.bfloat16)
    rows = max(1, min(N, TILE_BYTES // (2 * K)))
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        tile = _tile((r1 - r0) * K, torch.bfloat16).view(r1 - r0, K)
        rc = lib.qk_dequant_rows_bf16(int(w.type), w.raw.data_ptr(), w.raw.stride(0), r0, r1, K, tile.data_ptr(),
                                      torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"tensor '{w.name}': {w.type.name} row of {K} values is not a whole number of blocks")
        y[:, r0:r1] = xb @ tile.T
    return y


def has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX tiles or AVX512-BF16), as torch detects it."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


# -- the decode step's small ops (decode.cpp) ------------------------------------------------------------
def _plain(*ts: torch.Tensor) -> bool:
    """float32 CPU tensors outside autograd (convert/fisher.py differentiates through the torch ops)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad for t in ts)


def add_rms_norm(x: torch.Tensor, a: torch.Tensor | None, w: torch.Tensor, eps: float):
    """(rms_norm(x + a) * w, x + a) over the last dim (a None: rms_norm(x) * w, x); None when the
    library is unavailable or a tensor is not float32 on the CPU."""
    lib = build.load()
    if lib is None or not _plain(x, w) or (a is not None and (not _plain(a) or a.shape != x.shape)):
        return None
    n = x.shape[-1]
    if w.numel() != n:
        return None
    x = x.contiguous()
    a = a.contiguous() if a is not None else None
    w = w.contiguous()
    h = torch.empty_like(x)
    xo = torch.empty_like(x) if a is not None else x
    lib.qk_add_rms_norm(x.data_ptr(), a.data_ptr() if a is not None else None, w.data_ptr(), x.numel() // n, n,
                        eps, xo.data_ptr(), h.data_ptr(), torch.get_num_threads())
    return h, xo


def glu(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor | None:
    """silu(gate) * up, or gelu_tanh(gate) * up, as the decode block computes it (so the one-call block
    and the op-by-op path give the same bits); None where the library cannot."""
    lib = build.load()
    if lib is None or not _plain(gate, up) or gate.shape != up.shape:
        return None
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    lib.qk_glu(gate.data_ptr(), up.data_ptr(), gate.numel(), int(gelu), out.data_ptr())
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor | None:
    """ops.rope's rotation of x (heads, T, d) as a new tensor; None where the library cannot."""
    lib = build.load()
    if lib is None or not _plain(x, cos, sin) or x.dim() != 3 or cos.shape != (x.shape[1], x.shape[2] // 2) \
            or sin.shape != cos.shape or x.shape[2] % 2:
        return None
    out = x.contiguous().clone() if x.is_contiguous() else x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    lib.qk_rope(out.data_ptr(), out.shape[0], out.shape[1], out.shape[2], cos.data_ptr(), sin.data_ptr(), int(neox))
    return out


def attend_one(K: torch.Tensor, V: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
               window: int = 0, ring: int = 0) -> torch.Tensor | None:
    """Store k, v (n_kv, 1, d) at position pos of one layer's cache rows K, V ((n_kv, rows, d) float32
    or float16, written in place; a ring of `ring` rows: slot pos % ring), then attention of the one
    query q (n_head, 1, d) over the positions it sees (causal; window > 0: the last `window`) as
    ops.attention computes it -> (n_head, 1, d) float32. None where the library cannot."""
    lib = build.load()
    if lib is None or not _plain(q, k, v) or K.dtype not in (torch.float16, torch.float32) or V.dtype != K.dtype \
            or K.device.type != "cpu" or not (K.is_contiguous() and V.is_contiguous()) or q.shape[1] != 1:
        return None
    H, _, d = q.shape
    G, cap = K.shape[0], K.shape[1]
    slot = pos % ring if ring else pos
    S = min(pos + 1, ring) if ring else pos + 1
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(H, 1, d, dtype=torch.float32)
    rc = lib.qk_attn_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), H, G, d, K.data_ptr(), V.data_ptr(),
                            int(K.dtype == torch.float16), cap, slot, S, pos, window, ring, d ** -0.5,
                            out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"attend_one: {H} query heads, {G} KV heads, slot {slot} of {cap} rows: bad shape")
    return out
