"""The synthetic set's design options: what each one means, their ranges, and how to build them.

The five options a config can set (`data.synth.part_strength`, `body_strength`, `body_texture`,
`partless`, `part_place`) take their defaults from `config.SynthConfig`, the one owner of the synthetic
set's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cse_ray.config import SynthConfig
from cse_ray.config.schema import SYNTH_BODY_TEXTURES, SYNTH_PART_PLACES
from cse_ray.errors import UserError


@dataclass(frozen=True)
class SynthOptions:
    """Design options (meanings in OPTION_HELP). Every field changes the files; all go into synth.json."""

    part_strength: float = SynthConfig.part_strength
    body_strength: float = SynthConfig.body_strength
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
    body_texture: str = SynthConfig.body_texture
    partless: float = SynthConfig.partless
    part_place: str = SynthConfig.part_place

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
        if not 0.0 <= self.partless <= 1.0:
            raise bad("partless", "must lie in [0, 1]")
        if self.part_place not in SYNTH_PART_PLACES:
            raise bad("part_place", f"must be one of {', '.join(SYNTH_PART_PLACES)}")
        if self.body_texture not in SYNTH_BODY_TEXTURES:
            raise bad("body_texture", f"must be one of {', '.join(SYNTH_BODY_TEXTURES)}")
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
    "partless": "0..1: the share of training-split objects drawn without their part (as if it were occluded "
    "or out of frame), so that bodies alone are class evidence; validation objects always show theirs",
    "part_place": "'inside': the part's centre anywhere within 45 % of the body's half-axes of its centre; "
    "'end': on the long axis, as far toward one end as it fits (a head), so most of the body lies beyond "
    "the part's neighbourhood",
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

