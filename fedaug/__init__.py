"""fedaug: federated, privacy-preserving data augmentation and training for sequential recommendation."""

__version__ = "0.1.0"
__all__ = ["Activity", "Recommender", "Recommendation"]


def __getattr__(name: str):
    # Lazy, so the command line starts without importing torch.
    if name in __all__:
        from fedaug.common.recommend import recommender

        return getattr(recommender, name)
    raise AttributeError(f"module 'fedaug' has no attribute {name!r}")
