"""Decode with a captured CUDA graph: one replay per token instead of hundreds of kernel launches.

A decode step of a 30-layer model launches ~15 kernels per layer; at a few microseconds of Python
and launch overhead each, that alone can exceed the step's memory-bound kernel time on a fast GPU.
`GraphDecoder` captures one step (`Model.forward` of one token) into a CUDA graph and replays it:

    static inputs   the token id (a 1-element device tensor, written before each replay) and the
                    cache's device position `pos_t` (KVCache.use_device_position)
    inside          embedding rows, every matmul/norm/rope kernel, the K/V write at pos_t (index
                    copy or the q8_0/q4_0 kv_write kernel), split-K attention over [0, pos_t]
                    (n_valid read from the device), the logits, and pos_t += 1
    output          `logits`, a static device tensor overwritten by each replay

The host mirror `cache.pos` is advanced after each replay. Warm-up runs compile every Triton
kernel and settle the allocator before capture (a launch that compiles cannot be captured); they
write the token's K/V at the current position, which the replay then overwrites.

Paged models (runtime/paging.py) can be captured too (`paged=True`, the CLI's experimental
`--paged-cuda-graph`, until a GPU run has verified it): every streamed unit always lands in the same
slot, so the graph holds the host-to-device copies, their side stream and the events that order
them, and a replay streams the layers exactly as an eager step does, without the launches. When
the embedding rows are gathered on the host (a host-side or streamed embedding), the static input
is the token's embedding row, copied in before each replay, instead of the token id.

Requirements: a CUDA device, the Triton backend, cache types other than q4g. `graph_supported`
says why not, in one line.
"""

from __future__ import annotations

from typing import Optional

import torch

from qkvgguf.kv_types import cache_type

from .kv_cache import KVCache
from .model import Model


def graph_supported(model: Model, cache: KVCache, paged: bool = False) -> Optional[str]:
    """None when GraphDecoder can run this model and cache, else the reason. A model with streamed
    weights is captured only when `paged` is asked (`--paged-cuda-graph`): the capture of the
    streamer's copies has CPU tests but has not yet run to completion on a GPU."""
    if model.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if model.backend != "triton":
        return "CUDA graphs need the triton backend"
    if cache.schedule is not None:
        return "a --kv-budget cache requantizes its groups on the host"
    for t in (cache.type_k, cache.type_v):
        if not cache_type(t).device_position:
            return f"cache type {t} decides its groups on the host"
    if model.weights.cpu_computed:
        return "some layers are computed on the CPU (--placement)"
    if model.weights.streamed and not paged:
        return "some weights stream from host memory (--paged-cuda-graph captures them too: experimental)"
    return None


class GraphDecoder:
    def __init__(self, model: Model, cache: KVCache, warmup: int = 2, paged: bool = False):
        why = graph_supported(model, cache, paged)
        if why:
            raise ValueError(why)
        if cache.pos >= cache.n_ctx:
            raise ValueError("the cache is full")
        self.model, self.cache = model, cache
        self.token = torch.zeros(1, dtype=torch.long, device=model.device)
        # the static input: the token id, or its embedding row when the rows are gathered on the host
        self.embeds = (torch.zeros(1, model.config.n_embd, device=model.device) if model.embeds_on_host else None)
        streamer = model.weights.streamer
        cache.use_device_position()
        pos0 = cache.pos
        side = torch.cuda.Stream(model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                model.forward(self.token, cache, embeds=self.embeds)
                cache.reset(pos0)
        torch.cuda.current_stream(model.device).wait_stream(side)
        if streamer is not None:
            streamer.begin_capture()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = model.forward(self.token, cache, embeds=self.embeds)
                if streamer is not None:
                    streamer.join()  # the next step's first unit, still copying, joins the graph's end
        except RuntimeError:
            cache.reset(pos0)  # the caller may go on decoding eagerly from where it was
            raise
        finally:
            if streamer is not None:
                streamer.end_capture()
        cache.pos = pos0  # capture ran the host code (pos += 1) but no kernel: pos_t still == pos0

    def step(self, token: int) -> torch.Tensor:
        """Run `token` at position cache.pos; return its logits (vocab,), valid until the next step."""
        if self.cache.pos >= self.cache.n_ctx:
            raise ValueError(f"the {self.cache.n_ctx}-token context is full")
        if self.embeds is not None:
            self.embeds.copy_(self.model.embed(torch.tensor([token])))
        else:
            self.token.fill_(token)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits
