"""SASRec-class next-item recommender, in one readable file.

Causal self-attention over a user's item sequence (Kang & McAuley, 2018) trained with a full-softmax cross-entropy
over all items (or sampled negatives for very large catalogs). Built so Opacus can clip per *user*:

- Sequences are right-padded, so causal attention alone keeps real positions from seeing padding (no key mask) and
  every padded position only produces outputs that the loss ignores.
- Attention is ``nn.Linear`` + ``F.scaled_dot_product_attention``; every module is called once per forward and no
  weights are shared between the input and output item tables (ghost clipping refuses tying).
- Every parametrised layer sees ``[users, positions, ...]``: dim 0 is always the user. Only the non-private path may
  flatten target positions before the output layer (``per_user=False``), which skips padded positions entirely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "sampled")


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    max_len: int = 50
    ffn_mult: int = 1
    """Feed-forward width as a multiple of hidden (SASRec: 1)."""
    dropout: float = 0.5
    loss: str = "ce"
    """'ce': softmax over all items; 'sampled': softmax over the target and ``negatives`` uniform negatives."""
    negatives: int = 128
    tie_embeddings: bool = False
    """Share the input item table with the output layer (a strong regulariser on sparse data). Non-private
    training only: Opacus' ghost clipping refuses tied weights, so DP models keep them apart."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing: spreads a little probability over all items."""

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        assert cfg.hidden % cfg.heads == 0, "hidden must be divisible by heads"
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, view_len: int) -> torch.Tensor:
        # x is [B, views * T, D]: Opacus' ghost norms for nn.Linear need 3-D inputs with the user first, so a
        # user's views sit side by side along the position axis and only attention itself splits them apart.
        B, KT, D = x.shape
        K, hd = KT // view_len, D // self.heads
        q, k, v = (t.view(B, K, view_len, self.heads, hd).transpose(2, 3) for t in self.qkv(x).split(D, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(2, 3).reshape(B, KT, D))


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a point-wise feed-forward layer."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.ff_in = nn.Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden)
        self.ff_out = nn.Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, view_len: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), view_len))
        return x + self.drop(self.ff_out(self.drop(F.gelu(self.ff_in(self.ln2(x))))))


class ItemScores(nn.Linear):
    """The output layer: one score per item. Its own type so the DP side can give it a cheaper per-user norm
    (client/ghost_norms.py); numerically a plain ``nn.Linear``."""


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        # The output item table is separate from the input one: ghost clipping cannot handle tied weights.
        if cfg.loss == "ce":
            self.out = ItemScores(cfg.hidden, cfg.n_items + 1)
        else:
            self.out = nn.Embedding(cfg.n_items + 1, cfg.hidden)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.out.weight = self.item_emb.weight  # non-private only: Opacus cannot clip shared weights

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden states for right-padded item ids ``[B, T]`` or ``[B, views, T]`` (T <= max_len).

        Returns ``[B, views * T, D]`` (views = 1 for 2-D input): one user's views side by side, each attending
        only to itself, so the user stays dim 0 of every parametrised layer's input.
        """
        if items.dim() == 2:
            items = items.unsqueeze(1)
        B, K, T = items.shape
        positions = torch.arange(T, device=items.device).repeat(K).expand(B, K * T).contiguous()
        x = self.item_emb(items.reshape(B, K * T)) * math.sqrt(self.cfg.hidden) + self.pos_emb(positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, T)
        return self.ln_f(x)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits ``[B, views * T, n_items + 1]`` at every position ('ce' models): the Opacus-facing
        path, paired with ``PerUserCrossEntropy`` as the criterion."""
        if self.cfg.loss != "ce":
            raise RuntimeError("full logits need loss='ce'; sampled models train through SASRec.loss")
        return self.out(self.encode(items))

    def loss(self, items: torch.Tensor, targets: torch.Tensor, per_user: bool = False) -> torch.Tensor:
        """Next-item cross-entropy. ``targets`` has the shape of ``items`` with 0 where a position has no target.

        ``per_user=False``: mean over all target positions (non-private training; logits only at targets).
        ``per_user=True``: a ``[B]`` vector, each user's mean over all their targets (every view) — the sample
        DP-SGD clips.
        """
        hidden = self.encode(items)
        targets = targets.reshape(hidden.shape[:2])  # [B, views * T], aligned with hidden
        mask = targets > 0
        if not per_user:
            hidden, targets = hidden[mask], targets[mask]  # [N, D], [N]: only positions with a target
        if self.cfg.loss == "ce":
            logits = self.out(hidden)
            labels = targets
        else:
            logits, labels = self._sampled_logits(hidden, targets)
        smoothing = self.cfg.label_smoothing
        if not per_user:
            return smoothed_cross_entropy(logits, labels, smoothing).mean()
        return per_user_cross_entropy(logits, labels, mask, smoothing)

    def _sampled_logits(self, hidden: torch.Tensor, targets: torch.Tensor):
        """Logits over [target, k shared uniform negatives]; a negative equal to the target is masked out."""
        k = self.cfg.negatives
        negatives = torch.randint(1, self.cfg.n_items + 1, (k,), device=targets.device)
        candidates = torch.cat([targets.unsqueeze(-1), negatives.expand(*targets.shape, k)], dim=-1).contiguous()
        logits = (hidden.unsqueeze(-2) * self.out(candidates)).sum(-1)
        accidental = candidates == targets.unsqueeze(-1)
        accidental[..., 0] = False
        return logits.masked_fill(accidental, float("-inf")), torch.zeros_like(targets)

    @torch.no_grad()
    def score(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, n_items + 1]`` for every user's next item, from the state at their last real position."""
        hidden = self.encode(items)
        last = hidden[torch.arange(len(items), device=items.device), lengths - 1]
        if self.cfg.loss == "ce":
            return self.out(last)
        return last @ self.out.weight.T


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Row-wise label-smoothed cross-entropy ``[N, C] -> [N]`` with a one-pass backward.

    Same value as ``F.cross_entropy(..., reduction='none', label_smoothing=s)``; the backward writes
    ``softmax - target distribution`` straight into one ``[N, C]`` tensor instead of summing the NLL and smoothing
    branches. The output layer's [N, 12k] softmax is the biggest cost of training, twice over under ghost clipping.
    """

    generate_vmap_rule = True  # torch.func (the DP tests' per-sample reference) can vmap through it

    @staticmethod
    def forward(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        target = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return lse - (1 - smoothing) * target - smoothing * logits.mean(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, smoothing = inputs
        ctx.save_for_backward(logits, labels)
        ctx.smoothing = smoothing
        ctx.dlogits = None

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.dlogits is None:  # kept for a second backward: ghost clipping backpropagates this graph twice
            logits, labels = ctx.saved_tensors
            dlogits = torch.softmax(logits, dim=-1)
            dlogits.sub_(ctx.smoothing / logits.shape[-1])
            dlogits.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(labels.unsqueeze(-1), ctx.smoothing - 1,
                                                                          dtype=dlogits.dtype))
            ctx.dlogits = dlogits
        return ctx.dlogits * grad.unsqueeze(-1), None, None


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy ``[N, C], [N] -> [N]``."""
    return _SmoothedCrossEntropy.apply(logits, labels, label_smoothing)


def per_user_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Each user's mean cross-entropy over all their target positions: ``[B, ..., C]`` logits -> ``[B]``."""
    losses = smoothed_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing)
    losses = losses.view(labels.shape) * mask
    return losses.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


class PerUserCrossEntropy(nn.Module):
    """Criterion for Opacus: logits ``[B, views * T, V+1]`` and targets ``[B, T]`` or ``[B, views, T]``
    (0 = no target) -> one loss per user.

    Opacus' ghost clipping sets ``reduction='none'`` to get the per-sample losses it clips; with 'mean' or 'sum'
    it reduces over users. A user's views and positions all sit inside that user's one sample.
    """

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = per_user_cross_entropy(logits, targets, targets > 0, self.label_smoothing)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()
