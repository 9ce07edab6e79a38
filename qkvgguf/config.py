"""ModelConfig: the hyperparameters of a decoder, read from GGUF metadata (never guessed).

One frozen dataclass serves every supported architecture; the differences between families are
flags (`qkv_bias`, `qk_norm`, `rope_neox`), not copies of the model code.

    llama  : Llama 1/2/3, Mistral, SmolLM. Q/K rows were permuted by the converter, so rope rotates
             adjacent pairs (x[2i], x[2i+1]) -- ggml's "normal" rope.
    qwen2  : as llama plus biases on q/k/v; rope rotates halves (x[i], x[i + d/2]) -- "neox".
    qwen3  : as qwen2 without biases, plus an RMSNorm over each head of q and k before rope.
    gemma3 : its own block (runtime/arch/gemma3.py): norms before and after attention and FFN,
             QK-norm, GELU(tanh)-gated FFN, embeddings scaled by sqrt(n_embd), sliding-window
             ("local") layers with their own rope base; every `sliding_window_pattern`-th layer is
             global. RMSNorm weights are used as stored (llama.cpp's converter folded Gemma's
             (1 + w) into them). Facts from llama.cpp src/models/gemma3.cpp and llama-hparams.cpp.

`ArchSpec.block` names the runtime's block implementation (runtime/arch/: "llama" for the
llama-shaped families); the other fields are flags of that block.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GGUFError, UnsupportedError, shown
from .validate import check_hparams, check_tensors


@dataclass(frozen=True)
class ArchSpec:
    rope_neox: bool  # rotate halves (NeoX) instead of adjacent pairs
    qkv_bias: bool = False  # optional biases on attn_q/k/v (present if the tensors exist)
    qk_norm: bool = False  # per-head RMSNorm on q and k (attn_q_norm / attn_k_norm)
    block: str = "llama"  # the runtime's block implementation (runtime/arch/<block>.py)
    ffn_act: str = "silu"  # gate activation of the gated FFN: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embd_scale_sqrt: bool = False  # token embeddings multiplied by sqrt(n_embd)
    swa_pattern: int = 0  # default sliding-window pattern when the file has none (0: no local layers)


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(rope_neox=False),
    "qwen2": ArchSpec(rope_neox=True, qkv_bias=True),
    "qwen3": ArchSpec(rope_neox=True, qk_norm=True),
    "gemma3": ArchSpec(rope_neox=True, qk_norm=True, block="gemma3", ffn_act="gelu_tanh", embd_scale_sqrt=True,
                       swa_pattern=6),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_layer: int  # transformer blocks
    n_embd: int  # residual width
    n_ff: int  # feed-forward hidden width
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (GQA: n_head % n_head_kv == 0)
    head_dim: int  # per-head width of q and k (and v)
    n_ctx_train: int  # context length the model was trained for
    vocab_size: int
    norm_eps: float
    rope_base: float
    rope_dim: int  # leading dims of each head that rope rotates (== head_dim for these families)
    rope_neox: bool
    rope_scaling: str = "none"  # "none" | "linear"
    rope_scale: float = 1.0  # positions are divided by this (linear scaling)
    qkv_bias: bool = False
    qk_norm: bool = False
    tied_embeddings: bool = False  # no output.weight: logits use token_embd.weight
    block: str = "llama"  # runtime/arch/ implementation of a block
    ffn_act: str = "silu"  # "silu" | "gelu_tanh"
    embd_scale: float = 1.0  # token embeddings are multiplied by this (gemma: sqrt(n_embd))
    attn_scale: float = 0.0  # q . k scale; 0: 1/sqrt(head_dim)
    final_logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when > 0
    sliding_window: int = 0  # keys a local layer's query sees, itself included (0: no local layers)
    swa_layers: tuple[bool, ...] = ()  # per layer: True for a sliding-window (local) layer
    rope_base_swa: float = 10000.0  # rope base of the local layers
    rope_scale_swa: float = 1.0  # linear rope scale of the local layers (the global ones: rope_scale)

    def window(self, layer: int) -> int:
        """Sliding window of one layer: keys at positions p > q_pos - window only; 0 = all keys."""
        return self.sliding_window if self.swa_layers and self.swa_layers[layer] else 0

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_gguf(cls, gguf) -> "ModelConfig":
        """Build from an open `GGUFFile` (metadata + tensor names)."""
        md, path = gguf.metadata, gguf.path
        arch = md.get("general.architecture")
        if arch is None:
            raise GGUFError(f"{path}: required metadata key 'general.architecture' is missing")
        if not isinstance(arch, str):
            raise GGUFError(f"{path}: metadata key 'general.architecture' should be a string, found {shown(arch)}")
        if arch not in ARCHITECTURES:
            raise UnsupportedError(
                f"{path}: architecture {shown(arch)} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        spec = ARCHITECTURES[arch]
        check_hparams(gguf, arch)  # types, finiteness, ranges: before any arithmetic on them

        def req(key: str, kind=int):
            full = f"{arch}.{key}"
            if full not in md:
                raise GGUFError(f"{path}: required metadata key '{full}' is missing")
            value = md[full]
            if isinstance(value, list) and kind is int:
                # per-layer arrays (e.g. head_count_kv) are allowed only when uniform
                if len(set(value)) != 1:
                    raise UnsupportedError(f"{path}: '{full}' varies by layer ({value[:4]}...), not supported")
                value = value[0]
            if isinstance(value, (str, list)) or value is None:
                raise GGUFError(f"{path}: metadata key '{full}' should be a number, found {value!r}")
            return kind(value)

        def opt(key: str, default, kind=int):
            return req(key, kind) if f"{arch}.{key}" in md else default

        n_embd = req("embedding_length")
        n_head = req("attention.head_count")
        n_head_kv = opt("attention.head_count_kv", n_head)
        head_dim = opt("attention.key_length", n_embd // n_head)
        if head_dim != opt("attention.value_length", head_dim):
            raise UnsupportedError(f"{path}: key_length != value_length is not supported")
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        if "token_embd.weight" not in gguf.tensors:
            raise GGUFError(f"{path}: required tensor 'token_embd.weight' is missing")
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
        tokens = md.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens) if isinstance(tokens, list) else 0
        if n_tokens and n_tokens > vocab_size:
            raise GGUFError(f"{path}: vocabulary has {n_tokens} tokens but token_embd.weight has {vocab_size} rows")

        scaling = md.get(f"{arch}.rope.scaling.type", "none")
        scale = 1.0
        if scaling == "linear":
            scale = float(md.get(f"{arch}.rope.scaling.factor", 1.0))
        elif scaling not in ("none", None):
            raise UnsupportedError(f"{path}: rope scaling {shown(scaling)} is not supported (supported: none, linear)")
        if "rope_freqs.weight" in gguf.tensors:
            scaling = "freqs" if scaling in ("none", None) else scaling

        rope_dim = opt("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise UnsupportedError(f"{path}: partial rope ({rope_dim} of {head_dim} dims) is not supported")
        n_layer = req("block_count")
        window, swa_layers = _sliding_window(md, arch, path, n_layer, spec)
        cfg = cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=req("feed_forward_length"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ctx_train=req("context_length"),
            vocab_size=vocab_size,
            norm_eps=req("attention.layer_norm_rms_epsilon", float),
            rope_base=opt("rope.freq_base", 10000.0, float),
            rope_dim=rope_dim,
            rope_neox=spec.rope_neox,
            rope_scaling=scaling or "none",
            rope_scale=scale,
            qkv_bias=spec.qkv_bias and "blk.0.attn_q.bias" in gguf.tensors,
            qk_norm=spec.qk_norm,
            tied_embeddings="output.weight" not in gguf.tensors,
            block=spec.block,
            ffn_act=spec.ffn_act,
            embd_scale=float(n_embd) ** 0.5 if spec.embd_scale_sqrt else 1.0,
            # llama.cpp (gemma3.cpp): 1/sqrt(head_dim), but 1/sqrt(n_embd / n_head) for the 62-layer 27B
            # (query_pre_attn_scalar is not stored in GGUF)
            attn_scale=(n_embd / n_head) ** -0.5 if spec.block == "gemma3" and n_layer == 62 else 0.0,
            final_logit_softcap=opt("final_logit_softcapping", 0.0, float),
            sliding_window=window,
            swa_layers=swa_layers,
            rope_base_swa=opt("rope.freq_base_swa", 10000.0, float),
        )
        check_tensors(gguf, cfg)  # every tensor the forward pass reads, with the shape cfg implies
        return cfg


def _sliding_window(md: dict, arch: str, path, n_layer: int, spec: ArchSpec) -> tuple[int, tuple[bool, ...]]:
    """(window, per-layer local flags) as llama.cpp's load_swa_pattern reads them: no
    `{arch}.attention.sliding_window` (or 0) means no local layers; `sliding_window_pattern` is either
    one flag per layer or a period n (layer i is local unless i % n == n - 1; 0: all local), else the
    family's default period (gemma3: 6, so layers 5, 11, 17, ... are global)."""
    window = md.get(f"{arch}.attention.sliding_window", 0)
    if not window or not spec.swa_pattern and f"{arch}.attention.sliding_window_pattern" not in md:
        return 0, ()
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise GGUFError(f"{path}: metadata key '{arch}.attention.sliding_window' should be a count, found {window!r}")
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", spec.swa_pattern)
    if isinstance(pattern, list):
        if len(pattern) < n_layer or not all(isinstance(v, bool) for v in pattern):
            raise GGUFError(f"{path}: metadata key '{arch}.attention.sliding_window_pattern' should hold "
                            f"{n_layer} bools, found {pattern[:4]!r}...")
        flags = tuple(pattern[:n_layer])
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        flags = tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))
    else:
        raise GGUFError(f"{path}: metadata key '{arch}.attention.sliding_window_pattern' should be a "
                        f"period or per-layer flags, found {pattern!r}")
    return (window, flags) if any(flags) else (0, ())
