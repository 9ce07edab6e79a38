"""Quant formats: one registry keyed by ggml type (registry.py).

Each format module registers one `QuantFormat` record per type it defines: block layout, inspect's
layout description and decoder, a vectorized torch dequantizer, numpy quantizers (plain and
importance-weighted), the Triton kernels' tiling, and the converter's outtype and fallback. Callers
use the functions below (or read `FORMATS`) and never branch on the type themselves.

Adding a type: a new module here whose last line is `register(QuantFormat(...))`, and its import below.
"""

from __future__ import annotations

from .registry import (FORMATS, Codes, Field, Layout, QuantFormat, Tiling, View, block_sizes,  # noqa: F401
                       dequantize, get_format, has_reference, quantize, reference_quantize, register,
                       type_name, unregister)

# The format modules register themselves on import, in this order (the converter lists its outtypes so).
from . import floats, q8, q4, q5, kquants, q2k_q3k, iq4  # noqa: E402,F401
