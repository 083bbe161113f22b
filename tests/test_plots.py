"""Report pictures: the curve PNG (matplotlib, imported only when drawing) and numpy-composited sheets."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cse_ray.formats import encode_rgb_png
from cse_ray.labels import PALETTE
from cse_ray.plots import cam_gain_overlay, cam_overlay, contact_sheet, label_colours, render_line_plot

REPO = Path(__file__).resolve().parents[1]


def test_the_curve_is_a_png_of_the_asked_size_with_the_best_point_marked():
    points = [(0.1 + 0.01 * i, 40.0 - (i - 12) ** 2 / 10) for i in range(30)]
    png = render_line_plot(points, title="curve", x_label="threshold", y_label="mIoU (%)",
                           highlight=(0.22, 40.0), highlight_text="best 40.00 at 0.22")
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (760, 480)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
    assert red.sum() > 50 and blue.sum() > 200  # the red ring and label, the blue line

    plain = render_line_plot([(0.3, 55.0)], size=(320, 200))  # one point, no highlight
    with Image.open(io.BytesIO(plain)) as image:
        assert image.size == (320, 200)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert not ((pixels[..., 0] > 180) & (pixels[..., 1] < 80)).any()  # nothing red without a highlight
    with pytest.raises(ValueError, match="at least one point"):
        render_line_plot([])
    with pytest.raises(ValueError, match="finite"):
        render_line_plot([(0.1, float("nan"))])


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, cse_ray.plots, cse_ray.evaluate; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == "False"


def test_the_contact_sheet_takes_any_number_of_columns():
    cell, pad, header = 16, 4, 18
    red, green, blue = (np.full((8, 8, 3), c, np.uint8) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    rows = [[red, green, blue, red, green, blue, red], [blue]]  # 7 pictures, then a short row
    sheet = contact_sheet(rows, ["image", "ground truth"], cell=cell, pad=pad)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (header + 2 * (cell + pad) + pad, 7 * (cell + pad) + pad, 3)

    def centre(row: int, column: int) -> list[int]:
        y = header + pad + row * (cell + pad) + cell // 2
        x = pad + column * (cell + pad) + cell // 2
        return sheet[y, x].tolist()

    assert centre(0, 0) == [255, 0, 0] and centre(0, 5) == [0, 0, 255] and centre(0, 6) == [255, 0, 0]
    assert centre(1, 0) == [0, 0, 255] and centre(1, 3) == [255, 255, 255]  # the short row's blank cells
    assert (sheet[:header, : 3 * cell] < 128).any()  # the titles are drawn
    with Image.open(io.BytesIO(encode_rgb_png(sheet))) as image:
        assert image.size == (sheet.shape[1], sheet.shape[0])

    wide = np.full((10, 40, 3), 200, np.uint8)  # scaled to the cell, aspect kept
    tiles = contact_sheet([[wide]], ["x"], cell=cell, pad=pad)
    tile = tiles[header + pad: header + pad + cell, pad: pad + cell]
    assert (tile == 200).all(axis=2).sum() == cell * 4


def test_overlays_and_label_colours():
    image = np.full((2, 3, 3), 100, np.uint8)
    assert np.array_equal(cam_overlay(image, np.zeros((0, 2, 3), np.float32)), image)
    hot = cam_overlay(image, np.ones((1, 2, 3), np.float32), alpha=1.0)
    assert hot[0, 0].tolist() == [255, 0, 0]  # the top of the heat map is red
    label = np.array([[0, 1], [15, 255]], np.uint8)
    colours = label_colours(label, PALETTE)
    assert colours[0, 1].tolist() == PALETTE[3:6] and colours[1, 1].tolist() == PALETTE[765:768]


def test_the_gain_overlay_is_red_where_the_cam_rose_and_blue_where_it_fell():
    image = np.full((1, 4, 3), 100, np.uint8)
    baseline = np.array([[[0.2, 0.5, 0.5, 0.9]]], np.float32)
    cams = np.array([[[0.9, 0.5, 0.6, 0.2]]], np.float32)  # +0.7, 0, +0.1, -0.7
    picture = cam_gain_overlay(image, cams, baseline)
    assert picture[0, 0].tolist() == [230, 20, 20]  # rose by more than `full`: pure red
    assert picture[0, 1].tolist() == [100, 100, 100]  # unchanged: the image in grey
    assert picture[0, 2, 0] > 100 > picture[0, 2, 2]  # rose a little: a tint of red
    assert picture[0, 3].tolist() == [20, 60, 230]  # fell: blue
    assert np.array_equal(cam_gain_overlay(image, cams[:0], baseline[:0]), image)
