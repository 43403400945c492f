"""fedaug: federated, privacy-preserving data augmentation and training for sequential recommendation."""

__version__ = "0.1.0"
