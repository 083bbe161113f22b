"""Report pictures: the evaluation curve (matplotlib), CAM overlays and contact sheets (numpy compositing).

Functions return PNG bytes or uint8 H x W x 3 arrays; writing goes through `cse_ray.formats` /
`cse_ray.artifacts`, so every picture can land on a local path or a URI. matplotlib is imported inside
`render_line_plot` only, so that importing cse_ray (and starting a CRF or CAM worker) stays fast.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_LINE_COLOUR = "#1f77b4"
_BEST_COLOUR = "#d62728"
_TEXT_COLOUR = (20, 20, 20)


def render_line_plot(
    points: Sequence[tuple[float, float]],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    highlight: tuple[float, float] | None = None,
    highlight_text: str | None = None,
    size: tuple[int, int] = (760, 480),
) -> bytes:
    """A line through `points` (x, y) as PNG bytes of `size` pixels (write them with `cse_ray.artifacts`).

    `highlight` marks one point (for example the best threshold) with a red ring and `highlight_text`.
    """
    if not points:
        raise ValueError("render_line_plot needs at least one point")
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("render_line_plot: points must be finite numbers")

    # A Figure without pyplot renders with matplotlib's Agg canvas and leaves the process-wide backend
    # alone (pyplot + matplotlib.use("Agg") in a library would switch a notebook's backend and close its
    # figures); it also holds no global state, so threads may draw at once.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(xs, ys, color=_LINE_COLOUR, linewidth=1.8, marker="o", markersize=3)
    if highlight is not None:
        text = highlight_text if highlight_text is not None else f"{highlight[1]:.2f} at {highlight[0]:g}"
        axes.plot([highlight[0]], [highlight[1]], linestyle="none", marker="o", markersize=12,
                  markerfacecolor="none", markeredgecolor=_BEST_COLOUR, markeredgewidth=2.5)
        axes.annotate(text, highlight, xytext=(0, 12), textcoords="offset points", ha="center",
                      color=_BEST_COLOUR, fontsize=11)
    axes.grid(True, color="#e1e1e1")
    axes.margins(x=0.03, y=0.12)
    axes.set_title(title)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue -> green -> yellow -> red colour map of values in [0, 1] (H x W -> H x W x 3 uint8)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(2.0 * v - 0.5, 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.0 - 2.0 * v, 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def cam_overlay(image: np.ndarray, cams: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with a heat map of the strongest class at each pixel: H x W x 3 uint8.

    `cams` is K x H x W in [0, 1] (the present classes); no class gives the image unchanged.
    """
    if len(cams) == 0:
        return np.asarray(image, dtype=np.uint8).copy()
    heat = heat_colours(np.asarray(cams).max(axis=0)).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def cam_gain_overlay(image: np.ndarray, cams: np.ndarray, baseline: np.ndarray,
                     full: float = 0.5) -> np.ndarray:
    """Where one network's CAM rose or fell against another's on the same image: H x W x 3 uint8.

    Both are K x H x W in [0, 1] over the same present classes; per pixel the strongest class of each is
    compared. Red where `cams` is higher, blue where lower, over the image in grey; a difference of
    `full` or more is pure colour. The eye sees the CAM's spread at once, which two heat maps side by
    side hide when both are bright.
    """
    grey = np.asarray(image, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    picture = np.repeat(grey[..., None], 3, axis=-1)
    if len(cams) == 0:
        return np.clip(picture + 0.5, 0, 255).astype(np.uint8)
    gain = np.asarray(cams, np.float32).max(axis=0) - np.asarray(baseline, np.float32).max(axis=0)
    weight = np.clip(np.abs(gain) / full, 0.0, 1.0)[..., None]
    colour = np.where(gain[..., None] > 0, np.float32([230, 20, 20]), np.float32([20, 60, 230]))
    return np.clip((1.0 - weight) * picture + weight * colour + 0.5, 0, 255).astype(np.uint8)


def label_colours(label: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    """A palette label map (H x W of indices) as RGB, for contact sheets."""
    table = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return table[np.asarray(label, dtype=np.intp)]


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], cell: int = 128,
                  pad: int = 4) -> np.ndarray:
    """A grid of pictures as uint8 H x W x 3 (encode it with `formats.encode_rgb_png`).

    Each row is a list of H x W x 3 uint8 arrays, scaled to fit a `cell` square (aspect kept); `titles`
    head the columns. Rows may hold any number of pictures: the sheet is as wide as the longest row or
    the titles, and a short row leaves its last cells blank.
    """
    header = 18
    columns = max([len(titles), *(len(row) for row in rows)], default=0)
    width = max(1, columns * (cell + pad) + pad)
    height = header + len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title, fill=_TEXT_COLOUR, font=font)
    for r, row in enumerate(rows):
        for c, array in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
            scale = cell / max(tile.size)  # up or down to the cell, keeping the aspect ratio
            tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                               Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    return np.asarray(sheet)
