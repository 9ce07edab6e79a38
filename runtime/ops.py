"""Torch reference ops (float32): the CPU backend and the reference for the Triton kernels.

`linear` is the single dispatch point for matmuls against GGUF weights; the Triton backend
replaces it on CUDA devices. On the CPU it multiplies with the compiled block-format kernels
(runtime/cpu: the weight's GGUF bytes are read in place, no float32 copy); where those are
unavailable (no compiler, QKVGGUF_CPU_KERNELS=0, a type they lack) or the weight lives on another
device, it multiplies by the dequantized float32 weight (through the `Weights` cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkvgguf.config import ModelConfig

from . import cpu


def linear(x: torch.Tensor, W, name: str, bias: str | None = None) -> torch.Tensor:
    """x (T, in) @ W[name].T (out, in) -> (T, out), plus W[bias] if given."""
    if name in getattr(W, "cpu_computed", ()):  # duck-typed weight mappings need not have it
        return host_linear(x, W, name, bias)
    y = None
    if x.device.type == "cpu" and (x.shape[0] <= cpu.GEMV_ROWS or W.cache.peek(name) is None):
        y = cpu.matmul(x, W[name])  # None: no kernels for this tensor
    if y is None:
        y = x @ W.dense(name).T
    if bias is not None:
        y = y + W.dense(bias)
    return y


def host_linear(x: torch.Tensor, W, name: str, bias: str | None = None) -> torch.Tensor:
    """A CPU-computed unit's matmul (planner placement "cpu"), from any backend: x goes to the host
    as float32, the CPU kernels read W[name]'s blocks from host memory, y comes back in x's dtype
    and device. Moves T x (in + out) values, never the weight."""
    xh = x.to("cpu", torch.float32)
    y = cpu.matmul(xh, W[name])
    if y is None:  # no CPU kernel for this type: dequantize (through the cache) and multiply
        y = xh @ W.dense(name).T
    if bias is not None:
        y = y + W.dense(bias).to("cpu", torch.float32)
    return y.to(x.device, x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Normalize over the last dim: x / sqrt(mean(x^2) + eps) * weight (in out_dtype, default x's)."""
    fused = cpu.add_rms_norm(x, None, weight, eps)  # float32 on the CPU: one call (runtime/cpu)
    out = fused[0] if fused is not None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    return out if out_dtype is None else out.to(out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """h = x + residual (the new residual stream), out = rms_norm(h) * weight -> (out, h)."""
    fused = cpu.add_rms_norm(residual, x, weight, eps)
    if fused is not None:
        return fused
    h = residual + x
    return rms_norm(h, weight, eps), h


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    fused = cpu.glu(gate, up, gelu=False)  # float32 on the CPU: the decode block's own arithmetic
    return fused if fused is not None else F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GELU (tanh approximation, as ggml_gelu and transformers' gelu_pytorch_tanh) gated FFN (gemma)."""
    fused = cpu.glu(gate, up, gelu=True)
    return fused if fused is not None else F.gelu(gate, approximate="tanh") * up


def rope_inv_freq(cfg: ModelConfig, freq_factors: torch.Tensor | None = None,
                  base: float | None = None) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2 (base: cfg.rope_base unless given), divided by per-frequency
    factors (llama3's rope_freqs)."""
    d = cfg.rope_dim
    device = freq_factors.device if freq_factors is not None else None  # the factors may live on the GPU
    inv = 1.0 / ((cfg.rope_base if base is None else base) ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if freq_factors is not None:
        inv = inv / freq_factors.float()
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0):
    """Angles pos/scale * theta_i: cos, sin of shape (T, d/2)."""
    angles = (positions.float() / scale)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate x (heads, T, d) by position.

    Normal (llama GGUF): pairs (x[2i], x[2i+1]). NeoX (qwen): pairs (x[i], x[i + d/2]).
    """
    fused = cpu.rope(x, cos, sin, neox)  # float32 on the CPU: one call (runtime/cpu)
    if fused is not None:
        return fused
    if neox:
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


# -- attention over the KV cache: runtime/kv_cache.py stores through these, Model's choice of module
def kv_write(store, layer: int, pos, x: torch.Tensor) -> None:
    """Store x (n_kv, T, d) at positions [pos, pos + T) of one layer of a cache store (kv_quant.Store);
    pos may be a one-element device tensor (T = 1: a CUDA-graph step)."""
    if isinstance(pos, torch.Tensor):
        store.write_at(layer, pos, x)
    else:
        store.write(layer, pos, x)


def kv_read(store, layer: int, end: int) -> torch.Tensor:
    """Positions [0, end) of one layer as `attention` takes them: float32 (n_kv, end, d)."""
    return store.read(layer, end)


def attend_one(K: torch.Tensor, V: torch.Tensor, ring: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               pos: int, window: int = 0) -> torch.Tensor | None:
    """The decode step's kv_write + kv_read + attention in one call, over a layer's plain f32/f16
    rows K, V (KVCache.dense_layer) on the CPU (runtime/cpu attend_one reads them in place, no
    float32 copy of the layer): q (n_head, 1, d) at position pos -> (n_head, 1, d) float32. None
    otherwise (the caller then writes, reads and attends through the three ops above)."""
    return cpu.attend_one(K, V, q, k, v, pos, window, ring)


def decode_block(m, i: int, h: torch.Tensor, x: torch.Tensor, rope, cache, next_norm: str):
    """Block i for one token on the CPU as one call (runtime/cpu/layer.py), returning the block's
    (h, x); None where it does not apply (the caller runs the architecture's Python block)."""
    from .cpu.layer import decode_block as fused

    return fused(m, i, h, x, rope, cache, next_norm)


def key_positions(S: int, end, ring: int, device) -> torch.Tensor:
    """Position held by each of S key rows: row j itself, or in a ring of `ring` rows after
    positions [0, end) were written, the last p < end with p % ring == j (negative: never written)."""
    j = torch.arange(S, device=device)
    if not ring:
        return j
    return j + ring * torch.div(end - 1 - j, ring, rounding_mode="floor")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past, window: int = 0,
              ring: int = 0) -> torch.Tensor:
    """Causal GQA attention. q (n_head, T, d) at positions [n_past, n_past+T); k, v (n_kv, S, d) hold
    positions [0, S >= n_past+T), or with ring > 0 a ring of S <= ring rows (key_positions).
    window > 0: a query at p sees keys at positions (p - window, p] only.

    n_past may be a one-element device tensor (T = 1): the keys past it are masked."""
    T, S = q.shape[1], k.shape[1]
    q = q.to(k.dtype)  # the float32 rows of kv_read: the reference computes in float32
    mask = None
    if window or ring:
        qpos = torch.arange(T, device=q.device)[:, None] + n_past  # (T, 1)
        kpos = key_positions(S, n_past + T, ring, q.device)[None, :]  # (1, S)
        mask = (kpos <= qpos) & (kpos >= 0)
        if window:
            mask &= kpos > qpos - window
    if T == 1 and not isinstance(n_past, torch.Tensor):
        # one query row (decode): the heads sharing a KV head as one matmul against it. SDPA with
        # enable_gqa copies K and V per query head first (9x the work at 600 keys on the CPU)
        H, d, G = q.shape[0], q.shape[2], k.shape[0]
        s = (q.reshape(G, H // G, d) @ k.transpose(1, 2)) * d ** -0.5  # (G, H/G, S)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1) @ v).view(H, 1, d)
    if mask is None:
        # query t (absolute position n_past + t) sees keys 0 .. n_past + t
        mask = torch.arange(S, device=q.device)[None, :] <= (torch.arange(T, device=q.device)[:, None] + n_past)
    gqa = q.shape[0] != k.shape[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # differentiated (convert/fisher.py): the 3-D call's math path, which saves its own copies of K
        # and V for the backward pass; the flash kernel would save views of the cache, written in place later
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    # with a batch dimension, torch's CPU SDPA takes its flash kernel (no K/V copies per query head, no
    # T x S score matrix): 512 x 512 at 32/4 heads, d=64: 14.5 ms against 41.8 ms for the 3-D call's math path
    # (benchmarks/cpu_prompt.py)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=gqa)[0]
