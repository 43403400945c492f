"""The recommender model and how it learns: the SASRec with optional catalog features and behaviour / context vectors
(``sasrec``) and how settings build it (``build``), augmentation ops (``augment``), length-bucketed batches
(``batching``), non-private training (``training``), full-ranking evaluation through the ``Scorer`` protocol
(``evaluate``) and its metrics (``metrics``), the torch device (``device``). The one place in common/ where torch
is at home; the DP trainer is the merchant's (client/trainer.py)."""
