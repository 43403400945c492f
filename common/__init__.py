"""The shared core both sides import, split by concept: ``data`` (behaviour data, files, splits), ``model`` (the
SASRec, its training and evaluation), ``priors`` (the public text prior and DP statistics), ``protocol`` (the
messages on the wire), ``recommend`` (bundles and the Recommender); at the root, settings (``config``), result
records, errors and small helpers.

Nothing here knows about processes or reads files other than its explicit inputs; only ``protocol`` speaks Flower
(its records), and torch loads only under ``model``, ``priors`` and ``recommend`` (tests/test_boundaries.py).
"""
