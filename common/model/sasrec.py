"""SASRec-class next-item recommender, in one readable file.

Causal self-attention over a user's item sequence (Kang & McAuley, 2018) trained with a full-softmax cross-entropy
over all items (or sampled negatives for very large catalogs). Built so Opacus can clip per *user*:

- Sequences are right-padded, so causal attention alone keeps real positions from seeing padding (no key mask) and
  every padded position only produces outputs that the loss ignores.
- Attention is ``nn.Linear`` + ``F.scaled_dot_product_attention``; every module is called once per forward and no
  weights are shared between the input and output item tables (ghost clipping refuses tying).
- Every parametrised layer sees ``[users, positions, ...]``: dim 0 is always the user. Only the non-private path may
  flatten target positions before the output layer (``per_user=False``), which skips padded positions entirely.

Item representations: a learned per-item table (``item_dim`` wide, by default ``hidden``) and/or the public catalog
(``n_attributes`` > 0): an item's input vector is the mean of its attribute embeddings, and its output score adds
the mean of per-attribute scores. Catalog attributes are not user data, and a catalog model has far fewer trainable
item parameters (637 Beauty attributes against 12,101 items), so DP noise falls on far fewer coordinates.

Side vectors (common/data/features.py): a behaviour vector (the event type's embedding) and a context vector (embeddings
of the gap, hour and weekday codes plus a projection of numeric context columns) are added to each position's item
input. Code 0 means unknown and adds nothing, so data without event types or timestamps trains as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedaug.common.config import LOSSES, ModelSection
from fedaug.common.data.features import CODE_SIZES, CONTEXT_CODES, FEATURE_CODES, N_CODES


@dataclass(frozen=True)
class SASRecConfig:
    """The model's shape, as built: [model] (fedaug.common.config.ModelSection, where every default is) resolved
    for one data set (``from_section``); bundles store it as JSON."""

    n_items: int
    hidden: int
    blocks: int
    heads: int
    max_len: int
    ffn_mult: int
    """Feed-forward width as a multiple of hidden (SASRec: 1)."""
    dropout: float
    loss: str
    """'ce': softmax over all items; 'sampled': softmax over the target and ``negatives`` uniform negatives."""
    negatives: int
    item_dim: int | None
    """Width of the learned per-item tables (None: hidden; 0: no per-item parameters, catalog attributes only)."""
    n_attributes: int
    """Catalog attribute vocabulary (ids 1..n); 0 = no catalog features. Needs ``item_attributes`` at build."""
    tie_embeddings: bool
    """Share the input item table with the output layer (a strong regulariser on sparse data). Non-private
    training only: Opacus' ghost clipping refuses tied weights, so DP models keep them apart."""
    label_smoothing: float
    """Cross-entropy label smoothing: spreads a little probability over all items."""
    behaviour: bool
    """Add a behaviour vector (the event type's learned embedding) to each position's input."""
    time_context: bool
    """Add a context vector from the time of the moment predicted for: gap since the last event, hour, weekday."""
    context_columns: tuple[str, ...]
    """Numeric context columns of the data projected into the context vector."""
    target_weights: tuple[float, ...] | None
    """Training objective: weight of a next-item target by its behaviour code (0 = unknown type, then 1 +
    EVENT_TYPES index); 0 = not a target. None: every target weighs 1."""

    @classmethod
    def from_section(cls, section: ModelSection, n_items: int, n_attributes: int = 0) -> SASRecConfig:
        """[model] for a catalog of ``n_items`` items (and ``n_attributes`` catalog attributes)."""
        return cls(n_items=n_items, n_attributes=n_attributes, target_weights=section.target_weights.by_code(),
                   **section.model_dump(exclude={"kind", "catalog", "target_weights"}))

    def __post_init__(self):  # JSON (bundles) gives lists
        object.__setattr__(self, "context_columns", tuple(self.context_columns))
        if self.target_weights is not None:
            object.__setattr__(self, "target_weights", tuple(self.target_weights))

    @property
    def side_vectors(self) -> bool:
        """Does the model read per-event side features (``side`` inputs)?"""
        return self.behaviour or self.time_context or bool(self.context_columns)

    @property
    def side_features(self) -> bool:
        """Does training need per-event side features (side vectors, or targets weighted by type)?"""
        return self.side_vectors or self.target_weights is not None

    @property
    def id_dim(self) -> int:
        return self.hidden if self.item_dim is None else self.item_dim


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
    def __init__(self, cfg: SASRecConfig, item_attributes: torch.Tensor | None = None):
        """``item_attributes``: ``[n_items + 1, max attributes]`` attribute ids per item (0 = none), for catalog
        models (``cfg.n_attributes`` > 0)."""
        super().__init__()
        if cfg.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}")
        if cfg.id_dim == 0 and not cfg.n_attributes:
            raise ValueError("a model without per-item tables (item_dim 0) needs catalog attributes")
        if cfg.n_attributes and cfg.loss != "ce":
            raise ValueError("catalog models need loss='ce'")
        if cfg.tie_embeddings and (cfg.id_dim != cfg.hidden or cfg.n_attributes):
            raise ValueError("tie_embeddings needs item_dim == hidden and no catalog attributes")
        self.cfg = cfg
        self.attribute_noise = 0.0
        """σ of Gaussian noise on attribute vectors while training (the augmentation's vector noise)."""
        self.behaviour_noise = 0.0
        """σ of Gaussian noise on behaviour vectors while training."""
        self.context_noise = 0.0
        """σ of Gaussian noise on context vectors while training."""
        if cfg.id_dim:
            self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.id_dim)
            # Narrow item tables are projected to and from the model width.
            self.item_up = nn.Linear(cfg.id_dim, cfg.hidden, bias=False) if cfg.id_dim < cfg.hidden else None
            self.item_down = nn.Linear(cfg.hidden, cfg.id_dim, bias=False) if cfg.id_dim < cfg.hidden else None
            # The output item table is separate from the input one: ghost clipping cannot handle tied weights.
            if cfg.loss == "ce":
                self.out = ItemScores(cfg.id_dim, cfg.n_items + 1)
            else:
                self.out = nn.Embedding(cfg.n_items + 1, cfg.id_dim)
        if cfg.n_attributes:
            self._register_catalog(item_attributes)
            # No padding_idx: Opacus' per-user norms would count its (discarded) gradient; empty slots are
            # masked out instead.
            self.attr_emb = nn.Embedding(cfg.n_attributes + 1, cfg.hidden)
            self.attr_scores = nn.Linear(cfg.hidden, cfg.n_attributes + 1, bias=False)
        if cfg.behaviour:
            self.behaviour_emb = nn.Embedding(CODE_SIZES["behaviour"], cfg.hidden)
        if cfg.time_context:
            # One table for the three time codes, each code shifted to its own rows: one call per forward.
            sizes = [CODE_SIZES[FEATURE_CODES[c]] for c in CONTEXT_CODES]
            self.register_buffer("context_offsets", torch.tensor([0, *sizes[:-1]]).cumsum(0), persistent=False)
            self.context_emb = nn.Embedding(sum(sizes), cfg.hidden)
        if cfg.context_columns:
            self.context_proj = nn.Linear(len(cfg.context_columns), cfg.hidden, bias=False)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.out.weight = self.item_emb.weight  # non-private only: Opacus cannot clip shared weights

    def _register_catalog(self, item_attributes: torch.Tensor | None) -> None:
        """Public catalog structure as non-persistent buffers: every party builds them from the same catalog, so
        they never travel with the weights."""
        cfg = self.cfg
        if item_attributes is None or item_attributes.shape[0] != cfg.n_items + 1:
            raise ValueError(f"a catalog model needs item_attributes with {cfg.n_items + 1} rows")
        if int(item_attributes.max()) > cfg.n_attributes or int(item_attributes.min()) < 0:
            raise ValueError(f"item_attributes must hold attribute ids in 0..{cfg.n_attributes}")
        item_attributes = item_attributes.long()
        counts = (item_attributes > 0).sum(1, keepdim=True).clamp(min=1)
        self.register_buffer("item_attributes", item_attributes, persistent=False)
        self.register_buffer("attribute_weight", 1.0 / counts.float(), persistent=False)
        # [items, attributes] with 1 / count per (item, attribute): an item's score is the mean of its attributes'.
        rows, cols = torch.nonzero(item_attributes > 0, as_tuple=True)
        values = self.attribute_weight[rows, 0]
        catalog = torch.sparse_coo_tensor(torch.stack([rows, item_attributes[rows, cols]]), values,
                                          (cfg.n_items + 1, cfg.n_attributes + 1), check_invariants=True).coalesce()
        self.register_buffer("catalog", catalog, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, items: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states for right-padded item ids ``[B, T]`` or ``[B, views, T]`` (T <= max_len).

        ``side``: the positions' side-feature rows ``[..., F]`` (fedaug.common.data.features.input_rows), for models
        with side vectors; None = all unknown. Returns ``[B, views * T, D]`` (views = 1 for 2-D input): one user's views
        side by side, each attending only to itself, so the user stays dim 0 of every parametrised layer's input.
        """
        if items.dim() == 2:
            items = items.unsqueeze(1)
        B, K, T = items.shape
        positions = torch.arange(T, device=items.device).repeat(K).expand(B, K * T).contiguous()
        x = self._item_vectors(items.reshape(B, K * T)) * math.sqrt(self.cfg.hidden) + self.pos_emb(positions)
        if self.cfg.side_vectors:
            x = x + self._side_vectors(side, B, K * T)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, T)
        return self.ln_f(x)

    def _item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Input vectors ``[B, P, D]`` of item ids ``[B, P]``: learned table and/or mean attribute embedding."""
        x = 0
        if self.cfg.id_dim:
            x = self.item_emb(items)
            if self.item_up is not None:
                x = self.item_up(x)
        if self.cfg.n_attributes:
            ids = self.item_attributes[items]  # [B, P, A]: the user stays dim 0
            attributes = self.attr_emb(ids)
            if self.training and self.attribute_noise > 0:
                attributes = attributes + self.attribute_noise * torch.randn_like(attributes)  # a^aug = a + Δ
            attributes = attributes * (ids > 0).unsqueeze(-1)  # empty slots add nothing
            x = x + attributes.sum(-2) * self.attribute_weight[items]
        return x

    def _side_vectors(self, side: torch.Tensor | None, B: int, P: int) -> torch.Tensor:
        """Behaviour + context vectors ``[B, P, D]`` of side rows ``[B, ..., F]`` (unknown codes add nothing)."""
        cfg = self.cfg
        width = N_CODES + len(cfg.context_columns)
        if side is None:  # unknown everywhere; the layers still run, so every parameter has a (zero) gradient
            side = torch.zeros(B, P, width, device=self.pos_emb.weight.device)
        side = side.reshape(B, P, -1)[..., :width]
        x = 0
        if cfg.behaviour:
            codes = side[..., 0].long()
            behaviour = self.behaviour_emb(codes)
            if self.training and self.behaviour_noise > 0:
                behaviour = behaviour + self.behaviour_noise * torch.randn_like(behaviour)  # b^aug = b + Δ
            x = x + behaviour * (codes > 0).unsqueeze(-1)
        context = 0
        if cfg.time_context:
            codes = side[..., list(CONTEXT_CODES)].long()  # [B, P, 3]: the user stays dim 0
            vectors = self.context_emb(codes + self.context_offsets) * (codes > 0).unsqueeze(-1)
            context = vectors.sum(-2)
        if cfg.context_columns:
            context = context + self.context_proj(side[..., N_CODES:])
        if self.training and self.context_noise > 0 and (cfg.time_context or cfg.context_columns):
            context = context + self.context_noise * torch.randn_like(context)  # c^aug = c + Δ
        return x + context

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over all items ``[..., n_items + 1]`` for hidden states ``[..., D]`` ('ce' models)."""
        logits = 0
        if self.cfg.id_dim:
            logits = self.out(self.item_down(hidden) if self.item_down is not None else hidden)
        if self.cfg.n_attributes:
            per_attribute = self.attr_scores(hidden)  # a Linear on [users, positions, D]: per-user clipping holds
            flat = per_attribute.reshape(-1, per_attribute.shape[-1])
            scores = torch.sparse.mm(self.catalog, flat.T).T  # mean over each item's attributes, no parameters
            logits = logits + scores.reshape(*per_attribute.shape[:-1], -1)
        return logits

    def forward(self, items: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item logits ``[B, views * T, n_items + 1]`` at every position ('ce' models): the Opacus-facing
        path, paired with ``PerUserCrossEntropy`` as the criterion."""
        if self.cfg.loss != "ce":
            raise RuntimeError("full logits need loss='ce'; sampled models train through SASRec.loss")
        return self.item_logits(self.encode(items, side))

    def loss(self, items: torch.Tensor, targets: torch.Tensor, per_user: bool = False,
             hidden: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item cross-entropy. ``targets`` has the shape of ``items`` with 0 where a position has no target.

        ``per_user=False``: mean over all target positions (non-private training; logits only at targets).
        ``per_user=True``: a ``[B]`` vector, each user's mean over all their targets (every view) — the sample
        DP-SGD clips. ``hidden``: ``encode(items)`` when the caller already has it. ``weights`` (the shape of
        ``targets``): each target's weight in those means (by its event type); None = 1.
        """
        hidden = self.encode(items) if hidden is None else hidden
        targets = targets.reshape(hidden.shape[:2])  # [B, views * T], aligned with hidden
        mask = targets > 0
        if weights is not None:
            weights = weights.reshape(targets.shape)
        if not per_user:
            hidden, targets = hidden[mask], targets[mask]  # [N, D], [N]: only positions with a target
            weights = None if weights is None else weights[mask]
        if self.cfg.loss == "ce":
            logits = self.item_logits(hidden)
            labels = targets
        else:
            logits, labels = self._sampled_logits(hidden, targets)
        smoothing = self.cfg.label_smoothing
        if not per_user:
            losses = smoothed_cross_entropy(logits, labels, smoothing)
            return (losses if weights is None else losses * weights).mean()
        return per_user_cross_entropy(logits, labels, mask, smoothing, weights)

    def contrastive_loss(self, hidden: torch.Tensor, view_lengths: torch.Tensor, positives: int,
                         temperature: float) -> torch.Tensor:
        """InfoNCE inside each user's sample ``[B]``: the last state of view 0 against those of its augmented views
        1..positives (positives) and of the remaining views (negatives: random public item chains).

        Every term is computed from one user's own views, so per-user clipping still bounds each user's
        influence; in-batch negatives (other users' sequences) would couple users and break it.
        """
        B, KT, D = hidden.shape
        K = view_lengths.shape[1]
        T = KT // K
        last = torch.arange(K, device=hidden.device) * T + (view_lengths - 1).clamp(min=0)  # [B, K]
        z = F.normalize(hidden.gather(1, last.unsqueeze(-1).expand(B, K, D)), dim=-1)
        similarity = (z[:, :1] * z[:, 1:]).sum(-1) / temperature  # [B, K - 1]
        pos, neg = similarity[:, :positives], similarity[:, positives:]
        logits = torch.cat([pos.unsqueeze(-1), neg.unsqueeze(1).expand(B, positives, neg.shape[1])], dim=-1)
        return (torch.logsumexp(logits, dim=-1) - pos).mean(1)

    def _sampled_logits(self, hidden: torch.Tensor, targets: torch.Tensor):
        """Logits over [target, k shared uniform negatives]; a negative equal to the target is masked out."""
        k = self.cfg.negatives
        negatives = torch.randint(1, self.cfg.n_items + 1, (k,), device=targets.device)
        candidates = torch.cat([targets.unsqueeze(-1), negatives.expand(*targets.shape, k)], dim=-1).contiguous()
        if self.item_down is not None:
            hidden = self.item_down(hidden)
        logits = (hidden.unsqueeze(-2) * self.out(candidates)).sum(-1)
        accidental = candidates == targets.unsqueeze(-1)
        accidental[..., 0] = False
        return logits.masked_fill(accidental, float("-inf")), torch.zeros_like(targets)

    @torch.no_grad()
    def score(self, items: torch.Tensor, lengths: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Scores ``[B, n_items + 1]`` for every user's next item, from the state at their last real position."""
        hidden = self.encode(items, side)
        last = hidden[torch.arange(len(items), device=items.device), lengths - 1]
        if self.cfg.loss == "ce":
            return self.item_logits(last)
        return (self.item_down(last) if self.item_down is not None else last) @ self.out.weight.T


class _SmoothedCrossEntropy(torch.autograd.Function):
    """Row-wise label-smoothed cross-entropy ``[N, C] -> [N]`` with a one-pass backward.

    Same value as ``F.cross_entropy(..., reduction='none', label_smoothing=s)``; the backward writes
    ``softmax - target distribution`` straight into one ``[N, C]`` tensor instead of summing the NLL and smoothing
    branches. The output layer's [N, 12k] softmax is one of the biggest costs of training.
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

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels = ctx.saved_tensors
        out = torch.softmax(logits, dim=-1)
        out.sub_(ctx.smoothing / logits.shape[-1])
        out.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(labels.unsqueeze(-1), ctx.smoothing - 1,
                                                                   dtype=out.dtype))
        return out.mul_(grad.unsqueeze(-1)), None, None


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-row cross-entropy ``[N, C], [N] -> [N]``."""
    return _SmoothedCrossEntropy.apply(logits, labels, label_smoothing)


def per_user_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           label_smoothing: float = 0.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each user's mean cross-entropy over all their target positions: ``[B, ..., C]`` logits -> ``[B]``; each
    position weighted by ``weights`` (the shape of ``labels``) where given."""
    losses = smoothed_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing)
    losses = losses.view(labels.shape) * (mask if weights is None else weights.view(labels.shape) * mask)
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

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
        losses = per_user_cross_entropy(logits, targets, targets > 0, self.label_smoothing, weights)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()
