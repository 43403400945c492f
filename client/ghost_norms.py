"""Per-user gradient norms and clipped sums for user-level DP-SGD.

``BookKeeping`` is the DP step's clipping (PrivateStep in ghost mode): book-keeping (Bu et al., "Differentially
private optimization on large model at small cost", ICML 2023), which differentiates the model once. Forward hooks
keep every trainable layer's input A and output; one ``autograd.grad`` of the summed per-user losses gives every
layer's output gradient G; each layer's per-user gradient norm follows from (A, G), and once the clipping factors
c are known its clipped sum Σ_u c_u ∇_u is one weight-gradient product, Gᵀ (c·A) for a linear layer. Ghost
clipping's second backward pass through the whole model disappears.

A linear layer's per-user norm, for a user with positions t (weight gradient Σ_t g_t a_tᵀ), is the ghost norm
‖∇W‖² = Σ_{t,s} (g_t·g_s)(a_t·a_s) from two [users, T, T] products; a bias is one more input column of ones. The
output layer runs on target positions only, packed user after user (``packed``), so its 12k-wide products skip the
padding; users with equal row counts share one batched product. An embedding's norm is Σ_{t,s: id_t = id_s}
g_t·g_s. Any other layer (LayerNorm) uses Opacus' per-user gradient sampler. (Materialising each user's [out, in]
gradient of the output layer, as fastDP does for long sequences, measured slower on CPU at every Beauty
micro-batch shape: batched products over few positions run far below one large product.)

Importing the module also registers the output layer (``ItemScores``) with Opacus: the shared g·gᵀ norm for
Opacus' own ghost mode and Opacus' Linear per-sample gradient for hooks mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from torch import nn

from fedaug.common.model.sasrec import ItemScores

register_grad_sampler(ItemScores)(compute_linear_grad_sample)


@register_norm_sampler(ItemScores)
def item_scores_norm_sample(layer: ItemScores, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Opacus' ghost norm for the output layer with one g·gᵀ ([users, T, T] over all 12k item scores) shared by
    weight and bias, where Opacus' Linear norm computes it once per parameter."""
    a, g = _per_user(activations[0].to(backprops.dtype)), _per_user(backprops)
    ggT = torch.bmm(g, g.transpose(1, 2))
    norms = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = (ggT * torch.bmm(a, a.transpose(1, 2))).sum((1, 2)).clamp(min=0).sqrt()
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = ggT.sum((1, 2)).clamp(min=0).sqrt()
    return norms


def _per_user(t: torch.Tensor) -> torch.Tensor:
    """``[users, ..., width]`` as ``[users, positions, width]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class BookKeeping:
    """Per-user clipping of ``model``'s gradient to ``max_grad_norm`` by book-keeping (module docstring).

    Run the forward inside ``recording()``, then ``backward(losses)`` with the ``[users]`` losses: it adds the
    micro-batch's clipped per-user gradient sum to every trainable parameter's ``.grad``. The factors are Opacus'
    (``max_grad_norm / (norm + 1e-6)``, at most 1). Each trainable layer must run once per forward (no tied weights).
    Layers see ``[users, ...]`` inputs, except linear layers run inside ``packed(counts)``, which see one row per
    position, user after user.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm
        layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        for layer in layers:
            if not isinstance(layer, (nn.Linear, nn.Embedding)) and type(layer) not in GradSampleModule.GRAD_SAMPLERS:
                raise ValueError(f"no per-user gradient for layer {type(layer).__name__}")
            if isinstance(layer, nn.Embedding) and (layer.sparse or layer.scale_grad_by_freq or layer.max_norm):
                raise ValueError("per-user clipping needs plain dense embeddings")
        self._records: list[tuple[nn.Module, torch.Tensor, np.ndarray | None]] = []  # (layer, input, packing)
        self._outputs: list[torch.Tensor] = []
        self._recording = False
        self._counts: np.ndarray | None = None
        self._handles = [layer.register_forward_hook(self._record) for layer in layers]

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return
        if any(seen is layer for seen, *_ in self._records):
            raise ValueError(f"{type(layer).__name__} ran twice in one forward: per-user clipping needs untied layers")
        if self._counts is not None and not isinstance(layer, nn.Linear):
            raise ValueError(f"{type(layer).__name__} cannot take packed rows")
        self._records.append((layer, inputs[0].detach(), self._counts))
        self._outputs.append(output)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep every trainable layer's input and output during this forward."""
        self._records, self._outputs = [], []
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    @contextmanager
    def packed(self, counts: np.ndarray) -> Iterator[None]:
        """Linear layers run inside see packed rows: ``counts[u]`` rows of user u, users in order."""
        self._counts = counts
        try:
            yield
        finally:
            self._counts = None

    def backward(self, losses: torch.Tensor) -> None:
        """Add the sum over users of each user's gradient of ``losses[user]``, clipped, to the parameters' grads."""
        records, outputs = self._records, self._outputs
        self._records, self._outputs = [], []
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True, materialize_grads=True)
        del outputs  # the item scores go now, not after the norms
        squared, adders = torch.zeros_like(losses), []
        for (layer, a, counts), g in zip(records, grads, strict=True):
            layer_squared, add = self._layer(layer, a, g, counts)
            squared += layer_squared
            adders.append(add)
        factors = (self.max_grad_norm / (squared.clamp(min=0).sqrt() + 1e-6)).clamp(max=1.0).detach()
        for add in adders:
            add(factors)

    @staticmethod
    def _layer(layer: nn.Module, a: torch.Tensor, g: torch.Tensor,
               counts: np.ndarray | None) -> tuple[torch.Tensor, Callable]:
        """The layer's per-user squared gradient norm ``[users]``, and a function of the clipping factors that adds
        its clipped sum to its parameters' grads."""
        if isinstance(layer, nn.Linear):
            if counts is None:  # [users, ..., width]: every user has the same number of rows
                users = len(a)
                a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
                counts = np.full(users, len(a) // max(users, 1))
            return _linear(layer, a.to(g.dtype), g, counts)
        if isinstance(layer, nn.Embedding):
            if layer.padding_idx is not None:  # its row gets no gradient
                g = g * (a != layer.padding_idx).unsqueeze(-1)

            def add_embedding(factors: torch.Tensor) -> None:
                scaled = (g * factors.view(-1, *[1] * (g.dim() - 1))).reshape(-1, g.shape[-1])
                if layer.weight.grad is None:
                    layer.weight.grad = torch.zeros_like(layer.weight)
                layer.weight.grad.index_add_(0, a.reshape(-1), scaled)

            # ‖Σ_t onehot(id_t) g_tᵀ‖² = Σ_{t,s: id_t = id_s} g_t·g_s (Opacus' torch.unique over (user, id) pairs
            # costs more than the whole step's noise on CPU)
            ids, g_users = a.reshape(len(a), -1), _per_user(g)
            same = ids.unsqueeze(2) == ids.unsqueeze(1)
            return (torch.bmm(g_users, g_users.transpose(1, 2)) * same).sum((1, 2)), add_embedding
        per_user = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [a], g)

        def add_per_user(factors: torch.Tensor) -> None:
            for param, grads in per_user.items():
                _accumulate(param, torch.einsum("b...,b->...", grads, factors))

        return sum(grads.flatten(1).square().sum(1) for grads in per_user.values()), add_per_user


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, counts: np.ndarray) -> tuple[torch.Tensor, Callable]:
    """``BookKeeping._layer`` for a linear layer with input rows ``a`` [rows, in] and output gradient rows ``g``
    [rows, out], ``counts[u]`` rows per user. A bias is a weight column whose input is 1, so ``a`` gains a column of
    ones: one g·gᵀ and one product serve both."""
    weight = layer.weight.requires_grad
    bias = layer.bias is not None and layer.bias.requires_grad
    a = torch.cat([a if weight else a[:, :0], torch.ones_like(a[:, :1])], 1) if bias else a
    squared = torch.zeros(len(counts), dtype=g.dtype, device=g.device)
    if weight or bias:
        user, row = 0, 0
        for n, run in _runs(counts):  # users of equal row counts side by side are one batched product
            if n:
                g_run, a_run = g[row : row + run * n].view(run, n, -1), a[row : row + run * n].view(run, n, -1)
                squared[user : user + run] = (torch.bmm(g_run, g_run.transpose(1, 2))
                                              * torch.bmm(a_run, a_run.transpose(1, 2))).sum((1, 2))
            user, row = user + run, row + run * n

    def add_linear(factors: torch.Tensor) -> None:
        if not (weight or bias):
            return
        rows = factors.repeat_interleave(torch.as_tensor(counts, device=factors.device))
        summed = g.T @ (a * rows.unsqueeze(1))  # Σ_u c_u Σ_t g_t a_tᵀ: scale the narrow side
        if weight:
            _accumulate(layer.weight, summed[:, : layer.in_features])
        if bias:
            _accumulate(layer.bias, summed[:, -1])

    return squared, add_linear


def _runs(counts: np.ndarray) -> list[tuple[int, int]]:
    """(rows each, users) of every run of consecutive users with the same row count."""
    if len(counts) == 0:
        return []
    edges = np.flatnonzero(np.diff(counts)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(counts)]])
    return [(int(counts[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad.contiguous()
    else:
        param.grad.add_(grad)
