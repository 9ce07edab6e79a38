"""One decode token through a whole transformer block in one call: decode.cpp's qk_decode_layer.

    out = decode_block(model, i, h, x, rope, cache, next_norm)   # (h, x) as the block returns them, or None

The Python blocks (runtime/arch: llama, gemma3) are the model and the reference; this runs the same
block for one token (T = 1) on the CPU as one ctypes call instead of ~15 (projections, norms, rope,
attention, FFN), each of which cost 5-15 us of Python and ctypes overhead, about a third of a
2-thread SmolLM2 decode step. The arithmetic is the same kernels' (qmatmul.cpp's dots, decode.cpp's
norm, rope and attention) in the same order; tests/test_cpu_kernels.py compares the two paths.

It applies when everything the block reads is plain: the torch backend on the CPU, every weight of
the block resident as GGUF blocks of a type the library has (no planner placement), an f32/f16 KV
cache without rotation, one query row at a host position. Anything else returns None and the Python
block runs. The per-layer argument structs are built once per model (weights and norms fixed); a
step fills in the cache, position, rope row and the input/output pointers.
"""

from __future__ import annotations

import ctypes

import torch

from . import build

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class QkWeight(ctypes.Structure):
    _fields_ = [("data", _p), ("row_stride", _i64), ("N", _i64), ("K", _i64), ("type", _i32), ("pad", _i32)]


class QkLayer(ctypes.Structure):
    _fields_ = [*((n, QkWeight) for n in ("wq", "wk", "wv", "wo", "gate", "up", "down")),
                *((n, _p) for n in ("bq", "bk", "bv", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm",
                                    "ffn_norm", "next_norm")),
                ("n_embd", _i64), ("n_head", _i64), ("n_head_kv", _i64), ("head_dim", _i64), ("n_ff", _i64),
                ("eps", _f32), ("q_scale", _f32), ("kq_scale", _f32), ("neox", _i32), ("gelu", _i32), ("window", _i64),
                ("K", _p), ("V", _p), ("cap", _i64), ("ring", _i64), ("pos", _i64), ("kv_f16", _i32),
                ("n_threads", _i32), ("cos_", _p), ("sin_", _p), ("x", _p), ("h", _p), ("x_out", _p), ("h_out", _p)]


MATRICES = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "gate": "ffn_gate",
            "up": "ffn_up", "down": "ffn_down"}


def _bind(lib) -> None:
    if not getattr(lib, "_qk_layer_bound", False):
        lib.qk_decode_layer.argtypes = [ctypes.POINTER(QkLayer)]
        lib.qk_decode_layer.restype = ctypes.c_int
        lib._qk_layer_bound = True


def _layer(m, i: int, next_norm: str, lib):
    """The fixed part of block i's struct, with the tensors it points into (kept alive beside it),
    or None when the block has something the C block does not do."""
    cfg, W = m.config, m.weights
    if cfg.block not in ("llama", "gemma3") or cfg.ffn_act not in ("silu", "gelu_tanh") \
            or cfg.rope_dim != cfg.head_dim or getattr(W, "cpu_computed", ()) or W.streamed:
        return None
    p = f"blk.{i}."
    L, keep = QkLayer(), []
    for field, short in MATRICES.items():
        w = W[p + short + ".weight"]
        if w.raw.device.type != "cpu" or len(w.shape) != 2 or lib.qk_block_elems(int(w.type)) == 0 \
                or w.shape[1] % lib.qk_block_elems(int(w.type)) or w.raw.stride(-1) != 1:
            return None
        keep.append(w.raw)
        setattr(L, field, QkWeight(w.raw.data_ptr(), w.raw.stride(0), w.shape[0], w.shape[1], int(w.type), 0))

    def vec(name):
        t = W.dense(name).float().contiguous()
        keep.append(t)
        return t.data_ptr()

    if cfg.qkv_bias:
        L.bq, L.bk, L.bv = (vec(p + f"attn_{c}.bias") for c in "qkv")
    if cfg.qk_norm:
        L.q_norm, L.k_norm = vec(p + "attn_q_norm.weight"), vec(p + "attn_k_norm.weight")
    if cfg.block == "gemma3":
        L.post_attn_norm, L.post_ffn_norm = vec(p + "post_attention_norm.weight"), vec(p + "post_ffw_norm.weight")
    L.ffn_norm, L.next_norm = vec(p + "ffn_norm.weight"), vec(next_norm)
    L.n_embd, L.n_head, L.n_head_kv, L.head_dim = cfg.n_embd, cfg.n_head, cfg.n_head_kv, cfg.head_dim
    L.n_ff = W[p + "ffn_gate.weight"].shape[0]
    E, qd, kvd, F = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, L.n_ff
    want = {"wq": (qd, E), "wk": (kvd, E), "wv": (kvd, E), "wo": (E, qd), "gate": (F, E), "up": (F, E),
            "down": (E, F)}
    if any(tuple(W[p + MATRICES[f] + ".weight"].shape) != shape for f, shape in want.items()):
        return None  # the C block sizes its buffers from these: anything else goes to the Python block
    L.eps = cfg.norm_eps
    L.q_scale = cfg.attn_scale * cfg.head_dim ** 0.5 if cfg.attn_scale else 1.0
    L.kq_scale = cfg.head_dim ** -0.5  # as cpu.attend_one passes it (the same float32 for any head_dim)
    L.neox, L.gelu, L.window = int(cfg.rope_neox), int(cfg.ffn_act == "gelu_tanh"), cfg.window(i)
    return L, keep


def decode_block(m, i: int, h: torch.Tensor, x: torch.Tensor, rope, cache, next_norm: str):
    """Block i of model m for one token at cache.pos: (the next normed input, the new residual), both
    (1, n_embd) float32; None where the C block does not apply (the caller runs the Python block)."""
    if h.shape[0] != 1 or h.dtype != torch.float32 or x.dtype != torch.float32 or h.device.type != "cpu" \
            or h.requires_grad or x.requires_grad:
        return None
    dense_layer = getattr(cache, "dense_layer", None)  # a batch of sequences (runtime/batch.py) has none
    rows = dense_layer(i) if dense_layer is not None else None
    if rows is None:
        return None
    lib = build.load()
    if lib is None:
        return None
    layers = m.__dict__.setdefault("_cpu_layers", {})
    if i not in layers:
        _bind(lib)
        layers[i] = _layer(m, i, next_norm, lib)
    entry = layers[i]
    if entry is None:
        return None
    K, V, ring = rows
    if K.dtype != V.dtype or K.dtype not in (torch.float16, torch.float32) or K.device.type != "cpu":
        return None
    L = QkLayer.from_buffer_copy(entry[0])  # a copy per call: two threads may run one model
    cos, sin = rope
    cos, sin, h, x = cos.contiguous(), sin.contiguous(), h.contiguous(), x.contiguous()
    out = torch.empty(2, 1, x.shape[1], dtype=torch.float32)
    L.K, L.V, L.cap, L.ring, L.pos = K.data_ptr(), V.data_ptr(), K.shape[1], ring, cache.pos
    L.kv_f16, L.n_threads = int(K.dtype == torch.float16), torch.get_num_threads()
    L.cos_, L.sin_, L.x, L.h = cos.data_ptr(), sin.data_ptr(), x.data_ptr(), h.data_ptr()
    L.x_out, L.h_out = out[0].data_ptr(), out[1].data_ptr()
    rc = lib.qk_decode_layer(ctypes.byref(L))
    if rc != 0:
        raise ValueError(f"block {i}: the CPU decode layer failed at step {rc} (shapes do not match the weights)")
    return out[1], out[0]
