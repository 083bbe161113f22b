"""Data layer: PASCAL VOC reading/writing, augmentation, torch datasets and the synthetic VOC-style set."""
