"""The run configuration's schema: one frozen dataclass per stage, each default beside its component.

The training, CAM and CRF hyperparameters default to the reference's values (psa's train_cls for
train_cam, OC-CSE for train_cse; METHOD.md). What the defaults cannot know is the dataset: lists,
weights and validation scales default to a plain VOC layout, so `configs/voc12.yaml` is the paper's
full recipe (train_aug, validation on VOC train with 4 scales, ImageNet weights); docs/METHOD_NOTES.md
lists every deliberate difference and the option that restores the reference.

Field metadata carries the allowed range or choices that `cse_ray.config.loading` checks, so a key's
type, default and bounds live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cse_ray.labels import LABEL_SPACES, LabelSpace, label_space
from cse_ray.metrics.thresholds import DEFAULT_THRESHOLD_RANGE


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


def _choices(*values: str) -> dict:
    return {"choices": values}


# The synthetic set's two categorical design options (docs/SYNTHETIC.md); the CLI and the generator
# take their choices from here.
SYNTH_BODY_TEXTURES = ("class", "family")  # a body's texture: its class's own, or its colour family's
SYNTH_PART_PLACES = ("inside", "end")  # a part: anywhere inside the body, or at one end (a head)


@dataclass(frozen=True)
class SynthConfig:
    """The embedded synthetic dataset (`cse-ray synth`); generated into `data.root` when enabled."""

    enabled: bool = False
    train: int = field(default=200, metadata=_range(1))
    val: int = field(default=50, metadata=_range(1))
    size: int = field(default=128, metadata=_range(32))
    seed: int = field(default=0, metadata=_range(0))
    part_strength: float = field(default=1.0, metadata=_range(0.0, 1.0))
    body_strength: float = field(default=0.8, metadata=_range(0.0, 1.0))
    body_texture: str = field(default="class", metadata=_choices(*SYNTH_BODY_TEXTURES))
    partless: float = field(default=0.0, metadata=_range(0.0, 1.0))  # training objects without a part
    part_place: str = field(default="inside", metadata=_choices(*SYNTH_PART_PLACES))  # where a part sits


@dataclass(frozen=True)
class DataConfig:
    """Where the VOC-layout dataset is and which lists each stage reads."""

    dataset: str = field(default="voc", metadata=_choices(*LABEL_SPACES))  # what the class indices mean
    root: str = ""  # VOC root; empty with synth.enabled -> RUN_DIR/data
    sbd_root: str = ""  # optional SBD (SegmentationClassAug) root
    train_list: str = "train"  # a name under ImageSets/Segmentation, or a path
    val_list: str = "val"  # per-epoch validation and the final CAM evaluation
    infer_list: str = "train"  # images that get pseudo-labels
    # Your own classes, in index order (a VOC-layout dataset whose XML or labels file names them);
    # empty = the classes of data.dataset.
    class_names: tuple[str, ...] = ()
    synth: SynthConfig = field(default_factory=SynthConfig)

    @property
    def labels(self) -> LabelSpace:
        """The dataset's classes: every stage takes the class count and names from here."""
        if self.class_names:
            return LabelSpace("custom", self.class_names)
        return label_space(self.dataset)


@dataclass(frozen=True)
class ModelConfig:
    """The network shared by both stages (METHOD.md: same architecture for OC and eraser)."""

    backbone: str = "resnet38d"  # or resnet38d_small / resnet38d_tiny / resnet38d_tiny_undilated for CPU
    pretrained: str = ""  # ImageNet weights (.params or .pth); empty = random init


@dataclass(frozen=True)
class TrainCamConfig:
    """The ordinary classifier (psa's train_cls recipe)."""

    epochs: int = field(default=15, metadata=_range(1))
    batch_size: int = field(default=16, metadata=_range(1))  # global: per-worker batch x workers
    lr: float = field(default=0.1, metadata=_range(0.0))
    weight_decay: float = field(default=5e-4, metadata=_range(0.0))
    momentum_mode: str = field(default="faithful", metadata=_choices("faithful", "fixed"))
    crop: int = field(default=448, metadata=_range(16))
    resize_long: tuple[int, int] = (256, 512)  # psa's train_cls; the eraser: 256-448
    jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)  # brightness, contrast, saturation, hue
    dropout: tuple[float, float] = (0.3, 0.5)  # Dropout2d in b6, b7 while training (psa's train_cls)
    head_dropout: float = field(default=0.5, metadata=_range(0.0, 1.0))  # before fc8: psa 0.5, OC-CSE none
    # The new head's learning rate (fc8; AffinityNet's and the segmentation network's heads). "x10": psa's
    # groups, its weights at 10x the base lr and its biases at 20x, meant for a new head on an ImageNet
    # backbone; "x1": the head in the backbone's groups (1x / 2x), for networks trained from scratch.
    head_lr: str = field(default="x10", metadata=_choices("x10", "x1"))
    # Where the dropout masks come from. "sample": each sample's own generator, keyed by (seed, epoch,
    # sample index, layer), so N workers draw the masks one worker draws and take its step; "worker":
    # torch's random stream on each worker, so the masks depend on how the batch is split.
    dropout_rng: str = field(default="sample", metadata=_choices("sample", "worker"))
    # "reference": conv1a, b2* and every BatchNorm frozen (psa/OC-CSE, needs pretrained weights);
    # "none": everything trains (for networks trained from scratch, e.g. on the synthetic set).
    freeze: str = field(default="reference", metadata=_choices("reference", "none"))
    num_workers: int = field(default=1, metadata=_range(1))  # Ray Train workers
    cpus_per_worker: int = field(default=1, metadata=_range(1))
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    bf16: bool = False
    channels_last: bool = False  # NHWC tensors for the network and its inputs (faster convs on GPUs)
    loader_workers: int = field(default=0, metadata=_range(0))
    seed: int = field(default=4242, metadata=_range(0))
    log_every: int = field(default=20, metadata=_range(1))
    max_failures: int = field(default=2, metadata=_range(0))
    val_scales: tuple[float, ...] = (1.0,)  # CAM scales for the per-epoch validation
    val_images: int = field(default=0, metadata=_range(0))  # 0 = the whole validation list
    # Which epoch's weights become model.pth: psa's train_cls keeps the last, OC-CSE the best by val mIoU.
    keep: str = field(default="last", metadata=_choices("last", "best"))


@dataclass(frozen=True)
class TrainCseConfig(TrainCamConfig):
    """The eraser against the frozen ordinary classifier (METHOD.md defaults)."""

    lr: float = field(default=0.01, metadata=_range(0.0))
    batch_size: int = field(default=8, metadata=_range(1))
    crop: int = field(default=384, metadata=_range(16))
    resize_long: tuple[int, int] = (256, 448)
    dropout: tuple[float, float] = (0.3, 0.5)
    head_dropout: float = field(default=0.0, metadata=_range(0.0, 1.0))
    cc_init: float = field(default=0.3, metadata=_range(0.0))
    cc_slope: float = field(default=0.05, metadata=_range(0.0))
    mask_norm: str = field(default="batch", metadata=_choices("batch", "image"))
    init: str = field(default="pretrained", metadata=_choices("pretrained", "classifier"))
    keep: str = field(default="best", metadata=_choices("last", "best"))
    classifier: str = ""  # frozen classifier checkpoint; empty = this run's train_cam result


@dataclass(frozen=True)
class TrainAffConfig(TrainCamConfig):
    """AffinityNet on the confident labels (psa's train_aff recipe); validation: pair precision/recall."""

    epochs: int = field(default=8, metadata=_range(1))
    batch_size: int = field(default=8, metadata=_range(1))
    resize_long: tuple[int, int] = (448, 768)
    # "pretrained": model.pretrained (psa: ImageNet); "classifier"/"eraser": this run's (or the
    # configured) train_cam / train_cse weights, the heads fresh.
    init: str = field(default="pretrained", metadata=_choices("pretrained", "classifier", "eraser"))


@dataclass(frozen=True)
class TrainSegConfig(TrainCamConfig):
    """The segmentation network on pseudo-labels (DeepLab-v2's recipe: poly lr with real momentum,
    the head's x10 / x20 groups, random scale + flip + crop, cross-entropy with 255 ignored)."""

    network: str = "resnet38d"  # cse_ray.models.SEG_VARIANTS: resnet38d (+ CPU variants), resnet101
    aspp_rates: tuple[int, ...] = (6, 12, 18, 24)  # DeepLab-v2's dilations
    # Which pseudo-labels it learns from: "rw" = the random walk's maps of the training images
    # (RUN/rw/), "pseudo" = the pipeline's pseudo_labels/ (CRF or CAM threshold); labels_dir overrides.
    labels: str = field(default="rw", metadata=_choices("rw", "pseudo"))
    labels_dir: str = ""  # a folder of NAME.png label maps (palette or index PNGs, 255 = ignore)
    train_list: str = ""  # images it trains on; empty = data.infer_list (the images with pseudo-labels)
    # "pretrained": model.pretrained (ImageNet); "classifier"/"eraser": this run's train_cam /
    # train_cse backbone (ResNet-38d networks only), the head fresh.
    init: str = field(default="pretrained", metadata=_choices("pretrained", "classifier", "eraser"))
    epochs: int = field(default=20, metadata=_range(1))  # ~21k iterations of batch 10 on train_aug
    batch_size: int = field(default=10, metadata=_range(1))
    lr: float = field(default=2.5e-4, metadata=_range(0.0))
    momentum_mode: str = field(default="fixed", metadata=_choices("faithful", "fixed"))
    crop: int = field(default=321, metadata=_range(16))
    resize_long: tuple[int, int] = (250, 750)  # DeepLab's random scale 0.5-1.5 of VOC's 500 px
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    dropout: tuple[float, float] = (0.0, 0.0)
    head_dropout: float = field(default=0.0, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class PredictConfig:
    """`cse-ray predict` (and the pipeline's seg_miou): the segmentation network on Ray actors."""

    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)  # multi-scale test, scores averaged
    flip: bool = True  # each scale also flipped
    crf: bool = False  # dense CRF (crf.* pairwise settings) on the averaged probabilities, Ray CPU tasks
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=1.0, metadata=_range(0.0))  # used when the cluster has GPUs
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    bf16: bool = False
    channels_last: bool = False
    max_in_flight: int = field(default=8, metadata=_range(1))
    max_restarts: int = field(default=2, metadata=_range(0))


@dataclass(frozen=True)
class InferConfig:
    """Multi-scale CAM inference on a pool of Ray actors."""

    checkpoint: str = ""  # empty = OUT/train_cse/model.pth (the eraser trained with the same --out)
    scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=1.0, metadata=_range(0.0))  # used when the cluster has GPUs
    max_in_flight: int = field(default=8, metadata=_range(1))
    bf16: bool = False
    channels_last: bool = False  # NHWC tensors for the network and its inputs (faster convs on GPUs)
    threshold: float = field(default=-1.0, metadata=_range(-1.0, 1.0))  # -1 = best threshold from eval
    save_seed: bool = False  # also write the reference's .npy dicts
    overlays: int = field(default=0, metadata=_range(0))  # CAM overlay PNGs for the first N images
    max_restarts: int = field(default=2, metadata=_range(0))
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    # Extra Ray resources each CAM actor asks for, e.g. {cam: 0.01} to keep them on the GPU nodes
    # of cluster.yaml (docs/CLUSTER.md); empty on one machine.
    cam_resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF refinement (psa parameters) as Ray CPU tasks."""

    enabled: bool = True
    alphas: tuple[float, ...] = (6.0, 10.0, 24.0)
    pseudo_from: str = field(default="crf", metadata=_choices("crf", "cam"))
    pseudo_alpha: float = field(default=-1.0, metadata=_range(-1.0))  # -1 = best alpha from eval
    iterations: int = field(default=10, metadata=_range(1))
    gauss_sxy: float = field(default=3.0, metadata=_range(0.0, lo_open=True))
    gauss_compat: float = field(default=3.0, metadata=_range(0.0))
    bilateral_sxy: float = field(default=80.0, metadata=_range(0.0, lo_open=True))
    bilateral_srgb: float = field(default=13.0, metadata=_range(0.0, lo_open=True))
    bilateral_compat: float = field(default=10.0, metadata=_range(0.0))
    cpus_per_task: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    # Extra Ray resources each CRF (and pseudo-label) task asks for, e.g. {crf: 0.01} for the CPU
    # nodes of cluster.yaml; empty on one machine.
    resources: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalConfig:
    """Background-threshold search for CAM mIoU (the reference sweeps 0.10..0.39)."""

    threshold_start: float = field(default=DEFAULT_THRESHOLD_RANGE[0], metadata=_range(0.0, 1.0))
    threshold_stop: float = field(default=DEFAULT_THRESHOLD_RANGE[1], metadata=_range(0.0, 1.0))
    threshold_step: float = field(default=DEFAULT_THRESHOLD_RANGE[2], metadata=_range(0.0, 1.0, lo_open=True))


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over train_cse keys (any config key can be searched)."""

    num_samples: int = field(default=4, metadata=_range(1))
    max_concurrent_trials: int = field(default=0, metadata=_range(0))  # 0 = as resources allow
    cpus_per_trial: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_trial: float = field(default=0.0, metadata=_range(0.0))
    scheduler: str = field(default="asha", metadata=_choices("asha", "none"))
    grace_period: int = field(default=1, metadata=_range(1))
    reduction_factor: float = field(default=2.0, metadata=_range(1.0, lo_open=True))
    search_alg: str = field(default="random", metadata=_choices("random", "optuna"))
    seed: int = field(default=0, metadata=_range(0))
    space: dict = field(default_factory=dict)  # dotted key -> {grid|choice|uniform|loguniform: ...}


@dataclass(frozen=True)
class RwConfig:
    """Random-walk refinement (psa's AffinityNet): confident labels, then the walk on Ray actors."""

    # The two CRFs whose maps make AffinityNet's confident labels (psa's la_crf / ha_crf).
    low_alpha: float = field(default=4.0, metadata=_range(0.0, lo_open=True))
    high_alpha: float = field(default=32.0, metadata=_range(0.0, lo_open=True))
    train_list: str = ""  # images that get confident labels; empty = data.train_list
    list: str = ""  # images the walk refines; empty = data.infer_list
    checkpoint: str = ""  # AffinityNet weights; empty = OUT/train_aff/model.pth
    beta: float = field(default=8.0, metadata=_range(0.0, lo_open=True))
    logt: int = field(default=8, metadata=_range(0))  # 2^logt steps
    bg_exponent: float = field(default=16.0, metadata=_range(0.0, lo_open=True))
    # The walk on the image and CAMs resized by this factor (psa: 1), the label brought back: a finer
    # grid than stride 8 for small images.
    scale: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    num_actors: int = field(default=1, metadata=_range(1))
    cpus_per_actor: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    gpus_per_actor: float = field(default=1.0, metadata=_range(0.0))  # used when the cluster has GPUs
    use_gpu: str = field(default="auto", metadata=_choices("auto", "true", "false"))
    max_in_flight: int = field(default=4, metadata=_range(1))
    max_restarts: int = field(default=2, metadata=_range(0))


@dataclass(frozen=True)
class PipelineConfig:
    """What `cse-ray pipeline` runs besides the method's own chain."""

    # Also train the eraser without the erasing loss (w = 0, same classifier, schedule and epochs) and
    # report its CAM mIoU: the gain over it is what erasing adds beyond more training.
    control: bool = False
    # Also refine the eraser's CAMs by psa's random walk: confident labels, train-aff, rw (rw_miou).
    rw: bool = False
    # Also train the segmentation network on the pseudo-labels and predict the validation list (seg_miou).
    seg: bool = False


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train_cam: TrainCamConfig = field(default_factory=TrainCamConfig)
    train_cse: TrainCseConfig = field(default_factory=TrainCseConfig)
    train_aff: TrainAffConfig = field(default_factory=TrainAffConfig)
    train_seg: TrainSegConfig = field(default_factory=TrainSegConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    crf: CrfConfig = field(default_factory=CrfConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    rw: RwConfig = field(default_factory=RwConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


