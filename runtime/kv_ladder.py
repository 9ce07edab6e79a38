"""The `--kv-budget` store: complete groups of 64 positions at q8_0, q4g or q3g, oldest lowest.

Layout and schedule: qkvgguf/kv_budget.py. One store holds K (kind "k") or V ("v") of every layer:

    sink    (n_layer, n_kv, S, d) f16              positions 0 .. S-1, never requantized
    tail    (n_layer, n_kv, 64, d/32*34) uint8     the newest partial group, q8_0 rows
    level i slots for n_i groups in its formats (kv_budget.FORMATS): q8_0 and q4g as rings
            (group g in slot g % n_i: a level always holds a run of consecutive groups), q3g in
            slot g (it only grows)

When group g completes (its last position written), it enters the highest level with slots; the
group it pushes out of that level (g - n_i) is read back, dequantized and quantized into the next
level, and so on down: requantization happens only from stored values (8.5 -> 4 -> 3 bits).

The torch ops read it back as float32 rows (the reference); the Triton kernels do not read it in
place yet (`operand` says so in one line): its three quantized segments need a kernel that
switches format per key tile.
"""

from __future__ import annotations

import torch

from qkvgguf.errors import QkvggufError
from qkvgguf.kv_budget import FORMATS, LEVELS, TAIL, Schedule
from qkvgguf.kv_types import GROUP, N_SINK, row_format_bytes

from .kv_quant import BLOCKS, CHANNELS, Store, dequantize_rows
from .kv_lowbit import dequantize_channels, quantize_channels


class _Level:
    """n slots of complete groups in one row format (per-channel codes or per-position rows)."""

    def __init__(self, name, fmt, n, ring, n_layer, n_kv, d, device, tensors):
        self.fmt, self.n, self.ring, self.bits = fmt, n, ring, CHANNELS.get(fmt)
        u8 = dict(dtype=torch.uint8, device=device)
        if self.bits:
            self.codes = tensors[f"{name}.codes"] = torch.zeros((n_layer, n_kv, n, GROUP, d * self.bits // 8), **u8)
            self.scales = tensors[f"{name}.scales"] = torch.zeros((n_layer, n_kv, n, 2, d), dtype=torch.float16,
                                                                  device=device)
        else:
            self.rows = tensors[f"{name}.rows"] = torch.zeros((n_layer, n_kv, n, GROUP, row_format_bytes(fmt, d)), **u8)

    def slot(self, g: int) -> int:
        return g % self.n if self.ring else g

    def store(self, layer, g, x):
        """x float32 (n_kv, 64, d) -> group g's slot."""
        s = self.slot(g)
        if self.bits:
            codes, scales = quantize_channels(x, self.bits)
            self.codes[layer, :, s], self.scales[layer, :, s] = codes, scales
        else:
            self.rows[layer, :, s] = BLOCKS[self.fmt][0](x)

    def load(self, layer, g0, g1) -> torch.Tensor:
        """float32 (n_kv, (g1 - g0) * 64, d): groups [g0, g1), all held by this level."""
        idx = torch.tensor([self.slot(g) for g in range(g0, g1)], device=self.scales.device if self.bits
                           else self.rows.device)
        if self.bits:
            codes = self.codes[layer].index_select(1, idx).flatten(1, 2)
            return dequantize_channels(codes, self.scales[layer].index_select(1, idx), self.bits)
        return dequantize_rows(self.rows[layer].index_select(1, idx).flatten(1, 2), BLOCKS[self.fmt][1])


class LadderStore(Store):
    def __init__(self, shape, kind, device, schedule: Schedule):
        n_layer, n_kv, n_ctx, d = shape
        self.kind, self.d, self.n_ctx, self.schedule = kind, d, n_ctx, schedule
        t = {"sink": torch.zeros((n_layer, n_kv, N_SINK, d), dtype=torch.float16, device=device),
             "tail": torch.zeros((n_layer, n_kv, GROUP, row_format_bytes(TAIL, d)), dtype=torch.uint8, device=device)}
        self.levels = [_Level(name, FORMATS[name][kind == "v"], n, name != LEVELS[-1], n_layer, n_kv, d, device, t)
                       for name, n in zip(LEVELS, schedule.groups)]
        super().__init__(t)
        self.sink, self.tail = t["sink"], t["tail"]

    def cuts(self, start, end):
        first = N_SINK + GROUP - 1
        c = first + max(0, -(-(start + 1 - first) // GROUP)) * GROUP
        return list(range(c, end, GROUP))

    def write(self, layer, pos, x):
        end = pos + x.shape[1]
        if pos < N_SINK:
            n = min(end, N_SINK) - pos
            self.sink[layer, :, pos:pos + n] = x[:, :n]
            x, pos = x[:, n:], pos + n
        while pos < end:
            i = (pos - N_SINK) % GROUP
            n = min(end - pos, GROUP - i)
            self.tail[layer, :, i:i + n] = BLOCKS[TAIL][0](x[:, :n])
            if i + n == GROUP:
                self._push(layer, (pos - N_SINK) // GROUP, dequantize_rows(self.tail[layer], BLOCKS[TAIL][1]))
            x, pos = x[:, n:], pos + n

    def _push(self, layer, g, x):
        """Group g completes with values x: into the highest level with slots; what it pushes out
        goes one level down, requantized from its stored values."""
        for level in self.levels:
            if level.n == 0:
                continue
            out = g - level.n
            evicted = level.load(layer, out, out + 1) if level.ring and out >= 0 else None
            level.store(layer, g, x)
            if evicted is None:
                return
            g, x = out, evicted

    def _ranges(self, n_full):
        """(level, g0, g1) for the complete groups [0, n_full), oldest first."""
        n8, n4, _ = self.schedule.groups
        b8 = max(0, n_full - n8)
        b4 = max(0, b8 - n4)
        return [(self.levels[2], 0, b4), (self.levels[1], b4, b8), (self.levels[0], b8, n_full)]

    def read(self, layer, end):
        parts = [self.sink[layer, :, :min(end, N_SINK)].float()]
        if end > N_SINK:
            n_full = (end - N_SINK) // GROUP
            parts += [lv.load(layer, g0, g1) for lv, g0, g1 in self._ranges(n_full) if g1 > g0]
            parts.append(dequantize_rows(self.tail[layer, :, :end - N_SINK - n_full * GROUP], BLOCKS[TAIL][1]))
        return torch.cat(parts, dim=1)

    def operand(self, layer, end):
        raise QkvggufError("--kv-budget: the Triton attention kernels do not read the adaptive cache in place "
                           "yet; use --backend torch")

    def truncate(self, old, new):
        """Forget positions >= new: allowed into the sinks (a new start) or within the tail's group."""
        if new <= N_SINK or (new - N_SINK) // GROUP == (old - N_SINK) // GROUP:
            return
        raise QkvggufError("--kv-budget: a cache whose groups were requantized cannot rewind to position "
                               f"{new:,} (requantized groups cannot get their precision back); start a new session")
