"""Shared core of fedaug: behaviour data and the public catalog, splits, augmentation, the recommender model,
batching, metrics, configuration and result records.

Nothing here knows about Flower or processes, or reads files other than its explicit inputs.
"""
