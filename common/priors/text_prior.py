"""The public prior: rank the catalog by text similarity to the user's recent history. No training, no ε.

A user's history is summarised as a recency-weighted sum of its items' unit text vectors (weight ``decay**age``,
age 0 = the last item, over the last ``window`` items); every item is scored by its cosine-like dot product with
that summary. ``decay = 0`` is "more like the last item"; the baseline picks ``decay`` on validation.
"""

from __future__ import annotations

import numpy as np
import torch

from fedaug.common.config import TextSection
from fedaug.common.data import BehaviorData
from fedaug.common.model.batching import pad_right
from fedaug.common.priors.text import catalog_vectors


class TextPrior:
    def __init__(self, vectors: np.ndarray | torch.Tensor, *, decay: float = 0.0, window: int = 50, device="cpu"):
        """``vectors``: unit item text vectors ``[n_items + 1, d]`` (fedaug.common.priors.text.item_vectors)."""
        self.vectors = torch.as_tensor(vectors, dtype=torch.float32, device=device)
        self.decay = decay
        self.window = window

    def summary(self, histories: list[np.ndarray]) -> torch.Tensor:
        """``[B, d]``: each history's recency-weighted sum of text vectors."""
        items, lengths = pad_right([h[-self.window :] for h in histories], self.window)
        items = torch.from_numpy(items).to(self.vectors.device)
        lengths = torch.from_numpy(lengths).to(self.vectors.device)
        age = (lengths.unsqueeze(1) - 1 - torch.arange(items.shape[1], device=items.device)).float()
        weight = torch.where(age >= 0, torch.pow(torch.tensor(self.decay, device=items.device), age.clamp(min=0)),
                             torch.zeros_like(age))
        return (self.vectors[items] * weight.unsqueeze(-1)).sum(1)

    def __call__(self, histories: list[np.ndarray]) -> torch.Tensor:
        return self.summary(histories) @ self.vectors.T


DECAYS = (0.0, 0.25, 0.5, 0.75)
"""The history weightings tried on validation when ``[text] decay = "auto"``."""
PUBLIC_DECAY = 0.25
"""The weighting used where nothing may be chosen on held-out data (the model a private federation hands its
merchants) and ``decay`` is "auto": the one Beauty's validation chose."""


def public_decay(decay: float | str) -> float:
    return PUBLIC_DECAY if decay == "auto" else float(decay)


def public_text_prior(section: TextSection, data: BehaviorData, device, *, required: bool = False) -> TextPrior | None:
    """The public text prior over the catalog's item texts with its public history weighting (nothing chosen on
    held-out data: ``public_decay``); None where the data has no texts, unless ``required`` (then the one-line
    error of fedaug.common.priors.text.catalog_vectors)."""
    if not data.catalog.texts and not required:
        return None
    return TextPrior(catalog_vectors(section, data, device, progress=False), decay=public_decay(section.decay),
                     window=section.window, device=device)


def fit_text_prior(vectors, split, *, decay: float | str = "auto", window: int = 50,
                   device="cpu") -> tuple[TextPrior, list[dict]]:
    """The prior with ``decay`` chosen by validation NDCG@10 (never test) when "auto"; returns the prior and the
    figures of every candidate (``[{"decay": d, "valid_ndcg@10": x}]``, empty when ``decay`` was given)."""
    from fedaug.common.model.evaluate import evaluate

    if decay != "auto":
        return TextPrior(vectors, decay=float(decay), window=window, device=device), []
    tried = []
    for candidate in DECAYS:
        prior = TextPrior(vectors, decay=candidate, window=window, device=device)
        tried.append({"decay": candidate, "valid_ndcg@10": evaluate(prior, split, "valid")["ndcg@10"]})
    best = max(tried, key=lambda row: row["valid_ndcg@10"])["decay"]
    return TextPrior(vectors, decay=best, window=window, device=device), tried
