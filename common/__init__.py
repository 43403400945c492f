"""Shared core of fedaug: behaviour data, splits, augmentation, the recommender model and its metrics.

Nothing here knows about Flower, processes or files other than its explicit inputs.
"""
