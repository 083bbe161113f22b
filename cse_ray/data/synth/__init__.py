"""The embedded synthetic dataset: PASCAL VOC layout, 20 classes, each with a big BODY and a small PART.

    looks    what each class looks like (colour families, part colours, shapes, textures)
    options  the design options (SynthOptions, their help text and ranges)
    render   one scene, deterministically: `render_sample(seed, split, index, size, options)`
    write    the VOC folder: `generate(out, train, val, size, seed, **design_options)`, resumable
    coco     the same scenes in the COCO 2014 layout with real COCO JSON: `generate_coco(...)`

docs/SYNTHETIC.md explains the design.
"""

from cse_ray.data.synth.looks import (
    BODY_FAMILIES,
    BODY_TEXTURES,
    CLASS_LOOKS,
    PART_COLOURS,
    SHAPES,
    TEXTURES,
    ClassLook,
)
from cse_ray.data.synth.options import OPTION_HELP, SynthOptions, make_options
from cse_ray.data.synth.render import SPLITS, SynthObject, SynthSample, boundary_band, render_sample
from cse_ray.data.synth.write import (
    FORMAT_VERSION,
    PARAMS_FILE,
    PARTIAL_FILE,
    annotation_xml,
    generate,
    generate_from_config,
    sample_name,
)

__all__ = [
    "BODY_FAMILIES",
    "BODY_TEXTURES",
    "CLASS_LOOKS",
    "FORMAT_VERSION",
    "OPTION_HELP",
    "PARAMS_FILE",
    "PARTIAL_FILE",
    "PART_COLOURS",
    "SHAPES",
    "SPLITS",
    "TEXTURES",
    "ClassLook",
    "SynthObject",
    "SynthOptions",
    "SynthSample",
    "annotation_xml",
    "boundary_band",
    "generate",
    "generate_from_config",
    "make_options",
    "render_sample",
    "sample_name",
]
