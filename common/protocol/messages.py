"""The wire protocol between the aggregator and its merchants: every message is a typed record here, with its
encoding into Flower's message content (a RecordDict of ArrayRecord, MetricRecord and ConfigRecord) and its
decoding, which raises ProtocolError naming the message, the record and the key that does not fit. No other
module names a record or a key (tests/test_protocol.py greps for them).

The messages, by Flower message type (instruction → reply):

- ``train``: TrainInstruction (the global arrays and the round's config) → TrainReply (an Update, or a decline);
- ``evaluate``: EvaluateInstruction → EvaluateReply (figures per stage, or withheld by a private merchant);
- ``query.statistics``: StatisticsRequest (the public candidate table) → StatisticsReply (the DP counts);
- ``query.selection``: SelectionRequest (a candidate bundle, the fusion weights) → SelectionReply (DP figures);
- ``query.model``: ModelDelivery (the final bundle) → ModelReceipt (its content hash);
- secure aggregation's four stages (runtime/secagg.py; server/secure.py drives them, client/secure.py answers):
  ``query.secure_setup``: SecureSetup (the release asked for) → SecureKeys (two public keys, the noise the merchant's
  accounting needs in the sum); ``query.secure_share``: SecureShareKeys (the neighbours' public keys) →
  SecureCiphertexts (encrypted key shares); ``query.secure_mask``: SecureMask (the shares addressed to it, the
  sum's noise) → SecureMasked (the masked vector); ``query.secure_unmask``: SecureUnmask (who survived) →
  SecureShares.

A new message adds its message type with ``_wire``, its keys with ``_wire``, and a
frozen dataclass with ``encode() -> RecordDict`` and ``decode(content) -> record``, built from the helpers below.

The train and evaluate instructions are sent by Flower's strategies, which build their content themselves from
the arrays and a config record (``TrainInstruction.config()``): their record names and the round number are
Flower's (``FLOWER_NAMES``). What the server hands its strategy after checking a reply is here too
(``for_strategy``, ``aggregated_figures``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from fedaug.common.protocol.codec import COMPRESSIONS, Encoded, decode, encode

WIRE_NAMES: set[str] = set()
"""Every message type, record name and key this protocol defines (no other module may spell one)."""
FLOWER_NAMES: set[str] = set()
"""Names Flower's strategies fix (their record names, the round number, FedProx's μ, the message types)."""


def _wire(name: str) -> str:
    WIRE_NAMES.add(name)
    return name


def _flower(name: str) -> str:
    FLOWER_NAMES.add(name)
    return name


# Message types. A query's Flower action is the part after "query." (``action``).
TRAIN = _flower(MessageType.TRAIN)
EVALUATE = _flower(MessageType.EVALUATE)
STATISTICS = _wire(f"{MessageType.QUERY}.statistics")
SELECTION = _wire(f"{MessageType.QUERY}.selection")
MODEL = _wire(f"{MessageType.QUERY}.model")
SECURE_SETUP = _wire(f"{MessageType.QUERY}.secure_setup")
SECURE_SHARE = _wire(f"{MessageType.QUERY}.secure_share")
SECURE_MASK = _wire(f"{MessageType.QUERY}.secure_mask")
SECURE_UNMASK = _wire(f"{MessageType.QUERY}.secure_unmask")

# Record names.
ARRAYS = _flower("arrays")
"""Flower's strategies' ``arrayrecord_key``: the global model in an instruction; our replies use it too."""
CONFIG = _flower("config")
"""Flower's strategies' ``configrecord_key``."""
METRICS = _wire("metrics")
DECLINE = _wire("decline")
ENCODING = _wire("encoding")
BUNDLE_FILES = _wire("bundle-files")
RECEIPT = _wire("bundle-receipt")
SECURE = _wire("secure-aggregation")
MASKED = _wire("masked-vector")

# Instruction config keys.
SERVER_ROUND = _flower("server-round")
PROXIMAL_MU = _flower("proximal-mu")
RUN_KEY = _wire("run-key")
ATTEMPT = _wire("round-attempt")
COMPRESSION = _wire("compression")
STAGES = _wire("evaluate-stages")
SHARE = _wire("statistics-share")
SELECTION_SHARE = _wire("selection-share")
MAX_ITEMS = _wire("max-items")
MAX_PAIRS = _wire("max-pairs")
WEIGHTS = _wire("fusion-weights")

# Reply metric keys.
DECLINED = _wire("budget-declined")
EPSILON = _wire("epsilon-spent")
PARTITION = _wire("merchant-partition")
USERS = _wire("user-count")
TRAIN_LOSS = _wire("train-loss")
DELTA = _wire("dp-delta")
NOISE = _wire("noise-multiplier")
SECONDS = _wire("train-seconds")
VIEWS = _wire("augment-views")
REPLAYED = _wire("replayed")
WITHHELD = _wire("evaluation-withheld")
POPULARITY_STD = _wire("popularity-std")
PAIR_STD = _wire("pair-std")

# Other keys: the decline's reason, the update's encoding, the receipt's hash, array names.
REASON = _wire("decline-reason")
CODEC = _wire("codec")
TENSORS = _wire("tensors")
SCALES = _wire("scales")
HASH = _wire("bundle-hash")
NEIGHBOURS = _wire("candidate-neighbours")
FIT_POPULARITY = _wire("fit-popularity")
FIT_PAIRS = _wire("fit-pairs")
SERVE_POPULARITY = _wire("serve-popularity")
SERVE_PAIRS = _wire("serve-pairs")
FIGURES = _wire("selection-figures")
RELEASE = _wire("secure-release")
BITS = _wire("modulus-bits")
THRESHOLD = _wire("shamir-threshold")
MERCHANTS = _wire("secure-merchants")
TOLERATED = _wire("tolerated-dropouts")
NODES = _wire("node-ids")
ENCRYPTION_KEYS = _wire("encryption-keys")
MASK_KEYS = _wire("mask-keys")
CIPHERTEXTS = _wire("ciphertexts")
VARIANCES = _wire("noise-variances")
SHARE_VARIANCES = _wire("share-variances")
ACTIVE = _wire("active-nodes")
DEAD = _wire("dead-nodes")
SHARES = _wire("key-shares")

EVALUATION_STAGES = ("valid", "test")
"""The stages an evaluation reports, each metric sent as ``<stage>-<metric>`` (e.g. valid-ndcg@10)."""


class ProtocolError(ValueError):
    """A message whose content does not fit its record; the text names the message, the record and the key."""


def action(message_type: str) -> str:
    """The action a ClientApp registers a query under (``@app.query(action(STATISTICS))``)."""
    return message_type.removeprefix(f"{MessageType.QUERY}.")


# --- reading records: every failure is a ProtocolError naming where -------------------------------------------------

_MISSING = object()


def _record(content: RecordDict | None, name: str, kind: type, where: str, *, required: bool = True):
    if content is None:
        if required:
            raise ProtocolError(f"{where}: no content")
        return None
    record = content.get(name)
    if record is None:
        if required:
            raise ProtocolError(f"{where}: no {name!r} record")
        return None
    if not isinstance(record, kind):
        raise ProtocolError(f"{where}: the {name!r} record is a {type(record).__name__}, a {kind.__name__} "
                            "was expected")
    return record


def _value(record, key: str, where: str, default):
    if record is None or key not in record:
        if default is _MISSING:
            raise ProtocolError(f"{where}: {key!r} missing")
        return default
    return record[key]


def _number(record, key: str, where: str, default=_MISSING, *, integer: bool = False, finite: bool = True):
    value = _value(record, key, where, default)
    if value is default and default is not _MISSING:
        return value
    wanted = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise ProtocolError(f"{where}: {key!r} is {_kind(value)}, {'an integer' if integer else 'a number'} "
                            "was expected")
    if finite and not math.isfinite(value):
        raise ProtocolError(f"{where}: {key!r} is {value}, a finite number was expected")
    return int(value) if integer else float(value)


def _text(record, key: str, where: str, default=_MISSING) -> str:
    value = _value(record, key, where, default)
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: {key!r} is {_kind(value)}, text was expected")
    return value


def _list(record, key: str, where: str, of: type, default=_MISSING) -> list:
    value = _value(record, key, where, default)
    items = value if isinstance(value, list) else None
    if items is None or any(isinstance(v, bool) or not isinstance(v, of) for v in items):
        name = "numbers" if of is not str else "texts"
        raise ProtocolError(f"{where}: {key!r} is {_kind(value)}, a list of {name} was expected")
    return list(items)


def _flag(record, key: str, where: str) -> bool:
    value = _number(record, key, where, 0, integer=True)
    if value not in (0, 1):
        raise ProtocolError(f"{where}: {key!r} is {value}, 0 or 1 was expected")
    return bool(value)


def _array(arrays: ArrayRecord, key: str, where: str) -> np.ndarray:
    if key not in arrays:
        raise ProtocolError(f"{where}: array {key!r} missing")
    try:
        return arrays[key].numpy()
    except Exception as exc:  # noqa: BLE001  (whatever the bytes are, the sender is at fault)
        raise ProtocolError(f"{where}: array {key!r} cannot be read ({exc.__class__.__name__})") from None


def _files(record: ConfigRecord, where: str) -> dict[str, bytes]:
    files = {}
    for name, data in record.items():
        if not isinstance(data, bytes):
            raise ProtocolError(f"{where}: file {name!r} is {_kind(data)}, bytes were expected")
        files[name] = data
    return files


def _kind(value) -> str:
    return "missing" if value is _MISSING else f"a {type(value).__name__}"


def _epsilon(value: float) -> float:
    """MetricRecord carries finite floats: a non-private merchant's ε (∞) travels as -1."""
    return -1.0 if math.isinf(value) else float(value)


def _read_epsilon(metrics: MetricRecord, where: str, default=_MISSING) -> float:
    value = _number(metrics, EPSILON, where, default)
    if value == -1.0:
        return math.inf
    if value is not None and value < 0:
        raise ProtocolError(f"{where}: {EPSILON!r} is {value}, ε ≥ 0 (or -1: non-private) was expected")
    return value


def _partition(metrics: MetricRecord, where: str) -> int | None:
    return _number(metrics, PARTITION, where, None, integer=True)


def _with_partition(values: dict, partition: int | None) -> dict:
    return values if partition is None else values | {PARTITION: partition}


def _declined(content: RecordDict, metrics: MetricRecord, where: str) -> str | None:
    """The reason a merchant declined (its privacy budget), or None when it did not."""
    if not _flag(metrics, DECLINED, where):
        return None
    record = _record(content, DECLINE, ConfigRecord, where, required=False)
    return _text(record, REASON, where, "declined")


def _decline_content(metrics: dict, reason: str) -> RecordDict:
    return RecordDict({METRICS: MetricRecord(metrics | {DECLINED: 1}), DECLINE: ConfigRecord({REASON: reason})})


def _update_or_decline(reply, release) -> None:
    """A reply carries its release or the reason it declined, never both, never neither."""
    if (release is None) == (reply.decline is None):
        raise ValueError(f"a {type(reply).__name__} carries its release or a decline, not both or neither")


# --- train ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainInstruction:
    """``train``: the global model, and the round's config (the strategy adds the round and FedProx's μ)."""

    arrays: ArrayRecord
    server_round: int = 0
    run_key: str | None = None
    """The federation's run key, stable across the server's restarts (None: the merchant uses Flower's run id)."""
    attempt: int = 1
    compression: str = "none"
    """How the reply's update travels (common/protocol/codec.py)."""
    proximal_mu: float = 0.0

    def config(self) -> ConfigRecord:
        """The config the server hands its strategy's ``configure_train``."""
        values = {ATTEMPT: self.attempt, COMPRESSION: self.compression}
        return ConfigRecord(values if self.run_key is None else values | {RUN_KEY: self.run_key})

    def encode(self) -> RecordDict:
        """The content as the strategy sends it."""
        config = self.config()
        config[SERVER_ROUND] = self.server_round
        config[PROXIMAL_MU] = self.proximal_mu
        return RecordDict({ARRAYS: self.arrays, CONFIG: config})

    @classmethod
    def decode(cls, content: RecordDict) -> TrainInstruction:
        where = "train instruction"
        arrays = _record(content, ARRAYS, ArrayRecord, where)
        config = _record(content, CONFIG, ConfigRecord, where, required=False)
        compression = _text(config, COMPRESSION, where, "none")
        if compression not in COMPRESSIONS:
            raise ProtocolError(f"{where}: {COMPRESSION!r} is {compression!r}, not one of {', '.join(COMPRESSIONS)}")
        run_key = _value(config, RUN_KEY, where, None)
        return cls(arrays=arrays, server_round=_number(config, SERVER_ROUND, where, 0, integer=True),
                   run_key=None if run_key is None else _text(config, RUN_KEY, where),
                   attempt=_number(config, ATTEMPT, where, 1, integer=True), compression=compression,
                   proximal_mu=_number(config, PROXIMAL_MU, where, 0.0))


@dataclass(frozen=True)
class Update:
    """A model update as it travels: the weights, or (compressed) the encoded delta from the global model with the
    codec and its int8 scales (common/protocol/codec.py)."""

    arrays: ArrayRecord
    compression: str = "none"
    scales: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, weights: dict[str, np.ndarray], base: ArrayRecord, compression: str) -> Update:
        """``weights`` (trained from the global ``base``) as ``compression`` sends them."""
        if compression == "none":
            return cls(ArrayRecord({k: Array(v) for k, v in weights.items()}))
        encoded = encode(weights, {k: a.numpy() for k, a in base.items()}, compression)
        return cls(ArrayRecord({k: Array(v) for k, v in encoded.arrays.items()}), compression, dict(encoded.scales))

    @property
    def nbytes(self) -> int:
        """What the update costs on the wire: the serialized arrays plus 4 bytes per scale (both sides count so)."""
        return sum(len(a.data) for a in self.arrays.values()) + 4 * len(self.scales)

    def weights(self, base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights this update stands for, given the global model ``base`` it was trained from; ValueError
        naming the tensor that does not decode."""
        try:
            arrays = {k: a.numpy() for k, a in self.arrays.items()}
        except Exception as exc:  # noqa: BLE001  (a malformed array is the sender's fault)
            raise ValueError(f"compression: the update cannot be read ({exc.__class__.__name__})") from None
        if self.compression == "none":
            return arrays
        return decode(Encoded(self.compression, arrays, dict(self.scales)), dict(base))

    def records(self) -> dict:
        if self.compression == "none":
            return {ARRAYS: self.arrays}
        tensors = sorted(self.scales)
        return {ARRAYS: self.arrays, ENCODING: ConfigRecord({CODEC: self.compression, TENSORS: tensors,
                                                             SCALES: [self.scales[k] for k in tensors]})}

    @classmethod
    def read(cls, content: RecordDict, where: str) -> Update:
        arrays = _record(content, ARRAYS, ArrayRecord, where)
        spec = _record(content, ENCODING, ConfigRecord, where, required=False)
        if spec is None:
            return cls(arrays)
        codec = _text(spec, CODEC, where)
        if codec not in COMPRESSIONS:
            raise ProtocolError(f"{where}: {CODEC!r} is {codec!r}, not one of {', '.join(COMPRESSIONS)}")
        tensors, scales = _list(spec, TENSORS, where, str, []), _list(spec, SCALES, where, int | float, [])
        if len(tensors) != len(scales):
            raise ProtocolError(f"{where}: {TENSORS!r} and {SCALES!r} differ in length")
        return cls(arrays, codec, dict(zip(tensors, map(float, scales), strict=True)))


@dataclass(frozen=True)
class TrainFigures:
    """What a non-private merchant reports about its round (a private one withholds it: outside its ε)."""

    users: int
    train_loss: float
    delta: float
    noise_multiplier: float
    seconds: float
    augment_views: int

    def metrics(self) -> dict:
        return {USERS: self.users, TRAIN_LOSS: self.train_loss, DELTA: self.delta, NOISE: self.noise_multiplier,
                SECONDS: self.seconds, VIEWS: self.augment_views}

    @classmethod
    def read(cls, metrics: MetricRecord, where: str) -> TrainFigures | None:
        if USERS not in metrics:
            return None
        users = _number(metrics, USERS, where, integer=True)
        if users <= 0:
            raise ProtocolError(f"{where}: {USERS!r} is {users}, a positive count was expected")
        def reported(key: str) -> float:  # figures for the record: passed on as the merchant computed them
            return _number(metrics, key, where, finite=False)

        return cls(users=users, train_loss=reported(TRAIN_LOSS), delta=reported(DELTA),
                   noise_multiplier=reported(NOISE), seconds=reported(SECONDS),
                   augment_views=_number(metrics, VIEWS, where, integer=True))


@dataclass(frozen=True)
class TrainReply:
    """``train``'s reply: the update, or the reason the merchant declined (the round would pass its budget)."""

    epsilon: float
    """The merchant's ε spent so far, this round included (∞: non-private)."""
    partition: int | None = None
    """Its partition in a simulation (the server orders replies by it), else None."""
    update: Update | None = None
    decline: str | None = None
    figures: TrainFigures | None = None
    replayed: bool = False
    """The update is the one released before for this very round (resent: no ε spent)."""

    def __post_init__(self):
        _update_or_decline(self, self.update)

    def encode(self) -> RecordDict:
        metrics = _with_partition({EPSILON: _epsilon(self.epsilon)}, self.partition)
        if self.decline is not None:
            return _decline_content(metrics, self.decline)
        metrics[DECLINED] = 0
        if self.figures is not None:
            metrics |= self.figures.metrics()
        if self.replayed:
            metrics[REPLAYED] = 1
        return RecordDict(self.update.records() | {METRICS: MetricRecord(metrics)})

    @classmethod
    def decode(cls, content: RecordDict) -> TrainReply:
        where = "train reply"
        metrics = _record(content, METRICS, MetricRecord, where)
        epsilon, partition = _read_epsilon(metrics, where), _partition(metrics, where)
        decline = _declined(content, metrics, where)
        if decline is not None:
            return cls(epsilon=epsilon, partition=partition, decline=decline)
        return cls(epsilon=epsilon, partition=partition, update=Update.read(content, where),
                   figures=TrainFigures.read(metrics, where), replayed=_flag(metrics, REPLAYED, where))


# --- evaluate -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluateInstruction:
    """``evaluate``: the global model and the stages to score it on."""

    arrays: ArrayRecord
    server_round: int = 0
    run_key: str = ""
    stages: tuple[str, ...] = EVALUATION_STAGES

    def config(self) -> ConfigRecord:
        """The config the server hands its strategy's ``configure_evaluate``."""
        return ConfigRecord({RUN_KEY: self.run_key, STAGES: list(self.stages)})

    def encode(self) -> RecordDict:
        config = self.config()
        config[SERVER_ROUND] = self.server_round
        return RecordDict({ARRAYS: self.arrays, CONFIG: config})

    @classmethod
    def decode(cls, content: RecordDict) -> EvaluateInstruction:
        where = "evaluate instruction"
        arrays = _record(content, ARRAYS, ArrayRecord, where)
        config = _record(content, CONFIG, ConfigRecord, where, required=False)
        stages = tuple(_list(config, STAGES, where, str, list(EVALUATION_STAGES)))
        unknown = [s for s in stages if s not in EVALUATION_STAGES]
        if unknown:
            raise ProtocolError(f"{where}: {STAGES!r} names {unknown[0]!r}, not one of {', '.join(EVALUATION_STAGES)}")
        return cls(arrays=arrays, server_round=_number(config, SERVER_ROUND, where, 0, integer=True),
                   run_key=_text(config, RUN_KEY, where, ""), stages=stages)


def _flat(figures: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{stage}-{name}": value for stage, values in figures.items() for name, value in values.items()}


def aggregated_figures(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Figures per stage from flat ``<stage>-<metric>`` keys (an evaluation reply's, or a strategy's aggregate of
    them); other keys are left out."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, name = key.partition("-")
        if stage in EVALUATION_STAGES and name:
            out.setdefault(stage, {})[name] = value
    return out


@dataclass(frozen=True)
class EvaluateReply:
    """``evaluate``'s reply: the merchant's figures per stage over its held-out users, or withheld (a private
    merchant: metrics over its users are outside its accounted ε)."""

    partition: int | None = None
    users: int = 0
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    """stage -> metric -> value."""
    withheld: bool = False

    def encode(self) -> RecordDict:
        if self.withheld:
            return RecordDict({METRICS: MetricRecord(_with_partition({WITHHELD: 1}, self.partition))})
        values = _flat(self.figures) | {USERS: self.users}
        return RecordDict({METRICS: MetricRecord(_with_partition(values, self.partition))})

    def flat(self) -> dict[str, float]:
        """The figures as the strategy averages them (``<stage>-<metric>``)."""
        return _flat(self.figures)

    @classmethod
    def decode(cls, content: RecordDict) -> EvaluateReply:
        where = "evaluate reply"
        metrics = _record(content, METRICS, MetricRecord, where)
        partition = _partition(metrics, where)
        if _flag(metrics, WITHHELD, where):
            return cls(partition=partition, withheld=True)
        users = _number(metrics, USERS, where, integer=True)
        if users <= 0:
            raise ProtocolError(f"{where}: {USERS!r} is {users}, a positive count was expected")
        figures = aggregated_figures({key: _number(metrics, key, where) for key in metrics
                                      if key.partition("-")[0] in EVALUATION_STAGES})
        return cls(partition=partition, users=users, figures=figures)


def for_strategy(metrics: Mapping[str, float], arrays: ArrayRecord | None = None) -> RecordDict:
    """A checked reply as the server hands it to its strategy: the (decoded) arrays and the metrics it weighs and
    averages (server/replies.py, server/strategies.py)."""
    records = {METRICS: MetricRecord(dict(metrics))}
    return RecordDict(records if arrays is None else {ARRAYS: arrays} | records)


def strategy_arrays(content: RecordDict) -> ArrayRecord:
    """The arrays of a reply handed to a strategy (``for_strategy``)."""
    return _record(content, ARRAYS, ArrayRecord, "checked reply")


def set_strategy_arrays(content: RecordDict, arrays: ArrayRecord) -> None:
    """Replace the arrays of a reply handed to a strategy (the server's norm bound clips them)."""
    content[ARRAYS] = arrays


# --- the DP collaborative statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatisticsRequest:
    """``query.statistics``: release DP counts over the public candidate table ``neighbours`` ([n_items + 1, k])
    at ``share`` of the budget left, reserving ``selection_share`` for the run's federated DP evaluation first."""

    run_key: str
    neighbours: np.ndarray
    share: float
    max_items: int
    max_pairs: int
    selection_share: float = 0.0

    def encode(self) -> RecordDict:
        return RecordDict({ARRAYS: ArrayRecord({NEIGHBOURS: Array(self.neighbours)}),
                           CONFIG: ConfigRecord({RUN_KEY: self.run_key, SHARE: self.share,
                                                 SELECTION_SHARE: self.selection_share, MAX_ITEMS: self.max_items,
                                                 MAX_PAIRS: self.max_pairs})})

    @classmethod
    def decode(cls, content: RecordDict) -> StatisticsRequest:
        where = "statistics request"
        arrays = _record(content, ARRAYS, ArrayRecord, where)
        config = _record(content, CONFIG, ConfigRecord, where)
        return cls(run_key=_text(config, RUN_KEY, where), neighbours=_array(arrays, NEIGHBOURS, where),
                   share=_number(config, SHARE, where), max_items=_number(config, MAX_ITEMS, where, integer=True),
                   max_pairs=_number(config, MAX_PAIRS, where, integer=True),
                   selection_share=_number(config, SELECTION_SHARE, where, 0.0))


@dataclass(frozen=True)
class StatisticsReply:
    """``query.statistics``'s reply: noised popularity and pair counts over the users' training histories (fit)
    and over the histories test sees (serve), with the noise std of each kind; or a decline."""

    epsilon: float = math.inf
    partition: int | None = None
    fit_popularity: np.ndarray | None = None
    fit_pairs: np.ndarray | None = None
    serve_popularity: np.ndarray | None = None
    serve_pairs: np.ndarray | None = None
    popularity_std: float = 0.0
    pair_std: float = 0.0
    decline: str | None = None

    def __post_init__(self):
        _update_or_decline(self, self.fit_popularity)

    def _arrays(self) -> dict[str, np.ndarray | None]:
        return {FIT_POPULARITY: self.fit_popularity, FIT_PAIRS: self.fit_pairs,
                SERVE_POPULARITY: self.serve_popularity, SERVE_PAIRS: self.serve_pairs}

    def encode(self) -> RecordDict:
        if self.decline is not None:
            return _decline_content({}, self.decline)
        metrics = _with_partition({DECLINED: 0, POPULARITY_STD: self.popularity_std, PAIR_STD: self.pair_std,
                                   EPSILON: _epsilon(self.epsilon)}, self.partition)
        arrays = {key: Array(np.asarray(values, np.float32)) for key, values in self._arrays().items()}
        return RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})

    @classmethod
    def decode(cls, content: RecordDict) -> StatisticsReply:
        where = "statistics reply"
        metrics = _record(content, METRICS, MetricRecord, where)
        decline = _declined(content, metrics, where)
        if decline is not None:
            return cls(decline=decline)
        arrays = _record(content, ARRAYS, ArrayRecord, where)
        stds = [_number(metrics, key, where) for key in (POPULARITY_STD, PAIR_STD)]
        if min(stds) < 0:
            raise ProtocolError(f"{where}: a negative noise std")
        read = {key: _array(arrays, key, where) for key in (FIT_POPULARITY, FIT_PAIRS, SERVE_POPULARITY,
                                                            SERVE_PAIRS)}
        return cls(epsilon=_read_epsilon(metrics, where, -1.0), partition=_partition(metrics, where),
                   fit_popularity=read[FIT_POPULARITY], fit_pairs=read[FIT_PAIRS],
                   serve_popularity=read[SERVE_POPULARITY], serve_pairs=read[SERVE_PAIRS],
                   popularity_std=stds[0], pair_std=stds[1])


# --- the federated DP evaluation (selection) ------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionRequest:
    """``query.selection``: score the candidate model (a bundle's files) at the public fusion ``weights``."""

    run_key: str
    weights: tuple[float, ...]
    bundle: dict[str, bytes]

    def encode(self) -> RecordDict:
        return RecordDict({BUNDLE_FILES: ConfigRecord(dict(self.bundle)),
                           CONFIG: ConfigRecord({RUN_KEY: self.run_key, WEIGHTS: [float(w) for w in self.weights]})})

    @classmethod
    def decode(cls, content: RecordDict) -> SelectionRequest:
        where = "selection request"
        config = _record(content, CONFIG, ConfigRecord, where)
        files = _files(_record(content, BUNDLE_FILES, ConfigRecord, where), where)
        weights = tuple(float(w) for w in _list(config, WEIGHTS, where, int | float))
        if any(math.isnan(w) for w in weights):
            raise ProtocolError(f"{where}: {WEIGHTS!r} holds NaN")
        return cls(run_key=_text(config, RUN_KEY, where), weights=weights, bundle=files)


@dataclass(frozen=True)
class SelectionReply:
    """``query.selection``'s reply: the noised summed figures (common/priors/fusion_weights.py) and the noise
    multiplier of their Gaussian release; or a decline."""

    epsilon: float = math.inf
    partition: int | None = None
    figures: np.ndarray | None = None
    noise_multiplier: float = 0.0
    decline: str | None = None

    def __post_init__(self):
        _update_or_decline(self, self.figures)

    def encode(self) -> RecordDict:
        metrics = _with_partition({EPSILON: _epsilon(self.epsilon)} if self.decline is None else {}, self.partition)
        if self.decline is not None:
            return _decline_content(metrics, self.decline)
        return RecordDict({ARRAYS: ArrayRecord({FIGURES: Array(np.asarray(self.figures))}),
                           METRICS: MetricRecord(metrics | {DECLINED: 0, NOISE: self.noise_multiplier})})

    @classmethod
    def decode(cls, content: RecordDict) -> SelectionReply:
        where = "selection reply"
        metrics = _record(content, METRICS, MetricRecord, where)
        partition = _partition(metrics, where)
        decline = _declined(content, metrics, where)
        if decline is not None:
            return cls(partition=partition, decline=decline)
        noise = _number(metrics, NOISE, where)
        if noise < 0:
            raise ProtocolError(f"{where}: {NOISE!r} is {noise}, ≥ 0 was expected")
        figures = _array(_record(content, ARRAYS, ArrayRecord, where), FIGURES, where)
        return cls(epsilon=_read_epsilon(metrics, where, -1.0), partition=partition, figures=figures,
                   noise_multiplier=noise)


# --- secure aggregation (runtime/secagg.py) ------------------------------------------------------------------------

SECURED = {"statistics": StatisticsRequest, "selection": SelectionRequest}
"""The releases a secure sum can carry, by name: the request each merchant answers with its vector."""


def _pairs(mapping: Mapping[int, bytes], ids: str, values: str) -> dict:
    """``{node: bytes}`` as two config lists (a ConfigRecord's keys are text)."""
    nodes = sorted(mapping)
    return {ids: [int(n) for n in nodes], values: [bytes(mapping[n]) for n in nodes]}


def _read_pairs(record, ids: str, values: str, where: str) -> dict[int, bytes]:
    nodes, data = _list(record, ids, where, int), _list(record, values, where, bytes)
    if len(nodes) != len(data) or len(set(nodes)) != len(nodes):
        raise ProtocolError(f"{where}: {ids!r} and {values!r} do not pair up one to one")
    return dict(zip(nodes, data, strict=True))


def _variances(record, key: str, where: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in _list(record, key, where, int | float))
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ProtocolError(f"{where}: {key!r} holds a negative or non-finite variance")
    return values


def _request(content: RecordDict, config: ConfigRecord, where: str):
    release = _text(config, RELEASE, where)
    if release not in SECURED:
        raise ProtocolError(f"{where}: {RELEASE!r} is {release!r}, one of {sorted(SECURED)} was expected")
    return SECURED[release].decode(content)


def _with_request(request, secure: dict) -> RecordDict:
    release = next(name for name, kind in SECURED.items() if isinstance(request, kind))
    content = request.encode()
    content[SECURE] = ConfigRecord(secure | {RELEASE: release})
    return content


@dataclass(frozen=True)
class SecureSetup:
    """``query.secure_setup``: take part in a secure sum of ``request``'s release — make two key pairs (Shamir
    ``threshold``, vectors mod 2**``bits``) and say what noise the merchant's accounting needs in the sum."""

    request: StatisticsRequest | SelectionRequest
    threshold: int
    bits: int

    def encode(self) -> RecordDict:
        return _with_request(self.request, {THRESHOLD: self.threshold, BITS: self.bits})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureSetup:
        where = "secure setup"
        config = _record(content, SECURE, ConfigRecord, where)
        threshold, bits = _number(config, THRESHOLD, where, integer=True), _number(config, BITS, where, integer=True)
        if threshold < 2 or not 8 <= bits <= 62:
            raise ProtocolError(f"{where}: threshold {threshold} (≥ 2) or modulus bits {bits} (8–62) out of range")
        return cls(request=_request(content, config, where), threshold=threshold, bits=bits)


@dataclass(frozen=True)
class SecureKeys:
    """``query.secure_setup``'s reply: the merchant's public keys (encryption, masking) and the noise variance
    per part of the vector that its ledger needs the sum to carry (0: non-private); or a decline."""

    encryption_key: bytes = b""
    mask_key: bytes = b""
    variances: tuple[float, ...] = ()
    partition: int | None = None
    decline: str | None = None

    def __post_init__(self):
        _update_or_decline(self, self.encryption_key or None)

    def encode(self) -> RecordDict:
        if self.decline is not None:
            return _decline_content(_with_partition({}, self.partition), self.decline)
        return RecordDict({METRICS: MetricRecord(_with_partition({DECLINED: 0}, self.partition)),
                           SECURE: ConfigRecord({ENCRYPTION_KEYS: [self.encryption_key], MASK_KEYS: [self.mask_key],
                                                 VARIANCES: [float(v) for v in self.variances]})})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureKeys:
        where = "secure keys"
        metrics = _record(content, METRICS, MetricRecord, where)
        partition = _partition(metrics, where)
        decline = _declined(content, metrics, where)
        if decline is not None:
            return cls(partition=partition, decline=decline)
        config = _record(content, SECURE, ConfigRecord, where)
        keys = [_list(config, key, where, bytes) for key in (ENCRYPTION_KEYS, MASK_KEYS)]
        if any(len(k) != 1 or not k[0] for k in keys):
            raise ProtocolError(f"{where}: one non-empty key of each kind was expected")
        return cls(encryption_key=keys[0][0], mask_key=keys[1][0], variances=_variances(config, VARIANCES, where),
                   partition=partition)


@dataclass(frozen=True)
class SecureShareKeys:
    """``query.secure_share``: the public keys (encryption, masking) of the merchant's neighbours."""

    run_key: str
    keys: dict[int, tuple[bytes, bytes]]

    def encode(self) -> RecordDict:
        nodes = sorted(self.keys)
        return RecordDict({SECURE: ConfigRecord({RUN_KEY: self.run_key, NODES: [int(n) for n in nodes],
                                                 ENCRYPTION_KEYS: [self.keys[n][0] for n in nodes],
                                                 MASK_KEYS: [self.keys[n][1] for n in nodes]})})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureShareKeys:
        where = "secure share keys"
        config = _record(content, SECURE, ConfigRecord, where)
        encryption = _read_pairs(config, NODES, ENCRYPTION_KEYS, where)
        masking = _read_pairs(config, NODES, MASK_KEYS, where)
        return cls(run_key=_text(config, RUN_KEY, where),
                   keys={n: (encryption[n], masking[n]) for n in encryption})


@dataclass(frozen=True)
class _ByNode:
    """A reply of one byte string per node (a SecAgg+ stage's ciphertexts or key shares)."""

    by_node: dict[int, bytes]
    decline: None = None
    KEY: ClassVar[str] = ""
    WHERE: ClassVar[str] = ""

    def encode(self) -> RecordDict:
        return RecordDict({SECURE: ConfigRecord(_pairs(self.by_node, NODES, self.KEY))})

    @classmethod
    def decode(cls, content: RecordDict):
        return cls(_read_pairs(_record(content, SECURE, ConfigRecord, cls.WHERE), NODES, cls.KEY, cls.WHERE))


@dataclass(frozen=True)
class SecureCiphertexts(_ByNode):
    """``query.secure_share``'s reply: the merchant's key shares, each encrypted for its destination node."""

    KEY: ClassVar[str] = CIPHERTEXTS
    WHERE: ClassVar[str] = "secure ciphertexts"


@dataclass(frozen=True)
class SecureMask:
    """``query.secure_mask``: the key shares addressed to the merchant ({source: ciphertext}), and the noise the
    sum is to carry: ``variances`` per part, shared among ``merchants`` of whom at most ``tolerated`` drop out
    or collude; the merchant answers ``request`` with its vector, noised with its share and masked."""

    request: StatisticsRequest | SelectionRequest
    ciphertexts: dict[int, bytes]
    variances: tuple[float, ...]
    merchants: int
    tolerated: int

    def encode(self) -> RecordDict:
        return _with_request(self.request, _pairs(self.ciphertexts, NODES, CIPHERTEXTS) | {
            VARIANCES: [float(v) for v in self.variances], MERCHANTS: self.merchants, TOLERATED: self.tolerated})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureMask:
        where = "secure mask"
        config = _record(content, SECURE, ConfigRecord, where)
        merchants = _number(config, MERCHANTS, where, integer=True)
        tolerated = _number(config, TOLERATED, where, integer=True)
        if not 0 <= tolerated < merchants:
            raise ProtocolError(f"{where}: {tolerated} tolerated dropouts of {merchants} merchants")
        return cls(request=_request(content, config, where),
                   ciphertexts=_read_pairs(config, NODES, CIPHERTEXTS, where),
                   variances=_variances(config, VARIANCES, where), merchants=merchants, tolerated=tolerated)


@dataclass(frozen=True)
class SecureMasked:
    """``query.secure_mask``'s reply: the masked vector (values mod 2**bits; sent as uint32 where they fit), the
    noise variance per part this merchant added, and its ε after the release; or a decline."""

    vector: np.ndarray | None = None
    share_variances: tuple[float, ...] = ()
    epsilon: float = math.inf
    partition: int | None = None
    decline: str | None = None

    def __post_init__(self):
        _update_or_decline(self, self.vector)

    def encode(self) -> RecordDict:
        metrics = _with_partition({EPSILON: _epsilon(self.epsilon)} if self.decline is None else {}, self.partition)
        if self.decline is not None:
            return _decline_content(metrics, self.decline)
        vector = np.asarray(self.vector)
        narrow = np.uint32 if vector.size == 0 or int(vector.max()) < 2**32 else np.uint64  # 32-bit sums: 4 bytes
        return RecordDict({ARRAYS: ArrayRecord({MASKED: Array(vector.astype(narrow))}),
                           METRICS: MetricRecord(metrics | {DECLINED: 0}),
                           SECURE: ConfigRecord({SHARE_VARIANCES: [float(v) for v in self.share_variances]})})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureMasked:
        where = "secure masked"
        metrics = _record(content, METRICS, MetricRecord, where)
        partition = _partition(metrics, where)
        decline = _declined(content, metrics, where)
        if decline is not None:
            return cls(partition=partition, decline=decline)
        vector = _array(_record(content, ARRAYS, ArrayRecord, where), MASKED, where)
        if vector.dtype not in (np.uint32, np.uint64) or vector.ndim != 1:
            raise ProtocolError(f"{where}: the masked vector is {vector.dtype} of shape {vector.shape}, a flat "
                                "uint32 or uint64 vector was expected")
        return cls(vector=vector.astype(np.int64), epsilon=_read_epsilon(metrics, where, -1.0), partition=partition,
                   share_variances=_variances(_record(content, SECURE, ConfigRecord, where), SHARE_VARIANCES, where))


@dataclass(frozen=True)
class SecureUnmask:
    """``query.secure_unmask``: which of the merchant's neighbours sent a masked vector (``active``: send their
    mask-seed shares) and which did not (``dead``: send their masking-key shares)."""

    run_key: str
    active: tuple[int, ...]
    dead: tuple[int, ...]

    def encode(self) -> RecordDict:
        return RecordDict({SECURE: ConfigRecord({RUN_KEY: self.run_key, ACTIVE: [int(n) for n in self.active],
                                                 DEAD: [int(n) for n in self.dead]})})

    @classmethod
    def decode(cls, content: RecordDict) -> SecureUnmask:
        where = "secure unmask"
        config = _record(content, SECURE, ConfigRecord, where)
        return cls(run_key=_text(config, RUN_KEY, where), active=tuple(_list(config, ACTIVE, where, int)),
                   dead=tuple(_list(config, DEAD, where, int)))


@dataclass(frozen=True)
class SecureShares(_ByNode):
    """``query.secure_unmask``'s reply: the requested key shares, by the node they belong to."""

    KEY: ClassVar[str] = SHARES
    WHERE: ClassVar[str] = "secure shares"


# --- the final model ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDelivery:
    """``query.model``: the federation's final model bundle (its files by name)."""

    bundle: dict[str, bytes]

    def encode(self) -> RecordDict:
        return RecordDict({BUNDLE_FILES: ConfigRecord(dict(self.bundle))})

    @classmethod
    def decode(cls, content: RecordDict) -> ModelDelivery:
        where = "model delivery"
        return cls(_files(_record(content, BUNDLE_FILES, ConfigRecord, where), where))


@dataclass(frozen=True)
class ModelReceipt:
    """``query.model``'s reply: the content hash of the bundle the merchant stored."""

    bundle_hash: str

    def encode(self) -> RecordDict:
        return RecordDict({RECEIPT: ConfigRecord({HASH: self.bundle_hash})})

    @classmethod
    def decode(cls, content: RecordDict) -> ModelReceipt:
        where = "model receipt"
        return cls(_text(_record(content, RECEIPT, ConfigRecord, where), HASH, where))


REPLIES = {TRAIN: TrainReply, EVALUATE: EvaluateReply, STATISTICS: StatisticsReply, SELECTION: SelectionReply,
           MODEL: ModelReceipt, SECURE_SETUP: SecureKeys, SECURE_SHARE: SecureCiphertexts, SECURE_MASK: SecureMasked,
           SECURE_UNMASK: SecureShares}
"""Message type -> its reply's record."""
INSTRUCTIONS = {TRAIN: TrainInstruction, EVALUATE: EvaluateInstruction, STATISTICS: StatisticsRequest,
                SELECTION: SelectionRequest, MODEL: ModelDelivery, SECURE_SETUP: SecureSetup,
                SECURE_SHARE: SecureShareKeys, SECURE_MASK: SecureMask, SECURE_UNMASK: SecureUnmask}
"""Message type -> its instruction's record."""
