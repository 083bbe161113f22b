"""Rendering one synthetic scene: background clutter, then 1-3 objects, each a BODY with a PART inside.

Why it looks the way it does (details in docs/SYNTHETIC.md): an ordinary CAM classifier latches onto the
easiest cue. Each class therefore has a tiny, saturated, class-unique PART (a two-colour bullseye) that is
learned first and dominates the ordinary CAM, and a large BODY (shared colour family + class shape +
class texture) that is a weaker but still sufficient cue. Erasing the part leaves a body the frozen
classifier still recognises, which is exactly the signal OC-CSE's eraser needs to spread over the object.

Every image is a pure function of (seed, split, index, size, design options): every random draw comes
from one generator seeded by (seed, split, index), in a fixed order, so the same parameters give the
same pixels, and `hide_parts=True` renders the very same scenes with the parts painted as body.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from cse_ray.data.synth.looks import (
    BODY_FAMILIES,
    CLASS_LOOKS,
    PART_COLOURS,
    SHAPE_AREA,
    SHAPES,
    TEXTURES,
    ClassLook,
)
from cse_ray.data.synth.options import SynthOptions
from cse_ray.labels import IGNORE_INDEX, VOC

SPLITS = ("train", "val")


def hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour, HSV in [0, 1] (hue wraps) -> float32 RGB in [0, 1]."""
    rgb = colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0))
    return np.asarray(rgb, np.float32)


def _object_coords(
    ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, angle: float
) -> tuple[np.ndarray, ...]:
    """Pixel grid in an object's frame: u along its length, v across."""
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = ys - cy, xs - cx
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _shape_mask(
    shape: str, u: np.ndarray, v: np.ndarray, a: float, b: float, phases: np.ndarray
) -> np.ndarray:
    un, vn = u / a, v / b
    if shape == "ellipse":
        return un * un + vn * vn <= 1.0
    if shape == "rectangle":
        return (np.abs(un) <= 0.9) & (np.abs(vn) <= 0.9)
    if shape == "triangle":
        return (un >= -0.8) & (np.abs(vn) <= (1.0 - un) / 1.8)
    if shape == "diamond":
        return np.abs(un) + np.abs(vn) <= 1.0
    if shape == "blob":
        rho = np.sqrt(un * un + vn * vn)
        phi = np.arctan2(vn, un)
        radius = 0.85 * (1.0 + 0.18 * np.sin(3 * phi + phases[0]) + 0.10 * np.sin(5 * phi + phases[1]))
        return rho <= radius
    if shape == "cross":
        arm = 0.38
        return ((np.abs(un) <= 1.0) & (np.abs(vn) <= arm)) | ((np.abs(un) <= arm) & (np.abs(vn) <= 1.0))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Zero-mean-ish modulation in [-1, 1] in the object's frame (so it rotates with the object)."""
    if texture == "plain":
        return np.zeros_like(u)
    if texture == "stripes":
        return np.sign(np.sin(2 * math.pi * v / period))
    if texture == "dots":
        du = (u / period) % 1.0 - 0.5
        dv = (v / period) % 1.0 - 0.5
        return np.where(du * du + dv * dv < 0.09, -1.6, 0.4)
    if texture == "checker":
        return np.sign(np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period))
    raise ValueError(f"unknown texture {texture!r}")


def grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask with every pixel within `steps` 4-neighbour steps of it (numpy only)."""
    grown = np.asarray(mask, bool).copy()
    for _ in range(steps):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` (4-neighbour steps) of a pixel with a different label: VOC's ignore band."""
    if width <= 0:
        return np.zeros(label.shape, bool)
    edge = np.zeros(label.shape, bool)
    diff_v = label[1:] != label[:-1]
    diff_h = label[:, 1:] != label[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return grow(edge, width - 1)


@dataclass
class SynthObject:
    class_index: int  # 0..19
    bbox: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax, 1-based inclusive like VOC
    truncated: bool


@dataclass
class SynthSample:
    """One rendered scene: what the files hold, plus the part map for diagnostics."""

    image: np.ndarray  # uint8 HxWx3
    label: np.ndarray  # uint8 HxW: 0 background, 1..20, 255 ignore band
    parts: np.ndarray  # uint8 HxW: class index + 1 on visible part pixels, else 0
    objects: list[SynthObject]


def _sample_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    key = [int(seed), SPLITS.index(split), int(index)]
    return np.random.default_rng(key + [stream] if stream else key)


def _background(
    rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray, size: int, clutter: float
) -> np.ndarray:
    """Low-saturation, low-contrast clutter: tinted base, gradient, grey shapes, a grating, noise."""
    height, width = ys.shape
    hue = rng.uniform(0, 1)
    base = hsv_to_rgb(hue, rng.uniform(0.03, 0.18), rng.uniform(0.35, 0.7))
    img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
    gradient_angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(gradient_angle) + ys * math.sin(gradient_angle)) / size
    img = img + (0.08 * clutter * (ramp - ramp.mean()))[..., None]
    for _ in range(int(rng.integers(3, 8))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        a = rng.uniform(0.08, 0.35) * size
        b = a * rng.uniform(0.4, 1.0)
        u, v = _object_coords(
            ys, xs, rng.uniform(0, height), rng.uniform(0, width), rng.uniform(-math.pi, math.pi)
        )
        blob = _shape_mask(shape, u, v, a, b, rng.uniform(0, 2 * math.pi, 2))
        tint = hsv_to_rgb(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.0, 0.18), rng.uniform(0.3, 0.75))
        mix = 0.45 * min(clutter, 1.0)
        img[blob] = (1 - mix) * img[blob] + mix * tint
    if rng.random() < 0.6:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.05, 0.15) * size
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        img = img + (0.05 * clutter * np.sin(phase))[..., None]
    for _ in range(int(rng.integers(0, 3))):  # grey bullseyes: the ring shape alone means nothing
        radius = rng.uniform(0.02, 0.05) * size
        dist = np.hypot(ys - rng.uniform(0, height), xs - rng.uniform(0, width))
        level = rng.uniform(-0.12, 0.12) * clutter
        img[dist <= radius] += level
        img[dist <= radius * 0.5] -= 2 * level
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return img



@dataclass(frozen=True)
class _Appearance:
    """One object's size and colours, drawn before it is placed (so placement retries do not shift them)."""

    a: float  # half-length
    b: float  # half-width
    phases: np.ndarray  # the blob outline's wave phases
    body_hsv: tuple[float, float, float]
    period: float  # texture period in pixels
    shade_angle: float
    part_radius: float


@dataclass
class _Placed:
    class_index: int
    visible: np.ndarray  # body pixels not hidden by a later object
    dist: np.ndarray  # distance of every pixel from the part's centre
    radius: float  # the part's radius


def _draw_appearance(
    rng: np.random.Generator, look: ClassLook, opts: SynthOptions, short: int, shrink: float, size: int
) -> _Appearance:
    length = rng.uniform(*opts.object_scale) * short * shrink
    a = length / 2
    b = a * rng.uniform(0.6, 0.95)
    phases = rng.uniform(0, 2 * math.pi, 2)
    fam_h, fam_s, fam_v = BODY_FAMILIES[look.family]
    body_hsv = (
        (fam_h + rng.uniform(-opts.body_hue_jitter, opts.body_hue_jitter)) / 360.0,
        fam_s * rng.uniform(0.85, 1.15),
        fam_v * rng.uniform(0.88, 1.12),
    )
    period = size / 18.0 * rng.uniform(0.85, 1.15)
    shade_angle = rng.uniform(0, 2 * math.pi)
    part_radius = max(
        2.5,
        math.sqrt(opts.part_fraction * SHAPE_AREA[look.shape] * a * b / math.pi) * rng.uniform(0.9, 1.1),
    )
    return _Appearance(a, b, phases, body_hsv, period, shade_angle, part_radius)


def _part_offsets(offset: np.ndarray, a: float, b: float, place: str) -> list[tuple[float, float]]:
    """Where to try the part's centre, in the object's frame, first to last (the centre always last).
    'end' takes only the side from the pose's draw, so both places consume the same random numbers."""
    if place == "end":
        side = 1.0 if offset[0] >= 0 else -1.0
        return [(side * f * a, 0.0) for f in (0.65, 0.55, 0.45, 0.35)] + [(0.0, 0.0)]
    return [(offset[0] * a, offset[1] * b), (0.0, 0.0)]


def _place(
    rng: np.random.Generator, shape: str, app: _Appearance, ys: np.ndarray, xs: np.ndarray,
    placed: list[_Placed], part_place: str = "inside",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(u, v, body mask, part distance map) of the first of 12 random poses (then the centre) where the
    body lies mostly inside the image, its part fully inside body and image, and it neither hides more
    than 35 % of an earlier object nor touches an earlier part; None when no pose fits."""
    height, width = ys.shape
    a, b, part_radius = app.a, app.b, app.part_radius
    candidates = [
        (
            rng.uniform(a * 0.5, width - a * 0.5) if width > a else width / 2,
            rng.uniform(a * 0.5, height - a * 0.5) if height > a else height / 2,
            rng.uniform(-math.pi, math.pi),
            rng.uniform(-0.45, 0.45, 2),
        )
        for _ in range(12)
    ]
    # Last resort, no random draw: centred and unrotated, which always fits an empty image.
    candidates.append((width / 2, height / 2, 0.0, np.zeros(2)))
    for cx, cy, angle, part_offset in candidates:
        u, v = _object_coords(ys, xs, cy, cx, angle)
        body = _shape_mask(shape, u, v, a, b, app.phases)
        if body.sum() < 0.5 * SHAPE_AREA[shape] * a * b:
            continue  # mostly outside the image
        part = None
        for pu, pv in _part_offsets(part_offset, a, b, part_place):
            px = cx + pu * math.cos(angle) - pv * math.sin(angle)
            py = cy + pu * math.sin(angle) + pv * math.cos(angle)
            if not (part_radius <= px <= width - part_radius and part_radius <= py <= height - part_radius):
                continue
            dist = np.hypot(ys - py, xs - px)
            disc = dist <= part_radius
            if not (disc & ~body).any():
                part = dist
                break
        if part is None:
            continue
        if any(
            (body & other.visible).sum() > 0.35 * other.visible.sum()
            or (body & (other.dist <= other.radius + 2)).any()
            for other in placed
        ):
            continue
        return u, v, body, part
    return None


def _paint(
    img: np.ndarray, rng: np.random.Generator, look: ClassLook, app: _Appearance, opts: SynthOptions,
    u: np.ndarray, v: np.ndarray, body: np.ndarray, outer: np.ndarray, inner: np.ndarray, hidden: bool,
) -> None:
    """Body: family colour (desaturated by body_strength), class texture, shading and noise; then the part
    (unless hidden). The noise is drawn whether or not the part is hidden."""
    rgb = hsv_to_rgb(*app.body_hsv)
    grey = np.float32(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
    rgb = grey + opts.body_strength * (rgb - grey)
    texture = look.texture if opts.body_texture == "class" else TEXTURES[look.family % len(TEXTURES)]
    modulation = 1.0 + 0.22 * opts.body_strength * _texture(texture, u, v, app.period)
    shading = 1.0 + 0.12 * ((u * math.cos(app.shade_angle) + v * math.sin(app.shade_angle)) / max(app.a, 1.0))
    body_pixels = rgb[None, :] * (modulation[body] * shading[body])[:, None]
    img[body] = body_pixels + rng.normal(0, opts.body_noise, body_pixels.shape).astype(np.float32)
    if not hidden:
        for region, colour_name in ((outer, look.part_outer), (inner, look.part_inner)):
            colour = np.asarray(PART_COLOURS[colour_name], np.float32)
            img[region] = img[region] + opts.part_strength * (colour - img[region])


def render_sample(
    seed: int, split: str, index: int, size: int = 128, options: SynthOptions | None = None
) -> SynthSample:
    """Render scene `index` of `split` deterministically. All random draws happen whatever `hide_parts`
    is, so hidden-part renders show the identical scene."""
    opts = options or SynthOptions()
    rng = _sample_rng(seed, split, index)
    aspect = math.exp(rng.uniform(math.log(opts.aspect_range[0]), math.log(opts.aspect_range[1])))
    if aspect >= 1.0:
        width, height = size, max(16, round(size / aspect))
    else:
        width, height = max(16, round(size * aspect)), size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys += 0.5
    xs += 0.5
    img = _background(rng, ys, xs, size, opts.clutter)
    short = min(height, width)

    count_probs = np.array([0.5, 0.35, 0.15])[opts.min_objects - 1 : opts.max_objects]
    count = opts.min_objects + int(rng.choice(len(count_probs), p=count_probs / count_probs.sum()))
    classes = rng.choice(VOC.num_classes, size=count, replace=False)
    shrink = count**-0.35

    label = np.zeros((height, width), np.uint8)
    parts = np.zeros((height, width), np.uint8)
    placed: list[_Placed] = []
    # Which objects lose their part: a stream of its own, so the scene's draws are the same for any
    # `partless` (a partless object is its part-showing self with the part painted as body).
    partless = _sample_rng(seed, split, index, stream=1).random(len(classes)) < opts.partless
    for class_index, no_part in zip(classes, partless):
        look = CLASS_LOOKS[int(class_index)]
        app = _draw_appearance(rng, look, opts, short, shrink, size)
        pose = _place(rng, look.shape, app, ys, xs, placed, opts.part_place)
        if pose is None:
            continue
        u, v, body, dist = pose
        for other in placed:
            other.visible &= ~body
        outer = dist <= app.part_radius
        inner = dist <= app.part_radius * 0.5
        lost = split == "train" and bool(no_part)  # no part at all, not even in the part map
        _paint(img, rng, look, app, opts, u, v, body, outer, inner, opts.hide_parts or lost)
        label[body] = class_index + 1
        parts[body] = 0
        if not lost:
            parts[outer] = class_index + 1
        placed.append(_Placed(int(class_index), body.copy(), dist, app.part_radius))

    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    objects = []
    for obj in placed:
        rows, cols = np.nonzero(obj.visible)
        bbox = (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1)
        truncated = bbox[0] == 1 or bbox[1] == 1 or bbox[2] == width or bbox[3] == height
        objects.append(SynthObject(obj.class_index, bbox, truncated))
    label[boundary_band(label, opts.ignore_width)] = IGNORE_INDEX
    return SynthSample(image=image, label=label, parts=parts, objects=objects)
