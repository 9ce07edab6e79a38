"""Weights: GGUF tensors as lazily dequantized torch views of the memory map.

`QTensor` holds a tensor's raw bytes (a zero-copy uint8 view of the mapped file) and its ggml type;
nothing is read from disk until a kernel touches it. `Weights` maps GGUF names
(`blk.{i}.attn_q.weight`) to QTensors and owns the one `DequantCache`.

On the CPU the torch backend multiplies with the compiled kernels of runtime/cpu, which read the
QTensor's bytes in place; no float32 copy is needed, and by default (`cache_bytes=None`) none is
kept. Without those kernels (no compiler, QKVGGUF_CPU_KERNELS=0) or on a GPU without Triton, the
torch backend multiplies by dequantized float32 weights. Dequantizing on every call is slow for
decode (one token re-reads the whole model), so a `DequantCache` keeps dequantized copies up to a
byte budget (default there: FALLBACK_CACHE_BYTES). It admits tensors first-come and never evicts: the forward pass visits layers in a
fixed cycle, for which LRU would evict every entry just before its next use, while a static set
keeps a stable fraction of the model hot. A budget of 0 disables it; the runtime then holds at most
one dequantized weight at a time.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.errors import UnsupportedError
from qkvgguf.gguf_file import GGUFFile
from qkvgguf.quants import dequantize, get_format


FALLBACK_CACHE_BYTES = 1 << 30  # the float32 cache's default budget where no CPU kernels multiply


def default_cache_bytes(device: torch.device) -> int:
    """The DequantCache budget when none is given: 0 on a CPU with the compiled kernels (they read the
    blocks; the cache would only add RSS: a 512-token prompt ran no faster with it, benchmarks/RESULTS.md),
    else FALLBACK_CACHE_BYTES."""
    from . import cpu

    return 0 if device.type == "cpu" and cpu.available() else FALLBACK_CACHE_BYTES


_FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


@dataclass
class QTensor:
    name: str
    type: T
    shape: tuple[int, ...]  # numpy order, row length last
    raw: torch.Tensor  # uint8 (rows, row_bytes), a view of the file

    @property
    def n_bytes(self) -> int:
        return self.raw.numel()

    @property
    def dequantized_bytes(self) -> int:
        return 4 * int(np.prod(self.shape))

    def float_view(self) -> torch.Tensor:
        """An F32/F16/BF16 tensor's bytes viewed as its own dtype, shaped `shape`: no copy."""
        dtype = _FLOAT_DTYPES[self.type]
        return self.raw.view(dtype).view(self.shape)

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """float32 values, all rows or the selected ones; reshaped to `shape` when all rows."""
        if rows is None:
            return dequantize(self.raw, self.type).view(self.shape)
        return dequantize(self.raw[rows], self.type)


def _load_arena(tensors: list[QTensor], device: torch.device) -> torch.Tensor:
    """Copy the tensors' bytes into one device buffer (256-byte aligned offsets) and repoint each
    QTensor at its slice. One allocation, not one per tensor: the caching allocator rounds every
    large block up (to 2 MiB), which over a 7B model's ~290 tensors adds hundreds of MiB that the
    VRAM planner, counting bytes as stored, never planned."""
    from .planner import packed

    offsets, n = packed(t.n_bytes for t in tensors)
    arena = torch.empty(n, dtype=torch.uint8, device=device)
    for t, off in zip(tensors, offsets):
        dst = arena[off:off + t.n_bytes].view(t.raw.shape)
        dst.copy_(t.raw)
        t.raw = dst
    return arena


def _from_memmap(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # read-only map: we never write through these views
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class DequantCache:
    """Dequantized float32 copies of weights, admitted until `budget` bytes, never evicted. Vectors
    (1-D: norms, biases; a few KiB each, read at every step) are always kept, beyond the budget:
    with budget 0 (the CPU kernels' default) the decode step re-made each of them at every use."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._store: dict[str, torch.Tensor] = {}
        self._refused: set[str] = set()

    def peek(self, name: str) -> torch.Tensor | None:
        return self._store.get(name)

    def get(self, w: QTensor) -> torch.Tensor:
        hit = self._store.get(w.name)
        if hit is not None:
            return hit
        values = w.dequantize()
        if w.name not in self._refused:
            if self.used + w.dequantized_bytes <= self.budget or len(w.shape) == 1:
                self._store[w.name] = values
                self.used += w.dequantized_bytes
            else:
                self._refused.add(w.name)
        return values


class Weights:
    """GGUF tensors by name, each a lazily dequantized QTensor."""

    def __init__(self, gguf: GGUFFile, cache_bytes: int | None = 0, device: torch.device | str = "cpu", plan=None):
        """Tensors stay memory-mapped on the CPU; on another device their raw bytes are copied there
        once at load, except what a `planner.Plan` streams (through `paging.Streamer`'s two slots)
        or keeps on the host: the untied embedding when anything is not resident, and the matmul
        weights of CPU-computed units (`cpu_computed`; the ops multiply them with the CPU kernels). With a plan, streaming
        runs on a CPU device too (synchronous copies: the tests' simulated device).
        cache_bytes: the float32 DequantCache budget; None: default_cache_bytes(device)."""
        from .paging import Streamer, streamed_order
        from .planner import unit_of

        self.gguf = gguf
        device = torch.device(device)
        self.device = device
        self.path = gguf.path
        self.tensors: dict[str, QTensor] = {}
        self.host_raw: dict[str, torch.Tensor] = {}  # the file's bytes of every streamed tensor
        streamed = set(plan.streamed_units) if plan is not None else set()
        on_cpu = set(plan.cpu_units) if plan is not None else set()
        host = set(plan.host_tensors) if plan is not None else set()
        self.cpu_computed: set[str] = set()  # matmul weights the CPU multiplies, from host memory
        tied = "output.weight" not in gguf.tensors
        units: dict[int, list[QTensor]] = {}
        resident: list[QTensor] = []
        for name, info in gguf.tensors.items():
            try:  # fail at load, naming the tensor, not mid-generation
                get_format(info.type)
            except UnsupportedError as e:
                raise UnsupportedError(f"{gguf.path}: tensor '{name}': {e}") from None
            raw = _from_memmap(gguf.raw(name))
            unit = unit_of(name, tied)
            self.tensors[name] = QTensor(name, info.type, info.shape, raw)
            if unit in streamed:
                units.setdefault(unit, []).append(self.tensors[name])
                self.host_raw[name] = raw
            elif unit in on_cpu:
                self.cpu_computed.add(name)
            elif name not in host:
                resident.append(self.tensors[name])
        if device.type != "cpu":
            self.arena = _load_arena(resident, device)
        self.streamer = Streamer(units, streamed_order(plan), device) if streamed else None
        self.cache = DequantCache(default_cache_bytes(device) if cache_bytes is None else cache_bytes)

    @property
    def streamed(self) -> bool:
        return self.streamer is not None

    def begin_unit(self, unit: int) -> None:
        """Before a layer (or the output matmul, planner.OUTPUT_UNIT) runs: bring it in if it streams."""
        if self.streamer is not None and unit in self.streamer.slot_of:
            self.streamer.acquire(unit)

    def end_unit(self, unit: int) -> None:
        if self.streamer is not None and unit in self.streamer.slot_of:
            self.streamer.release(unit)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> QTensor:
        return self.tensors[name]

    def dense(self, name: str) -> torch.Tensor:
        """The whole tensor as float32, through the cache."""
        return self.cache.get(self.tensors[name])

    def rows_device(self, name: str) -> torch.device:
        """Where `rows` gathers this tensor's rows: the host for a host-side or streamed tensor."""
        hit = self.cache.peek(name)
        return hit.device if hit is not None else self._row_bytes(name).device

    def _row_bytes(self, name: str) -> torch.Tensor:
        """The bytes `rows` gathers from. A streamed tensor (a tied embedding that is also the
        streamed output matrix) is read from its host bytes: its QTensor views a staging slot only
        between acquire and release, and the slot may be refilled at any time outside that window."""
        return self.host_raw.get(name, self.tensors[name].raw)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Selected rows as float32 (embedding lookup): dequantizes only those rows."""
        w = self.tensors[name]
        hit = self.cache.peek(name)
        if hit is not None:
            return hit[ids]
        raw = self._row_bytes(name)
        if raw.device != ids.device:  # a host-side embedding: gather there, copy the rows
            rows = dequantize(raw[ids.to(raw.device)], w.type)
            return rows.to(ids.device)
        return dequantize(raw[ids], w.type)
