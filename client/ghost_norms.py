"""Per-user gradient norms for the output layer under Opacus ghost clipping, with one g·gᵀ instead of two.

For a user with positions t, the layer's weight gradient is Σ_t g_t a_tᵀ and its bias gradient Σ_t g_t, so
  ‖∇W‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s)   and   ‖∇b‖² = Σ_{t,s} g_t·g_s.
Opacus' Linear norm computes the [users, T, T] matrix g·gᵀ over all 12k item scores once per parameter; this one
shares it. Importing the module registers it (and Opacus' own Linear per-sample gradient for hooks mode).
"""

from __future__ import annotations

import torch
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

from fedaug.common.model.sasrec import ItemScores

register_grad_sampler(ItemScores)(compute_linear_grad_sample)


@register_norm_sampler(ItemScores)
def item_scores_norm_sample(layer: ItemScores, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    a = activations[0].to(backprops.dtype)
    if backprops.dim() == 2:  # [users, scores]: one position per user
        backprops, a = backprops.unsqueeze(1), a.unsqueeze(1)
    ggT = torch.bmm(backprops, backprops.transpose(1, 2))  # [users, T, T]
    norms = {}
    if layer.weight.requires_grad:
        aaT = torch.bmm(a, a.transpose(1, 2))
        norms[layer.weight] = (ggT * aaT).sum((1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = ggT.sum((1, 2)).clamp(min=0).sqrt()
    return norms
