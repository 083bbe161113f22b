"""The synthetic VOC-style dataset, checked by an independent reader written here (PIL + ElementTree)."""

from __future__ import annotations

import inspect
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cse_ray.config import SynthConfig
from cse_ray.data import synth
from cse_ray.errors import UserError

VOC_NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person "
    "pottedplant sheep sofa train tvmonitor"
).split()


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def independent_voc_check(root: Path) -> dict[str, tuple[int, int]]:
    """Read the folder the way a plain VOC consumer would and return {name: (width, height)}."""
    sizes = {}
    for split in ("train", "val"):
        names = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for name in names:
            with Image.open(root / "JPEGImages" / f"{name}.jpg") as jpeg:
                assert jpeg.format == "JPEG" and jpeg.mode == "RGB"
                jpeg.load()
                size = jpeg.size
            with Image.open(root / "SegmentationClass" / f"{name}.png") as png:
                assert png.format == "PNG" and png.mode == "P"
                assert png.getpalette()[15 * 3 : 16 * 3] == [192, 128, 128]
                mask = np.array(png)
            assert (mask.shape[1], mask.shape[0]) == size
            values = set(np.unique(mask).tolist())
            assert values <= set(range(21)) | {255}
            assert 255 in values and 0 in values  # ignore band on boundaries, background present
            annotation = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
            assert annotation.findtext("filename") == f"{name}.jpg"
            assert (int(annotation.findtext("size/width")), int(annotation.findtext("size/height"))) == size
            xml_classes = [obj.findtext("name") for obj in annotation.findall("object")]
            assert 1 <= len(xml_classes) <= 3 and len(set(xml_classes)) == len(xml_classes)
            assert {VOC_NAMES.index(c) + 1 for c in xml_classes} == values - {0, 255}
            for obj in annotation.findall("object"):
                k = VOC_NAMES.index(obj.findtext("name")) + 1
                box = [int(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")]
                rows, cols = np.nonzero(mask == k)
                assert box[0] <= cols.min() + 1 and cols.max() + 1 <= box[2]
                assert box[1] <= rows.min() + 1 and rows.max() + 1 <= box[3]
            sizes[name] = size
    return sizes


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "set"
    return out, synth.generate(out, train=10, val=4, size=96, seed=7)


def test_output_is_a_valid_voc_tree(small_set) -> None:
    out, info = small_set
    sizes = independent_voc_check(out)
    assert len(sizes) == 14 and info["written"] == 14
    assert all(max(size) == 96 for size in sizes.values())
    assert len({w / h for w, h in sizes.values()}) > 3  # aspect ratios vary: non-square images
    assert any(w != h for w, h in sizes.values())
    params = json.loads((out / "synth.json").read_text())
    assert params["seed"] == 7 and params["options"]["part_fraction"] == pytest.approx(0.10)


def test_same_seed_same_bytes_and_other_seed_other_bytes(tmp_path: Path, small_set) -> None:
    out, _ = small_set
    again = tmp_path / "again"
    synth.generate(again, train=10, val=4, size=96, seed=7)
    assert read_tree(again) == read_tree(out)
    other = tmp_path / "other"
    synth.generate(other, train=10, val=4, size=96, seed=8)
    other_tree = read_tree(other)
    assert other_tree.keys() == read_tree(out).keys()
    differing = [key for key in other_tree if key.endswith(".jpg") and other_tree[key] != read_tree(out)[key]]
    assert len(differing) == 14


def test_regenerating_a_complete_set_is_a_no_op(small_set) -> None:
    out, _ = small_set
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = synth.generate(out, train=10, val=4, size=96, seed=7)
    assert result["reused"] is True and result["written"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_other_parameters_into_an_existing_set_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "set"
    synth.generate(out, train=2, val=1, size=64, seed=0)
    with pytest.raises(UserError, match="other parameters"):
        synth.generate(out, train=2, val=1, size=64, seed=1)
    with pytest.raises(UserError, match="other files"):
        synth.generate(tmp_path, train=2, val=1, size=64)
    replaced = synth.generate(out, train=3, val=1, size=64, seed=1, overwrite=True)
    assert replaced["written"] == 4 and len(list((out / "JPEGImages").iterdir())) == 4


def test_interrupted_generation_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    synth.generate(reference, train=5, val=2, size=64, seed=3)
    interrupted = tmp_path / "interrupted"
    synth.generate(interrupted, train=5, val=2, size=64, seed=3)
    # Make it look like a run killed midway: no final synth.json, some samples missing.
    (interrupted / "synth.json").rename(interrupted / "synth.partial.json")
    for name in ("train_000003", "val_000001"):
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png"), ("Annotations", "xml")):
            (interrupted / sub / f"{name}.{ext}").unlink()
    result = synth.generate(interrupted, train=5, val=2, size=64, seed=3)
    assert result["written"] == 2
    assert read_tree(interrupted) == read_tree(reference)


def test_hidden_parts_render_the_same_scene_without_the_part() -> None:
    options = synth.make_options(part_masks=True)
    for index in range(6):
        shown = synth.render_sample(5, "train", index, 112, options)
        hidden = synth.render_sample(5, "train", index, 112, synth.make_options(hide_parts=True))
        assert np.array_equal(shown.label, hidden.label)
        part = shown.parts > 0
        assert part.any()
        assert np.array_equal(shown.image[~part], hidden.image[~part])
        assert np.abs(shown.image[part].astype(int) - hidden.image[part].astype(int)).mean() > 40
        faint = synth.render_sample(5, "train", index, 112, synth.make_options(part_strength=0.0))
        assert np.array_equal(faint.image, hidden.image)  # strength 0 means no part at all


def test_partless_training_objects_lose_their_part_and_nothing_else() -> None:
    """`partless`: that share of training objects shows no part (the same scene, the part painted as
    body, absent from the part map); validation scenes are untouched."""
    everything = synth.make_options(partless=1.0, part_masks=True)
    for index in range(4):
        hidden = synth.render_sample(5, "train", index, 112, synth.make_options(hide_parts=True))
        partless = synth.render_sample(5, "train", index, 112, everything)
        assert np.array_equal(partless.image, hidden.image) and np.array_equal(partless.label, hidden.label)
        assert not partless.parts.any()
        shown = synth.render_sample(5, "val", index, 112, synth.make_options(part_masks=True))
        assert np.array_equal(synth.render_sample(5, "val", index, 112, everything).image, shown.image)
    half = synth.make_options(partless=0.5)
    lost = kept = 0
    for index in range(30):
        shown = synth.render_sample(2, "train", index, 96)
        sample = synth.render_sample(2, "train", index, 96, half)
        assert np.array_equal(sample.label, shown.label)
        for obj in shown.objects:
            has_part = bool((sample.parts == obj.class_index + 1).any())
            part = shown.parts == obj.class_index + 1
            assert np.array_equal(sample.image[part], shown.image[part]) == has_part
            lost += not has_part
            kept += has_part
    assert 0.3 < lost / (lost + kept) < 0.7


def _parts_and_objects(options: synth.SynthOptions, scenes: int):
    """(part mask, whole-object mask) of every object in the first validation scenes; each part is
    checked to be visible and to lie inside its object."""
    for index in range(scenes):
        sample = synth.render_sample(0, "val", index, 128, options)
        for obj in sample.objects:
            k = obj.class_index + 1
            part, whole = sample.parts == k, (sample.label == k) | (sample.parts == k)
            assert part.any() and np.all(sample.label[part] != 0)
            yield part, whole


def test_part_covers_the_requested_fraction_of_each_object() -> None:
    for fraction in (0.05, 0.12):
        options = synth.make_options(part_fraction=fraction)
        ratios = [part.sum() / whole.sum() for part, whole in _parts_and_objects(options, 12)]
        assert fraction * 0.7 < np.median(ratios) < fraction * 1.5


def test_parts_placed_at_the_end_lie_farther_from_the_body_centre() -> None:
    """part_place='end' puts the part out on the long axis: its centre is farther from the object's
    centroid than with 'inside', measured in object lengths, and it still lies within the body."""

    def offsets(place: str) -> list[float]:
        found = []
        for part, whole in _parts_and_objects(synth.make_options(part_place=place), 16):
            pixels = np.argwhere(whole)
            length = np.ptp(pixels, axis=0).max()
            found.append(float(np.linalg.norm(np.argwhere(part).mean(0) - pixels.mean(0)) / length))
        return found

    inside, end = offsets("inside"), offsets("end")
    assert np.median(end) > 0.2 > np.median(inside)


def test_class_looks_make_every_class_unique() -> None:
    looks = synth.CLASS_LOOKS
    assert [look.name for look in looks] == VOC_NAMES
    assert len({(look.family, look.shape, look.texture) for look in looks}) == 20
    pairs = {(look.part_outer, look.part_inner) for look in looks}
    assert len(pairs) == 20 and all((inner, outer) not in pairs for outer, inner in pairs)
    for family in range(len(synth.BODY_FAMILIES)):
        members = [look for look in looks if look.family == family]
        assert 2 <= len(members) <= 3
        assert (
            len({look.shape for look in members}) == len({look.texture for look in members}) == len(members)
        )


def test_family_texture_changes_only_the_bodies_whose_class_texture_differs() -> None:
    family = synth.make_options(body_texture="family")
    changed = unchanged = 0
    for index in range(8):
        own = synth.render_sample(3, "val", index, 96)
        shared = synth.render_sample(3, "val", index, 96, family)
        assert np.array_equal(own.label, shared.label)
        background = own.label == 0
        assert np.array_equal(own.image[background], shared.image[background])
        for obj in own.objects:
            look = synth.CLASS_LOOKS[obj.class_index]
            body = (own.label == obj.class_index + 1) & (own.parts == 0)
            differs = not np.array_equal(own.image[body], shared.image[body])
            same_texture = look.texture == synth.TEXTURES[look.family % len(synth.TEXTURES)]
            assert differs != same_texture, look.name
            changed += differs
            unchanged += not differs
    assert changed and unchanged


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"part_strength": 1.5}, "part_strength"),
        ({"body_texture": "shared"}, "body_texture"),
        ({"partless": -0.1}, "partless"),
        ({"part_place": "edge"}, "part_place"),
        ({"max_objects": 4}, "max_objects"),
        ({"colour": 1}, "colour"),
    ],
)
def test_bad_design_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(UserError, match=key):
        synth.make_options(**options)


def test_defaults_are_the_configs() -> None:
    """config.SynthConfig owns the defaults: the API, the design options and a config agree."""
    config = SynthConfig()
    parameters = inspect.signature(synth.generate).parameters
    assert {key: parameters[key].default for key in ("train", "val", "size", "seed")} == {
        "train": config.train, "val": config.val, "size": config.size, "seed": config.seed,
    }
    options = synth.SynthOptions()
    keys = ("part_strength", "body_strength", "body_texture", "partless", "part_place")
    assert {key: getattr(options, key) for key in keys} == {key: getattr(config, key) for key in keys}


def test_a_config_writes_the_same_set_as_its_values(tmp_path: Path) -> None:
    config = SynthConfig(enabled=True, train=3, val=1, size=48, seed=2, body_strength=0.5,
                         body_texture="family", partless=0.5, part_place="end")
    from_config = synth.generate_from_config(tmp_path / "config", config)
    direct = synth.generate(tmp_path / "direct", train=3, val=1, size=48, seed=2, body_strength=0.5,
                            body_texture="family", partless=0.5, part_place="end")
    assert from_config["options"] == direct["options"]
    assert (from_config["options"]["body_texture"], from_config["options"]["part_place"]) == ("family", "end")
    assert read_tree(tmp_path / "config") == read_tree(tmp_path / "direct")


def test_annotation_xml_escapes_and_lays_out_like_voc() -> None:
    objects = [synth.SynthObject(7, (1, 2, 30, 40), truncated=True)]
    text = synth.annotation_xml("a&b", 64, 48, objects)
    assert text.startswith("<annotation>\n\t<folder>VOC2012</folder>\n") and text.endswith("</annotation>\n")
    assert "<filename>a&amp;b.jpg</filename>" in text
    root = ET.fromstring(text)
    assert root.findtext("object/name") == "cat" and root.findtext("object/truncated") == "1"
    assert [root.findtext(f"object/bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")] == [
        "1", "2", "30", "40",
    ]
    assert "\t\t\t<xmin>1</xmin>" in text


def test_a_set_written_before_an_option_existed_is_still_the_same_set(tmp_path) -> None:
    """synth.json without `partless` (sets written before it existed) means partless 0: no regeneration."""
    from cse_ray.data.synth.write import PARAMS_FILE

    root = tmp_path / "voc"
    synth.generate(str(root), train=2, val=1, size=48, seed=0)
    params = json.loads((root / PARAMS_FILE).read_text())
    del params["options"]["partless"]
    (root / PARAMS_FILE).write_text(json.dumps(params))
    before = (root / "JPEGImages").stat().st_mtime_ns
    synth.generate(str(root), train=2, val=1, size=48, seed=0)  # the same set: nothing rewritten
    assert (root / "JPEGImages").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="other parameters"):
        synth.generate(str(root), train=2, val=1, size=48, seed=0, partless=0.5)
