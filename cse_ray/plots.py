"""Small report figures drawn with Pillow alone (matplotlib is not a dependency of cse-ray).

`draw_line_plot` is enough for the evaluation curve (mIoU against background threshold): axes, "nice"
ticks with grid lines, axis titles, a title and one highlighted point (the best threshold).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

_LINE_COLOUR = (31, 119, 180)
_BEST_COLOUR = (214, 39, 40)
_GRID_COLOUR = (225, 225, 225)
_AXIS_COLOUR = (0, 0, 0)
_TEXT_COLOUR = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font, scalable when Pillow has FreeType (no font files are shipped or needed)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # old Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_ticks(low: float, high: float, max_ticks: int = 8) -> list[float]:
    """Round tick positions (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"tick range must be finite, got {low}..{high}")
    if high < low:
        low, high = high, low
    span = high - low
    if span == 0:
        span = abs(low) or 1.0
    raw_step = span / max(1, max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    """As many decimals as the tick spacing needs (0.05 -> 2, 2.5 -> 1, 10 -> 0), no more."""
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 0.01
    decimals = next((d for d in range(7) if abs(step * 10**d - round(step * 10**d)) < 1e-6), 6)
    return f"{value:.{decimals}f}"


def _padded_range(values: Sequence[float], pad_fraction: float) -> tuple[float, float]:
    low, high = min(values), max(values)
    span = high - low
    pad = span * pad_fraction if span > 0 else (abs(low) * 0.05 or 0.5)
    return low - pad, high + pad


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
    """Draw a line through `points` (x, y); returns PNG bytes (write them with `cse_ray.artifacts`).

    `highlight` marks one point (for example the best threshold) with a red ring and `highlight_text`.
    """
    if not points:
        raise ValueError("draw_line_plot needs at least one point")
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError("draw_line_plot: points must be finite numbers")

    width, height = size
    title_font, label_font, tick_font = _font(18), _font(15), _font(13)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    left, right, top, bottom = 78, 24, 44 if title else 20, 62
    plot_w, plot_h = width - left - right, height - top - bottom

    x_low, x_high = _padded_range(xs, 0.03)
    y_low, y_high = _padded_range(ys, 0.08)
    x_ticks = [t for t in nice_ticks(x_low, x_high, 9) if x_low <= t <= x_high]
    y_ticks = [t for t in nice_ticks(y_low, y_high, 7) if y_low <= t <= y_high]

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x_low) / (x_high - x_low) * plot_w
        py = top + plot_h - (y - y_low) / (y_high - y_low) * plot_h
        return px, py

    for tick in y_ticks:
        _, py = to_pixel(x_low, tick)
        draw.line([(left, py), (left + plot_w, py)], fill=_GRID_COLOUR)
        text = _tick_label(tick, y_ticks)
        box = draw.textbbox((0, 0), text, font=tick_font)
        draw.line([(left - 5, py), (left, py)], fill=_AXIS_COLOUR)
        draw.text((left - 8 - (box[2] - box[0]), py - (box[3] - box[1]) / 2 - box[1]), text,
                  fill=_TEXT_COLOUR, font=tick_font)
    for tick in x_ticks:
        px, _ = to_pixel(tick, y_low)
        draw.line([(px, top), (px, top + plot_h)], fill=_GRID_COLOUR)
        text = _tick_label(tick, x_ticks)
        box = draw.textbbox((0, 0), text, font=tick_font)
        draw.line([(px, top + plot_h), (px, top + plot_h + 5)], fill=_AXIS_COLOUR)
        draw.text((px - (box[2] - box[0]) / 2, top + plot_h + 8), text, fill=_TEXT_COLOUR, font=tick_font)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_AXIS_COLOUR)

    pixels = [to_pixel(x, y) for x, y in zip(xs, ys)]
    if len(pixels) > 1:
        draw.line(pixels, fill=_LINE_COLOUR, width=2, joint="curve")
    for px, py in pixels:
        draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=_LINE_COLOUR)

    if highlight is not None:
        px, py = to_pixel(*highlight)
        draw.ellipse([px - 7, py - 7, px + 7, py + 7], outline=_BEST_COLOUR, width=3)
        text = highlight_text if highlight_text is not None else f"{highlight[1]:.2f} at {highlight[0]:g}"
        box = draw.textbbox((0, 0), text, font=label_font)
        text_w, text_h = box[2] - box[0], box[3] - box[1]
        tx = min(max(px - text_w / 2, left + 4), left + plot_w - text_w - 4)
        ty = py - 14 - text_h - box[1] if py - 14 - text_h > top + 2 else py + 12
        draw.text((tx, ty), text, fill=_BEST_COLOUR, font=label_font)

    if title:
        box = draw.textbbox((0, 0), title, font=title_font)
        draw.text(((width - (box[2] - box[0])) / 2, (top - (box[3] - box[1])) / 2 - box[1]), title,
                  fill=_TEXT_COLOUR, font=title_font)
    if x_label:
        box = draw.textbbox((0, 0), x_label, font=label_font)
        draw.text((left + (plot_w - (box[2] - box[0])) / 2, height - (box[3] - box[1]) - 10 - box[1]),
                  x_label, fill=_TEXT_COLOUR, font=label_font)
    if y_label:
        box = draw.textbbox((0, 0), y_label, font=label_font)
        label = Image.new("RGB", (box[2] - box[0] + 4, box[3] - box[1] + 4), "white")
        ImageDraw.Draw(label).text((2 - box[0], 2 - box[1]), y_label, fill=_TEXT_COLOUR, font=label_font)
        label = label.rotate(90, expand=True)
        image.paste(label, (8, top + (plot_h - label.height) // 2))

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def draw_line_plot(points: Sequence[tuple[float, float]], path: str | os.PathLike[str],
                   **options: Any) -> str:
    """`render_line_plot` written atomically to `path` (a local path or an `s3://`/`gs://` URI)."""
    from cse_ray import artifacts

    artifacts.write_bytes(os.fspath(path), render_line_plot(points, **options))
    return os.fspath(path)


def heat_colours(values):
    """A blue -> green -> yellow -> red colour map of values in [0, 1] (H x W -> H x W x 3 uint8)."""
    import numpy as np

    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    red = np.clip(2.0 * v - 0.5, 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.0 - 2.0 * v, 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def cam_overlay(image, cams, alpha: float = 0.5):
    """The image blended with a heat map of the strongest class at each pixel: H x W x 3 uint8.

    `cams` is K x H x W in [0, 1] (the present classes); no class gives the image unchanged.
    """
    import numpy as np

    if len(cams) == 0:
        return np.asarray(image, dtype=np.uint8).copy()
    heat = heat_colours(np.asarray(cams).max(axis=0)).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(image, dtype=np.float32) + alpha * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def label_colours(label, palette: Sequence[int]):
    """A palette label map (H x W of indices) as RGB, for contact sheets."""
    import numpy as np

    table = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return table[np.asarray(label, dtype=np.intp)]


def contact_sheet(rows, titles: Sequence[str], cell: int = 128, pad: int = 4) -> Image.Image:
    """A grid of images (each row a list of H x W x 3 uint8 arrays), column titles on top."""
    header = 18
    columns = len(titles)
    width = columns * (cell + pad) + pad
    height = header + len(rows) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title, fill=_TEXT_COLOUR, font=font)
    for r, row in enumerate(rows):
        for c, array in enumerate(row):
            tile = Image.fromarray(array)
            scale = cell / max(tile.size)  # up or down to the cell, keeping the aspect ratio
            tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))),
                               Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    return sheet
