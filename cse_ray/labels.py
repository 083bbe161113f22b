"""What a class index means: one `LabelSpace` per dataset (class names, the palette, the ignore index).

Every stage that needs the class count or names takes a LabelSpace (from `config.data.dataset` via
`label_space`) instead of a module constant, so a dataset with another number of classes flows through
training, inference, CRF, evaluation and reports unchanged. Index conventions are VOC's: in label maps
0 is background, k + 1 is class k, 255 is "ignore"; in CAMs and image-level labels class k is index k.
"""

from __future__ import annotations

from dataclasses import dataclass

from cse_ray.errors import UserError

IGNORE_INDEX = 255


def _bit_palette() -> list[int]:
    """The VOC colour map: the bits of the index spread over the high bits of R, G and B (256 entries)."""
    palette: list[int] = []
    for index in range(256):
        red = green = blue = 0
        code = index
        for bit in range(8):
            red |= ((code >> 0) & 1) << (7 - bit)
            green |= ((code >> 1) & 1) << (7 - bit)
            blue |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette.extend((red, green, blue))
    return palette


PALETTE: list[int] = _bit_palette()
"""One palette for every dataset: it covers all 256 indices (81 COCO categories and 255 included)."""


@dataclass(frozen=True)
class LabelSpace:
    """The classes of one dataset, foreground only (background is category 0 of label maps)."""

    dataset: str
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Foreground classes: the CAM channels and the image-level label length."""
        return len(self.class_names)

    @property
    def category_names(self) -> tuple[str, ...]:
        """Background + classes: the categories of label maps and of the evaluation."""
        return ("background", *self.class_names)

    @property
    def num_categories(self) -> int:
        return self.num_classes + 1

    @property
    def palette(self) -> list[int]:
        return PALETTE

    def class_index(self) -> dict[str, int]:
        return {name: k for k, name in enumerate(self.class_names)}


VOC = LabelSpace(
    "voc",
    ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
     "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"),
)

COCO = LabelSpace(
    "coco",
    # MS-COCO's 80 categories in ascending category id (1..90 with gaps): class k is the k-th id.
    ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
     "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
     "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
     "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
     "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
     "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
     "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
     "scissors", "teddy bear", "hair drier", "toothbrush"),
)

LABEL_SPACES: dict[str, LabelSpace] = {"voc": VOC, "coco": COCO}


def label_space(dataset: str) -> LabelSpace:
    """The LabelSpace of a dataset name (`data.dataset` in the config)."""
    try:
        return LABEL_SPACES[dataset]
    except KeyError:
        raise UserError(f"dataset {dataset!r}: unknown (known: {', '.join(LABEL_SPACES)})") from None


def custom_label_space(num_classes: int) -> LabelSpace:
    """A label space of `num_classes` generic classes (`class0`, `class1`, ...), for tests and new data."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return LabelSpace(f"custom{num_classes}", tuple(f"class{k}" for k in range(num_classes)))
