"""Overrides that shrink a config's synthetic set and crops so a training run takes seconds (tests only)."""

SMALL_TRAINING = [
    "data.synth.train=16", "data.synth.val=4", "data.synth.size=48",
    "train_cam.crop=48", "train_cam.resize_long=[40,56]",
    "train_cse.crop=48", "train_cse.resize_long=[40,56]",
    "train_cam.log_every=1", "train_cse.log_every=1",
    "train_seg.crop=48", "train_seg.resize_long=[40,56]", "train_seg.log_every=1",
]
