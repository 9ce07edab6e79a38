"""inspect --plot OUT.png: bits per weight as a layer x tensor-kind heat map, beside bytes by layer.

Left (a): one row per block, one column per tensor kind, colour = bits per weight over the range of
the quantized tensors (float tensors, the norms, in their own grey), each cell labelled with its
ggml type. Right (b): the block's bytes as a bar stacked by kind, on the same rows. The
tensors outside the blocks (token_embd, output) are listed under the title.

matplotlib is optional (`pip install matplotlib`, or the `plot` extra). We draw on a `Figure` with
the Agg canvas directly, never through pyplot, so nothing global changes. The PNG is exactly
`size` pixels: figure size = size / DPI, saved at DPI, no tight bounding box.
"""

from __future__ import annotations

import math

from ..errors import QkvggufError
from ..units import format_bytes

DPI = 100
DEFAULT_SIZE = (1200, 800)  # pixels
FLOAT_BITS = 16  # cells at or above this are float tensors (F16, BF16, F32)
FLOAT_COLOUR = "#c8c8c8"  # their own colour, outside the quantized scale


def parse_plot_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise QkvggufError(f"--plot-size: cannot read '{text}' (expected WIDTHxHEIGHT in pixels, e.g. 1200x800)") \
            from None
    if not (200 <= w <= 10000 and 200 <= h <= 10000):
        raise QkvggufError(f"--plot-size: {w}x{h} is outside 200..10000 pixels per side")
    return w, h


def plot(summary: dict, path: str, size: tuple[int, int] = DEFAULT_SIZE) -> dict:
    """Write the PNG; returns {"path", "width", "height"} (the pixel size written), the bits-per-weight
    range the colour scale spans ("scale_bits"), each type's colour, and the panel titles."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise QkvggufError("--plot needs matplotlib: pip install matplotlib") from None
    import numpy as np

    table = summary["layers"]
    kinds, layers = table["kinds"], table["layers"]
    if not layers:
        raise QkvggufError(f"{summary['file']}: no blk.N tensors, nothing to plot per layer")
    labels = [k[:-len(".weight")] if k.endswith(".weight") else k for k in kinds]
    bpw = np.full((len(layers), len(kinds)), np.nan)
    for i, row in enumerate(layers):
        for j, k in enumerate(kinds):
            if k in row["bits"]:
                bpw[i, j] = row["bits"][k]

    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 2], wspace=0.25, left=0.07, right=0.97, top=0.88, bottom=0.16)
    heat = fig.add_subplot(grid[0, 0])
    bars = fig.add_subplot(grid[0, 1], sharey=heat)

    # colour over the quantized cells only: float tensors (16+ bits, the norms) would stretch the scale
    # until every quantized cell is one shade; they get their own colour (FLOAT_COLOUR), blank cells white
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize, to_hex, to_rgba

    cmap = colormaps["viridis"]
    quantized = bpw[bpw < FLOAT_BITS]
    if quantized.size:
        lo, hi = float(quantized.min()), float(quantized.max())
    else:
        lo, hi = float(np.nanmin(bpw)), float(np.nanmax(bpw))
    if hi - lo < 1.0:  # one type (a uniform file): a range around it, so its colour is mid-scale
        mid = (lo + hi) / 2
        lo, hi = mid - 1.0, mid + 1.0
    norm = Normalize(vmin=lo, vmax=hi)
    rgba = np.ones((len(layers), len(kinds), 4))
    colours: dict[str, str] = {}
    for i, row in enumerate(layers):
        for j, k in enumerate(kinds):
            if np.isnan(bpw[i, j]):
                continue
            c = to_rgba(FLOAT_COLOUR) if bpw[i, j] >= FLOAT_BITS else cmap(norm(bpw[i, j]))
            rgba[i, j] = c
            colours.setdefault(row["types"][k], to_hex(c))
    heat.imshow(rgba, aspect="auto", interpolation="nearest")
    heat.set_xticks(range(len(kinds)), labels, rotation=45, ha="right", fontsize=8)
    step = max(1, math.ceil(len(layers) / 40))
    heat.set_yticks(range(0, len(layers), step), [str(r["layer"]) for r in layers][::step], fontsize=7)
    heat.set_ylabel("block")
    panels = [f"(a) bits per weight of each tensor (cell: ggml type; grey: float, {FLOAT_BITS}+ bits)",
              "(b) bytes by block, stacked by tensor kind"]
    heat.set_title(panels[0], fontsize=10)
    cells = len(layers) * len(kinds)
    if cells <= 1200:
        font = max(4.0, min(8.0, 0.9 * height / max(len(layers), 1) / 1.6))
        for i, row in enumerate(layers):
            for j, k in enumerate(kinds):
                if k in row["types"]:
                    light = bpw[i, j] >= FLOAT_BITS or norm(bpw[i, j]) > 0.6
                    heat.text(j, i, row["types"][k], ha="center", va="center", fontsize=font,
                              color="black" if light else "white")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=heat, fraction=0.04, pad=0.01)
    bar.set_label("bits per weight (quantized tensors)", fontsize=8)

    left = np.zeros(len(layers))
    colors = [colormaps["tab20"](j % 20) for j in range(len(kinds))]
    for j, k in enumerate(kinds):
        mib = np.array([row["kind_bytes"].get(k, 0) / 2**20 for row in layers])
        bars.barh(range(len(layers)), mib, left=left, color=colors[j], label=labels[j], height=0.8)
        left += mib
    bars.set_xlabel("MiB per block")
    bars.set_title(panels[1], fontsize=10)
    bars.tick_params(axis="y", labelleft=False)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=4, frameon=False)

    tot = summary["totals"]
    other = ", ".join(f"{t['name']} {t['type']} {format_bytes(t['n_bytes'])}" for t in table["other"])
    fig.suptitle(f"{summary['file'].rsplit('/', 1)[-1]}: {tot['n_tensors']} tensors, {format_bytes(tot['n_bytes'])}, "
                 f"{tot['bits_per_weight']:.2f} bits per weight", fontsize=11)
    if other:
        fig.text(0.5, 0.925, f"outside the blocks: {other}", ha="center", fontsize=8)
    fig.savefig(path, dpi=DPI, format="png")
    return {"path": path, "width": width, "height": height, "scale_bits": [lo, hi], "colours": colours,
            "float_colour": to_hex(FLOAT_COLOUR), "panels": panels}
