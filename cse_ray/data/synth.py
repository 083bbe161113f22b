"""The embedded synthetic dataset: PASCAL VOC layout, 20 classes, each with a big BODY and a small PART.

Why it looks the way it does (details in docs/SYNTHETIC.md): an ordinary CAM classifier latches onto the
easiest cue. Each class therefore has a tiny, saturated, class-unique PART (a two-colour bullseye) that is
learned first and dominates the ordinary CAM, and a large BODY (shared colour family + class shape +
class texture) that is a weaker but still sufficient cue. Erasing the part leaves a body the frozen
classifier still recognises, which is exactly the signal OC-CSE's eraser needs to spread over the object.

Every image is a pure function of (seed, split, index, size, design options), so the same parameters give
byte-identical files, generation can resume, and `hide_parts=True` renders the very same scenes with the
parts painted as body (for diagnostics).
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

from cse_ray import artifacts
from cse_ray.data.voc import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from cse_ray.errors import UserError
from cse_ray.formats import encode_label_png

SPLITS = ("train", "val")
PARAMS_FILE = "synth.json"
PARTIAL_FILE = "synth.partial.json"
FORMAT_VERSION = 1

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "blob", "cross")
TEXTURES = ("plain", "stripes", "dots", "checker")
BODY_TEXTURES = ("class", "family")
# Approximate area of each shape in units of (half-length a) * (half-width b); sizes the part.
_SHAPE_AREA = {
    "ellipse": math.pi,
    "rectangle": 3.24,
    "triangle": 1.8,
    "diamond": 2.0,
    "blob": 2.3,
    "cross": 2.46,
}

# Body colour families (hue degrees, saturation, value): ~3 classes share one. Moderately saturated, and
# alternating dark/light so that families stay apart even under hue jitter. The background stays below
# saturation 0.18, so no family colour appears there.
BODY_FAMILIES: tuple[tuple[float, float, float], ...] = (
    (0.0, 0.60, 0.55),
    (50.0, 0.60, 0.85),
    (105.0, 0.55, 0.50),
    (160.0, 0.55, 0.80),
    (215.0, 0.60, 0.55),
    (265.0, 0.50, 0.85),
    (315.0, 0.55, 0.62),
)
# Part colours: pure, fully saturated (or black/white), never used by bodies or background.
PART_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "black": (0.0, 0.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "green": (0.0, 1.0, 0.0),
}


@dataclass(frozen=True)
class ClassLook:
    """How one class is drawn."""

    name: str
    family: int
    shape: str
    texture: str
    part_outer: str
    part_inner: str


def _make_class_looks() -> tuple[ClassLook, ...]:
    """Class c: family c % 7, member m = c // 7. Members of a family differ in both shape and texture;
    part colour pairs (outer, inner) are unique ordered pairs and no pair appears reversed."""
    part_order = list(PART_COLOURS)
    looks = []
    for c, name in enumerate(CLASS_NAMES):
        family, member = c % len(BODY_FAMILIES), c // len(BODY_FAMILIES)
        outer = c % len(part_order)
        inner = (outer + 1 + c // len(part_order)) % len(part_order)
        looks.append(
            ClassLook(
                name=name,
                family=family,
                shape=SHAPES[(family + 2 * member) % len(SHAPES)],
                texture=TEXTURES[(family + member) % len(TEXTURES)],
                part_outer=part_order[outer],
                part_inner=part_order[inner],
            )
        )
    return tuple(looks)


CLASS_LOOKS: tuple[ClassLook, ...] = _make_class_looks()


@dataclass(frozen=True)
class SynthOptions:
    """Design options (meanings in OPTION_HELP). Every field changes the files; all go into synth.json."""

    part_strength: float = 1.0
    body_strength: float = 0.8
    part_fraction: float = 0.10
    body_hue_jitter: float = 12.0
    body_noise: float = 0.05
    clutter: float = 1.0
    min_objects: int = 1
    max_objects: int = 3
    object_scale: tuple[float, float] = (0.4, 0.8)
    aspect_range: tuple[float, float] = (0.75, 1.33)
    ignore_width: int = 1
    jpeg_quality: int = 90
    hide_parts: bool = False
    part_masks: bool = False
    body_texture: str = "class"

    def validate(self) -> SynthOptions:
        def bad(key: str, why: str) -> UserError:
            return UserError(f"synth option {key}={getattr(self, key)!r}: {why}")

        for key in ("part_strength", "body_strength"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must lie in [0, 1]")
        if not 0.0 < self.part_fraction <= 0.5:
            raise bad("part_fraction", "must lie in (0, 0.5]")
        if not 0.0 <= self.body_hue_jitter <= 180.0:
            raise bad("body_hue_jitter", "must lie in [0, 180] degrees")
        if not 0.0 <= self.body_noise <= 0.5:
            raise bad("body_noise", "must lie in [0, 0.5]")
        if not 0.0 <= self.clutter <= 3.0:
            raise bad("clutter", "must lie in [0, 3]")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise bad("max_objects", "need 1 <= min_objects <= max_objects <= 3")
        low, high = self.object_scale
        if not 0.05 <= low <= high <= 1.0:
            raise bad("object_scale", "need 0.05 <= low <= high <= 1")
        low, high = self.aspect_range
        if not 0.25 <= low <= high <= 4.0:
            raise bad("aspect_range", "need 0.25 <= low <= high <= 4")
        if not 0 <= self.ignore_width <= 8:
            raise bad("ignore_width", "must lie in 0..8")
        if self.body_texture not in BODY_TEXTURES:
            raise bad("body_texture", f"must be one of {', '.join(BODY_TEXTURES)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise bad("jpeg_quality", "must lie in 1..100")
        return self


OPTION_HELP: dict[str, str] = {
    "part_strength": "0..1: how far the part's two colours move from the body colour toward their pure "
    "saturated values (1 = pure colours, maximal contrast; 0 = no visible part)",
    "body_strength": "0..1: saturation of the body colour and contrast of its texture (1 = full family "
    "colour and texture; 0 = grey body, only the silhouette left)",
    "part_fraction": "part area / body area (the part is a disc inside the body)",
    "body_hue_jitter": "per-object body hue jitter, +- degrees around the family hue",
    "body_noise": "std of per-pixel noise on bodies (0..1 intensity scale)",
    "clutter": "background clutter contrast multiplier (0 = flat background)",
    "min_objects": "fewest objects per image (each object a different class)",
    "max_objects": "most objects per image, at most 3",
    "object_scale": "object length range as a fraction of the image's short side (shrunk with more objects)",
    "aspect_range": "range of image width / height; the long side is --size",
    "ignore_width": "pixels on each side of an object boundary marked 255 (ignore), 0 = none",
    "jpeg_quality": "JPEG quality (4:4:4 chroma, so the small parts keep their colours)",
    "hide_parts": "paint parts as body: the same scenes without the discriminative cue (diagnostics)",
    "body_texture": "'class': each class has its own body texture; 'family': the classes of a colour "
    "family share one texture, so only the silhouette (seen from afar) and the part tell them apart",
    "part_masks": "also write SegmentationPart/NAME.png (class index + 1 on part pixels) for diagnostics",
}


def make_options(**options: object) -> SynthOptions:
    """SynthOptions from keyword arguments, with a UserError naming any unknown key."""
    known = {f.name for f in fields(SynthOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown synth option(s) {unknown}; known: {sorted(known)}")
    for key in ("object_scale", "aspect_range"):
        if key in options:
            options[key] = tuple(float(v) for v in options[key])  # type: ignore[union-attr]
    return SynthOptions(**options).validate()  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- drawing
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


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour dilation, `steps` times (numpy only)."""
    grown = mask.copy()
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
    return _grow(edge, width - 1)


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


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


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
    classes = rng.choice(NUM_CLASSES, size=count, replace=False)
    shrink = count**-0.35

    label = np.zeros((height, width), np.uint8)
    parts = np.zeros((height, width), np.uint8)
    placed: list[dict] = []
    for class_index in classes:
        look = CLASS_LOOKS[int(class_index)]
        # Appearance draws (always made, in a fixed order, so retries below do not shift them).
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
            math.sqrt(opts.part_fraction * _SHAPE_AREA[look.shape] * a * b / math.pi) * rng.uniform(0.9, 1.1),
        )
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
        accepted = None
        for cx, cy, angle, part_offset in candidates:
            u, v = _object_coords(ys, xs, cy, cx, angle)
            body = _shape_mask(look.shape, u, v, a, b, phases)
            if body.sum() < 0.5 * _SHAPE_AREA[look.shape] * a * b:
                continue  # mostly outside the image
            part = None
            for pu, pv in ((part_offset[0] * a, part_offset[1] * b), (0.0, 0.0)):
                px = cx + pu * math.cos(angle) - pv * math.sin(angle)
                py = cy + pu * math.sin(angle) + pv * math.cos(angle)
                if not (
                    part_radius <= px <= width - part_radius and part_radius <= py <= height - part_radius
                ):
                    continue
                dist = np.hypot(ys - py, xs - px)
                disc = dist <= part_radius
                if not (disc & ~body).any():
                    part = (px, py, dist)
                    break
            if part is None:
                continue
            if any(
                (body & other["visible"]).sum() > 0.35 * other["visible"].sum()
                or (body & (other["dist"] <= other["radius"] + 2)).any()
                for other in placed
            ):
                continue
            accepted = (u, v, body, part)
            break
        if accepted is None:
            continue
        u, v, body, (px, py, dist) = accepted
        for other in placed:
            other["visible"] &= ~body

        # Body: family colour (desaturated by body_strength), class texture, shading and noise.
        rgb = hsv_to_rgb(*body_hsv)
        grey = np.float32(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
        rgb = grey + opts.body_strength * (rgb - grey)
        texture = look.texture if opts.body_texture == "class" else TEXTURES[look.family % len(TEXTURES)]
        modulation = 1.0 + 0.22 * opts.body_strength * _texture(texture, u, v, period)
        shading = 1.0 + 0.12 * ((u * math.cos(shade_angle) + v * math.sin(shade_angle)) / max(a, 1.0))
        body_pixels = rgb[None, :] * (modulation[body] * shading[body])[:, None]
        img[body] = body_pixels + rng.normal(0, opts.body_noise, body_pixels.shape).astype(np.float32)

        outer = dist <= part_radius
        inner = dist <= part_radius * 0.5
        if not opts.hide_parts:
            for region, colour_name in ((outer, look.part_outer), (inner, look.part_inner)):
                colour = np.asarray(PART_COLOURS[colour_name], np.float32)
                img[region] = img[region] + opts.part_strength * (colour - img[region])
        label[body] = class_index + 1
        parts[body] = 0
        parts[outer] = class_index + 1
        placed.append(
            {"class": int(class_index), "visible": body.copy(), "dist": dist, "radius": part_radius}
        )

    image = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    objects = []
    for obj in placed:
        rows, cols = np.nonzero(obj["visible"])
        bbox = (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1)
        truncated = bbox[0] == 1 or bbox[1] == 1 or bbox[2] == width or bbox[3] == height
        objects.append(SynthObject(obj["class"], bbox, truncated))
    label[boundary_band(label, opts.ignore_width)] = IGNORE_INDEX
    return SynthSample(image=image, label=label, parts=parts, objects=objects)


# ------------------------------------------------------------------------------------------- encoding
def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    """Atomic (temp file + rename) but without fsync: thousands of small files per run, and a file is
    either complete or absent after a crash, which is all resuming needs."""
    artifacts.write_bytes(path, data, fsync=False)


def annotation_xml(name: str, width: int, height: int, objects: list[SynthObject]) -> str:
    """VOC-style annotation; no timestamps, so the bytes depend only on the scene."""
    lines = [
        "<annotation>",
        "\t<folder>VOC2012</folder>",
        f"\t<filename>{escape(name)}.jpg</filename>",
        "\t<source>",
        "\t\t<database>cse-ray synthetic</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.bbox
        lines += [
            "\t<object>",
            f"\t\t<name>{CLASS_NAMES[obj.class_index]}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            "\t\t<difficult>0</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def sample_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


# ------------------------------------------------------------------------------------------- generate
def _params(train: int, val: int, size: int, seed: int, options: SynthOptions) -> dict:
    return json.loads(
        json.dumps(
            {
                "generator": "cse-ray synth",
                "format_version": FORMAT_VERSION,
                "train": train,
                "val": val,
                "size": size,
                "seed": seed,
                "options": asdict(options),
                "classes": list(CLASS_NAMES),
            },
            sort_keys=True,
        )
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_sample(root: Path, name: str, sample: SynthSample, opts: SynthOptions) -> None:
    height, width = sample.label.shape
    _write_file(root / "JPEGImages" / f"{name}.jpg", encode_jpeg(sample.image, opts.jpeg_quality))
    _write_file(root / "SegmentationClass" / f"{name}.png", encode_label_png(sample.label))
    if opts.part_masks:
        _write_file(root / "SegmentationPart" / f"{name}.png", encode_label_png(sample.parts))
    # The annotation is written last: its presence marks the sample complete when resuming.
    xml = annotation_xml(name, width, height, sample.objects)
    _write_file(root / "Annotations" / f"{name}.xml", xml.encode("utf-8"))


def generate(
    out: str | os.PathLike,
    train: int = 1000,
    val: int = 200,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    **design_options: object,
) -> dict:
    """Write the synthetic set in the VOC 2012 layout under `out` and return its parameters.

    A complete folder made with the same parameters is left untouched (`"reused": True`). An interrupted
    run with the same parameters resumes. A folder holding anything else is refused unless `overwrite`.
    """
    if not 0 <= int(train) <= 1_000_000 or not 0 <= int(val) <= 1_000_000 or train + val == 0:
        raise UserError(f"synth --train {train} --val {val}: need non-negative counts, not both zero")
    if int(seed) < 0:
        raise UserError(f"synth --seed {seed}: must be >= 0")
    if not 32 <= int(size) <= 2048:
        raise UserError(f"synth --size {size}: must lie in 32..2048")
    options = make_options(**design_options)
    root = Path(out)
    params = _params(int(train), int(val), int(size), int(seed), options)
    done = _read_json(root / PARAMS_FILE)
    if done == params:
        return {**params, "out": str(root), "reused": True, "written": 0}
    partial = _read_json(root / PARTIAL_FILE)
    resuming = partial == params and done is None
    if root.exists() and not resuming and any(root.iterdir()):
        if done is None and partial is None:  # never delete what this generator did not write
            raise UserError(f"{root}: folder already holds other files; choose a new or empty --out")
        if not overwrite:
            raise UserError(
                f"{root}: folder already holds a synthetic set with other parameters; "
                "choose another --out or pass overwrite"
            )
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationPart", "Annotations", "ImageSets"):
            shutil.rmtree(root / sub, ignore_errors=True)
        for stale in (PARAMS_FILE, PARTIAL_FILE):
            (root / stale).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(root / PARTIAL_FILE, json.dumps(params, indent=1, sort_keys=True) + "\n")

    written = 0
    names: dict[str, list[str]] = {}
    for split, count in (("train", int(train)), ("val", int(val))):
        names[split] = [sample_name(split, index) for index in range(count)]
        for index, name in enumerate(names[split]):
            if resuming and (root / "Annotations" / f"{name}.xml").is_file():
                continue
            _write_sample(root, name, render_sample(seed, split, index, size, options), options)
            written += 1
    lists = root / "ImageSets" / "Segmentation"
    for split in SPLITS:
        artifacts.write_text(lists / f"{split}.txt", "".join(f"{name}\n" for name in names[split]))
    artifacts.write_text(
        lists / "trainval.txt", "".join(f"{name}\n" for name in names["train"] + names["val"])
    )
    artifacts.write_text(root / PARAMS_FILE, json.dumps(params, indent=1, sort_keys=True) + "\n")
    (root / PARTIAL_FILE).unlink(missing_ok=True)
    return {**params, "out": str(root), "reused": False, "written": written}
