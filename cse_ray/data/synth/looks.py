"""What each synthetic class looks like: colour families, part colours, shapes, textures (docs/SYNTHETIC.md).

A class is recognisable by two cues of different difficulty: a BODY (a colour family shared by 2-3
classes, plus the class's shape and texture) and a PART (a two-colour bullseye unique to the class).
The table is a pure function of the class index, so it never changes between runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cse_ray.config.schema import SYNTH_BODY_TEXTURES
from cse_ray.labels import VOC

SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "blob", "cross")
TEXTURES = ("plain", "stripes", "dots", "checker")
BODY_TEXTURES = SYNTH_BODY_TEXTURES
# Approximate area of each shape in units of (half-length a) * (half-width b); sizes the part.
SHAPE_AREA = {
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
    for c, name in enumerate(VOC.class_names):
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
