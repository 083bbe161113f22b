"""Data layer: what a run reads, and the synthetic set it can write.

    names         image names and list files (the safe-name rule, plain and psa list formats)
    image_labels  multi-hot image-level labels per LabelSpace and their files (cls_labels.npy, .json)
    voc           the PASCAL VOC (+ SBD) layout: paths, the up-front image check, labels from XML/masks,
                  `write_lists`
    coco          the MS-COCO 2014 layout: categories, reading instances, the semantic-mask convention
    coco_convert  `cse-ray data coco`: COCO 2014 -> a VOC-layout dataset (masks on Ray tasks, resumable)
    prepare       a config's dataset: its root (generated when synthetic) and each stage's Split
    transforms    augmentation and resizing on uint8/float32 numpy images
    datasets      torch datasets: augmented training crops, plain images for inference
    synth         the embedded synthetic dataset in the VOC layout, or the COCO layout (`synth.coco`)
"""
