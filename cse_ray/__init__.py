"""cse-ray: OC-CSE (class-specific adversarial erasing) for weakly supervised segmentation on Ray."""

__version__ = "0.1.0"
