"""llama.cpp's CPU rounding of matmul inputs, for `--numerics llamacpp` (Model(numerics="llamacpp")).

Our matmuls multiply float32 activations by the exactly dequantized weights. llama.cpp's CPU backend
does not: before a matmul it converts the activations to its weight type's `vec_dot_type` (the
registry's `QuantFormat.act_type`) and multiplies integers:

    Q4_0 Q5_0 Q8_0 IQ4_NL     x -> Q8_0 blocks of 32: d = amax / 127 stored as f16, q = round(x * 127 / amax)
    Q4_1 Q5_1                 x -> Q8_1: Q8_0's values plus s = f16(d * sum q) per block, which the
                              weight's min multiplies (m * s instead of m * f16(d) * sum q)
    Q2_K .. Q6_K, IQ4_XS      x -> Q8_K blocks of 256: iscale = -127 / (the value of largest |x|),
                              q = min(127, round(iscale * x)), d = 1 / iscale in float32
    F16 / BF16                x -> f16 / bf16

That rounding moves a tiny model's logits by 0.5-1.2 % and a 30-layer model's by several percent per
logit (tests/test_hf_interop.py, benchmarks/RESULTS.md), so llama.cpp and an exact runtime disagree by
that much on the same file. With this mode the runtime rounds the same way (the same values: an
integer dot of rounded activations equals the float dot of their dequantized values up to float32
summation order), and on an f32 KV cache its logits equal llama.cpp's to float32 noise: a check that
a file means the same thing to both, and a way to reproduce llama.cpp's numbers. Not the default: the
rounding is an error against the model the file holds.

The KV cache keeps its own maths: f32 caches are exact in both; a quantized llama.cpp cache type
(q8_0/q4_0) is already computed as llama.cpp does (runtime/kv_cache.py); an f16 cache is not (llama.cpp
also rounds q and the softmax weights to f16 there), so compare on f32 caches (-ctk f32 -ctv f32).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.quants import get_format


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def round_activations(x: torch.Tensor, act_type: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (T, K) float32 as llama.cpp's CPU backend rounds it to act_type (a vec_dot_type) -> the
    rounded values (T, K) float32, and for Q8_1 the per-block correction (T, K / 32) that turns our
    float min term m * f16(d) * sum(q) into llama.cpp's m * f16(d * sum(q)) (else None)."""
    if act_type == T.F16:
        return _f16(x), None
    if act_type == T.BF16:
        return x.to(torch.bfloat16).to(torch.float32), None
    n, K = x.shape
    if act_type in (T.Q8_0, T.Q8_1):  # ggml-cpu quantize_row_q8_0 / q8_1 (x86): id = 127 / amax, round to even
        b = x.reshape(n, K // 32, 32)
        amax = b.abs().amax(-1, keepdim=True)
        d = amax / torch.full_like(amax, 127)
        # (a tensor divided by a tensor: torch's `number / tensor` multiplies by a reciprocal, 1 ulp off C's division)
        inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
        q = torch.round(b * inv)
        out = (q * _f16(d)).reshape(n, K)
        if act_type == T.Q8_0:
            return out, None
        qsum = q.sum(-1, keepdim=True)  # exact: at most 32 * 127
        return out, (_f16(d * qsum) - _f16(d) * qsum).squeeze(-1)
    if act_type == T.Q8_K:  # quantize_row_q8_K_ref: the signed value of largest magnitude sets the scale
        b = x.reshape(n, K // 256, 256)
        top = b.gather(-1, b.abs().argmax(-1, keepdim=True))  # the first of equal magnitudes, as ggml's loop
        nz = top != 0
        one = torch.ones_like(top)
        iscale = torch.where(nz, torch.full_like(top, -127) / torch.where(nz, top, one), torch.zeros_like(top))
        q = torch.round(b * iscale).clamp(max=127)
        d = torch.where(nz, one / torch.where(nz, iscale, one), torch.zeros_like(iscale))
        return (q * d).reshape(n, K), None
    raise ValueError(f"no llama.cpp activation rounding for ggml type {act_type}")


def block_mins(w) -> torch.Tensor:
    """The f16 min `m` of every block of a Q4_1/Q5_1 QTensor (its layout's field "m") -> (N, K / 32) float32."""
    fmt = get_format(w.type)
    m = next(f for f in fmt.layout.fields if f.name == "m")
    raw = w.raw.view(w.raw.shape[0], -1, fmt.type_size)[..., m.start:m.end]
    return raw.contiguous().view(torch.float16).to(torch.float32).squeeze(-1)


class LlamacppOps:
    """A backend's ops module with llama.cpp's rounding of every weight matmul's input: `linear` rounds
    x to the weight's act_type first (and adds Q8_1's min correction); every other op is the backend's
    own. The one-call CPU decode block is off (it multiplies inside C), so decode runs op by op."""

    decode_block = None

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def linear(self, x: torch.Tensor, W, name: str, bias: str | None = None) -> torch.Tensor:
        w = W[name]
        act = get_format(w.type).act_type
        if act is None:
            return self.base.linear(x, W, name, bias)
        xr, fix = round_activations(x.float(), act)
        y = self.base.linear(xr.to(x.dtype), W, name, bias)
        if fix is not None:
            y = y + (fix @ block_mins(w).to(fix.device).T).to(y.dtype)
        return y
