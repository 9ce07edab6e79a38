"""`--kv-budget SIZE`: a KV cache that moves precision instead of failing when it would outgrow SIZE.

The cache keeps S = 4 f16 sinks and its newest partial group of 64 positions in q8_0 rows, like
q4g/q3g, and every complete group of 64 positions at one of three levels, newest first:

    level   K (per layer and KV head)          V (rotated, per position)     bytes per group, d = 64
    q8_0    q8_0 rows                          q8_0 rows                     4,352 + 4,352
    q4g     4-bit per channel (q4g_k)          q4_64 rows                    2,304 + 2,176
    q3g     3-bit per channel (q3g_k)          q3_64 rows                    1,792 + 1,664

A schedule (`plan_budget`) gives the number of groups each level holds once the context is full:
(n8, n4, n3). As groups complete, the newest n8 stay at q8_0; when one more completes, the oldest
q8_0 group is requantized (from its stored values) to q4g, and once n4 groups are at q4g their
oldest moves on to q3g. The sinks are never requantized. So at any length the cache holds, from
the oldest position: sinks, up to n3 groups at 3 bits, up to n4 at 4 bits, up to n8 at 8.5 bits,
the q8_0 tail; and every level's slots are allocated up front, so the bytes a cache allocates are
`ladder_bytes(cfg, schedule)` from its first token, never more (peak = allocation <= budget).

The schedule is the most precision the budget buys: first as many groups at 4 bits or better as
fit (the rest at 3 bits), then as many of those at q8_0 as fit. A budget that cannot hold the
context even at 3 bits is a one-line error naming the least it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .errors import QkvggufError
from .kv_types import GROUP, KV_TYPES, N_SINK, row_format_bytes

LEVELS = ("q8_0", "q4g", "q3g")  # newest first: a group moves right as the cache fills
FORMATS = {  # level -> (K row format, V row format) of its groups
    "q8_0": ("q8_0", "q8_0"),
    "q4g": KV_TYPES["q4g"].formats,
    "q3g": KV_TYPES["q3g"].formats,
}
TAIL = "q8_0"  # the newest partial group's rows, K and V


def group_bytes(level: str, d: int, kind: str) -> int:
    """Bytes of one complete group of 64 positions at `level` (one layer and KV head, K or V)."""
    return GROUP * KV_TYPES[level].rate(d, kind)


def fixed_bytes(d: int) -> int:
    """The sinks and the tail, K and V, one layer and KV head."""
    return 2 * (N_SINK * 2 * d + GROUP * row_format_bytes(TAIL, d))


@dataclass(frozen=True)
class Schedule:
    n_ctx: int
    budget: int
    groups: tuple[int, int, int]  # (n8, n4, n3): complete groups each level holds at n_ctx
    n_bytes: int  # what the cache allocates (all layers, K and V)

    def lines(self) -> list[str]:
        """Which context lengths run at which precision (the CLI's log, --json)."""
        n8, n4, n3 = self.groups
        to4 = N_SINK + GROUP * (n8 + 1)  # the length at which the first group leaves q8_0
        to3 = to4 + GROUP * n4  # ... and the first group reaches q3g
        out = [f"positions 0-{N_SINK - 1} f16 (sinks), the newest partial group of 64 in q8_0, "
               f"{n8} / {n4} / {n3} groups of 64 at q8_0 / q4g / q3g when full"]
        out.append(f"contexts up to {min(to4 - 1, self.n_ctx):,} tokens: nothing below q8_0")
        if n4 and to4 <= self.n_ctx:
            out.append(f"{to4:,}-{min(to3 - 1, self.n_ctx):,} tokens: the oldest groups requantized to q4g")
        if n3 and to3 <= self.n_ctx:
            out.append(f"{to3:,}-{self.n_ctx:,} tokens: the oldest groups requantized on to q3g")
        return out


def ladder_bytes(cfg: ModelConfig, groups: tuple[int, int, int]) -> int:
    """Bytes a budget cache with these level slots allocates, all layers, K and V."""
    d = cfg.head_dim
    per_head = fixed_bytes(d) + sum(n * (group_bytes(lv, d, "k") + group_bytes(lv, d, "v"))
                                    for lv, n in zip(LEVELS, groups))
    return cfg.n_layer * cfg.n_head_kv * per_head


def plan_budget(cfg: ModelConfig, n_ctx: int, budget: int) -> Schedule:
    """The most precise schedule whose cache fits `budget` bytes at n_ctx positions."""
    if cfg.head_dim % 64:
        raise QkvggufError(f"--kv-budget needs head_dim a multiple of 64, the model has {cfg.head_dim}")
    G = max(0, (n_ctx - N_SINK) // GROUP)

    def most(fits, hi: int) -> int:  # largest k in [0, hi] with fits(k); fits is monotone decreasing
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    if ladder_bytes(cfg, (0, 0, G)) > budget:
        need = ladder_bytes(cfg, (0, 0, G))
        raise QkvggufError(f"--kv-budget {budget:,} bytes cannot hold {n_ctx:,} tokens even at 3 bits "
                           f"(q3g needs {need:,} bytes)")
    n4plus = most(lambda k: ladder_bytes(cfg, (0, k, G - k)) <= budget, G)
    n8 = most(lambda j: ladder_bytes(cfg, (j, n4plus - j, G - n4plus)) <= budget, n4plus)
    groups = (n8, n4plus - n8, G - n4plus)
    return Schedule(n_ctx, budget, groups, ladder_bytes(cfg, groups))
