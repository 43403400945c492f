"""The wire protocol (common/protocol/messages.py): every record survives its own encoding, every decoder answers
arbitrary content with a record or one ProtocolError, the names Flower fixes are Flower's, and no production module
outside the protocol spells a wire name."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedProx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedaug.common.protocol import messages
from fedaug.common.protocol.messages import (
    ARRAYS,
    CONFIG,
    EVALUATE,
    FLOWER_NAMES,
    INSTRUCTIONS,
    REPLIES,
    TRAIN,
    WIRE_NAMES,
    EvaluateInstruction,
    EvaluateReply,
    ModelDelivery,
    ModelReceipt,
    ProtocolError,
    SecureCiphertexts,
    SecureKeys,
    SecureMask,
    SecureMasked,
    SecureSetup,
    SecureShareKeys,
    SecureShares,
    SecureUnmask,
    SelectionReply,
    SelectionRequest,
    StatisticsReply,
    StatisticsRequest,
    TrainFigures,
    TrainInstruction,
    TrainReply,
    Update,
    action,
    aggregated_figures,
)
from tests.support import OfflineGrid

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("common", "client", "server", "runtime", "serving", "simulations", "fedaug")
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

BASE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "b": np.zeros(3, np.float32),
        "steps": np.array([2], np.int64)}
TRAINED = {"w": BASE["w"] + 0.25, "b": BASE["b"] - 0.5, "steps": np.array([3], np.int64)}
FIGURES = TrainFigures(users=40, train_loss=1.5, delta=1e-3, noise_multiplier=0.0, seconds=2.5, augment_views=1)


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in values.items()})


def _examples() -> list:
    """One of every record, in each of its shapes (declined, withheld, compressed, private, non-private)."""
    base = _arrays(BASE)
    counts = np.arange(5, dtype=np.float32)
    request = StatisticsRequest(run_key="run-1", neighbours=np.arange(12).reshape(4, 3), share=0.25, max_items=20,
                                max_pairs=50, selection_share=0.1)
    return [
        TrainInstruction(base, server_round=3, run_key="run-1", attempt=2, compression="int8", proximal_mu=0.1),
        TrainInstruction(base),
        TrainReply(epsilon=2.5, partition=3, update=Update.of(TRAINED, base, "none")),
        TrainReply(epsilon=math.inf, update=Update.of(TRAINED, base, "int8"), figures=FIGURES, replayed=True),
        TrainReply(epsilon=math.inf, partition=0, update=Update.of(TRAINED, base, "fp16"), figures=FIGURES),
        TrainReply(epsilon=8.0, partition=1, decline="round 4 would spend 8.2 of 8.0"),
        EvaluateInstruction(base, server_round=2, run_key="run-1", stages=("valid",)),
        EvaluateReply(partition=2, users=40, figures={"valid": {"ndcg@10": 0.25, "hr@10": 0.5},
                                                      "test": {"ndcg@10": 0.125, "hr@10": 0.25}}),
        EvaluateReply(partition=2, withheld=True),
        StatisticsRequest(run_key="run-1", neighbours=np.arange(12).reshape(4, 3), share=0.25, max_items=20,
                          max_pairs=50, selection_share=0.1),
        StatisticsReply(epsilon=1.5, partition=4, fit_popularity=counts, fit_pairs=np.ones((5, 3), np.float32),
                        serve_popularity=counts + 1, serve_pairs=np.zeros((5, 3), np.float32), popularity_std=2.0,
                        pair_std=3.0),
        StatisticsReply(decline="no budget left"),
        SelectionRequest(run_key="run-1", weights=(0.5, 2.0, math.inf), bundle={"card.json": b"{}", "w": b"\0\1"}),
        SelectionReply(epsilon=4.0, partition=1, figures=np.array([1.0, -2.0, 3.5]), noise_multiplier=7.5),
        SelectionReply(partition=1, decline="run run-1: no selection release was reserved"),
        ModelDelivery({"card.json": b'{"kind": "fused"}', "weights.safetensors": bytes(range(256))}),
        ModelReceipt("ab12" * 16),
        SecureSetup(request=request, threshold=3, bits=32),
        SecureKeys(encryption_key=b"pk-1", mask_key=b"pk-2", variances=(12.5, 0.0), partition=2),
        SecureKeys(partition=2, decline="no budget left"),
        SecureShareKeys(run_key="run-1", keys={7: (b"e7", b"m7"), 9: (b"e9", b"m9")}),
        SecureCiphertexts({7: b"c7", 9: b"c9"}),
        SecureCiphertexts({}),
        SecureMask(request=request, ciphertexts={7: b"c7"}, variances=(40.0, 10.0), merchants=5, tolerated=1),
        SecureMasked(vector=np.array([0, 5, 2**32 - 1], np.int64), share_variances=(10.0, 2.5), epsilon=7.5,
                     partition=3),
        SecureMasked(vector=np.array([2**40, 1], np.int64), share_variances=(0.0,), epsilon=math.inf),
        SecureMasked(partition=3, decline="round would spend ε=8.2, past the budget ε=8"),
        SecureUnmask(run_key="run-1", active=(7, 9), dead=(11,)),
        SecureShares({7: b"s7", 11: b"s11"}),
    ]


def _canonical(content: RecordDict) -> dict:
    """A RecordDict as plain values (arrays by dtype, shape and bytes), for comparing two encodings."""
    out = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: (a.numpy().dtype.str, a.numpy().shape, a.numpy().tobytes()) for k, a in record.items()}
        else:
            out[name] = (type(record).__name__, dict(record))
    return out


@pytest.mark.parametrize("record", _examples(), ids=lambda r: type(r).__name__)
def test_every_record_survives_its_encoding(record):
    content = record.encode()
    decoded = type(record).decode(content)
    assert type(decoded) is type(record)
    assert _canonical(decoded.encode()) == _canonical(content)
    for name in ("epsilon", "partition", "decline", "figures", "replayed", "withheld", "users", "run_key",
                 "server_round", "stages", "weights", "bundle", "bundle_hash", "compression", "attempt"):
        if hasattr(record, name) and not isinstance(getattr(record, name), np.ndarray):
            assert getattr(decoded, name) == getattr(record, name), name


def test_every_message_type_has_its_records_and_a_handler():
    from fedaug.client.client_app import app

    assert set(INSTRUCTIONS) == set(REPLIES) == {TRAIN, EVALUATE, *(n for n in WIRE_NAMES if n.startswith("query."))}
    handled = {name.removesuffix(".default") for name in app._registered_funcs}
    assert handled == set(INSTRUCTIONS)
    assert action(messages.STATISTICS) == "statistics"


def test_an_update_is_counted_and_decoded_the_same_on_both_sides():
    """The bytes a merchant logs are the bytes the server counts: one definition (Update.nbytes)."""
    base = _arrays(BASE)
    for compression, dtype in (("none", np.float32), ("fp16", np.float16), ("int8", np.int8)):
        sent = Update.of(TRAINED, base, compression)
        received = TrainReply.decode(TrainReply(epsilon=1.0, update=sent).encode()).update
        assert received.nbytes == sent.nbytes == sum(len(a.data) for a in sent.arrays.values()) + 4 * len(
            sent.scales)
        assert sent.arrays["w"].numpy().dtype == dtype
        weights = received.weights(BASE)
        for key, value in TRAINED.items():
            np.testing.assert_allclose(weights[key], value, atol=0.01)
    assert len(Update.of(TRAINED, base, "int8").scales) == 2  # one per float tensor


def test_a_non_private_epsilon_travels_as_minus_one_and_reads_back_as_infinity():
    content = TrainReply(epsilon=math.inf, update=Update(_arrays(BASE))).encode()
    assert content[messages.METRICS][messages.EPSILON] == -1.0
    assert math.isinf(TrainReply.decode(content).epsilon)
    content[messages.METRICS][messages.EPSILON] = -3.0
    with pytest.raises(ProtocolError, match="train reply: 'epsilon-spent' is -3.0"):
        TrainReply.decode(content)


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.pop(messages.METRICS), "train reply: no 'metrics' record"),
    (lambda c: c[messages.METRICS].pop(messages.EPSILON), "train reply: 'epsilon-spent' missing"),
    (lambda c: c.pop(ARRAYS), "train reply: no 'arrays' record"),
    (lambda c: c.__setitem__(messages.METRICS, ConfigRecord({"x": "y"})),
     "train reply: the 'metrics' record is a ConfigRecord, a MetricRecord was expected"),
    (lambda c: c[messages.METRICS].__setitem__(messages.USERS, 0.5), "'user-count' is a float, an integer"),
    (lambda c: c[messages.METRICS].__setitem__(messages.USERS, -4), "'user-count' is -4, a positive count"),
    (lambda c: c[messages.METRICS].pop(messages.TRAIN_LOSS), "'train-loss' missing"),
    (lambda c: c[messages.ENCODING].__setitem__(messages.CODEC, "int4"), "'codec' is 'int4', not one of"),
    (lambda c: c[messages.ENCODING].__setitem__(messages.SCALES, [1.0]), "'tensors' and 'scales' differ"),
])
def test_a_reply_that_does_not_fit_names_what_and_where(mutate, match):
    content = TrainReply(epsilon=1.0, update=Update.of(TRAINED, _arrays(BASE), "int8"), figures=FIGURES).encode()
    mutate(content)
    with pytest.raises(ProtocolError, match=match):
        TrainReply.decode(content)


def test_evaluation_figures_travel_flat_and_come_back_per_stage():
    reply = EvaluateReply(users=10, figures={"valid": {"ndcg@10": 0.5}, "test": {"ndcg@10": 0.25}})
    assert reply.flat() == {"valid-ndcg@10": 0.5, "test-ndcg@10": 0.25}
    assert aggregated_figures(reply.flat() | {"weight": 3.0}) == reply.figures
    content = reply.encode()
    content[messages.METRICS]["valid-ndcg@10"] = float("nan")
    with pytest.raises(ProtocolError, match="'valid-ndcg@10' is nan, a finite number"):
        EvaluateReply.decode(content)


# --- fuzzing the decoders -----------------------------------------------------------------------------------------

_NAMES = st.one_of(st.sampled_from(sorted(WIRE_NAMES | FLOWER_NAMES)), st.text(max_size=6),
                   st.sampled_from(["valid-ndcg@10", "test-hr@10", "valid-", "w", "b"]))
_INTS = st.integers(-(2**62), 2**62)
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
_METRIC_VALUES = st.one_of(_INTS, _FLOATS, st.lists(_INTS, max_size=3), st.lists(_FLOATS, max_size=3))
_CONFIG_VALUES = st.one_of(_INTS, _FLOATS, st.text(max_size=8), st.binary(max_size=8), st.booleans(),
                           st.lists(_INTS, max_size=3), st.lists(_FLOATS, max_size=3),
                           st.lists(st.text(max_size=4), max_size=3), st.lists(st.binary(max_size=4), max_size=3))
_ARRAYS = st.builds(
    lambda dtype, shape, seed: Array(np.random.default_rng(seed).normal(0, 1e3, shape).astype(dtype)),
    st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.int64, np.uint8]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**16))
_RECORDS = st.one_of(
    st.dictionaries(_NAMES, _METRIC_VALUES, max_size=6).map(MetricRecord),
    st.dictionaries(_NAMES, _CONFIG_VALUES, max_size=6).map(ConfigRecord),
    st.dictionaries(_NAMES, _ARRAYS, max_size=4).map(ArrayRecord),
)
_CONTENT = st.dictionaries(_NAMES, _RECORDS, max_size=5).map(RecordDict)
DECODERS = sorted({*INSTRUCTIONS.values(), *REPLIES.values()}, key=lambda cls: cls.__name__)


def _decodes_or_says_why(decoder, content: RecordDict) -> None:
    try:
        record = decoder.decode(content)
    except ProtocolError as exc:
        assert str(exc).split(":")[0] in {"train instruction", "train reply", "evaluate instruction",
                                          "evaluate reply", "statistics request", "statistics reply",
                                          "selection request", "selection reply", "model delivery",
                                          "model receipt", "checked reply", "secure setup", "secure keys",
                                          "secure share keys", "secure ciphertexts", "secure mask", "secure masked",
                                          "secure unmask", "secure shares"}, str(exc)
        return
    assert type(record) is decoder
    record.encode()  # what decoded is a record that can be sent again


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda cls: cls.__name__)
@FUZZ
@given(content=_CONTENT)
def test_any_content_decodes_or_raises_one_clear_error(decoder, content):
    _decodes_or_says_why(decoder, content)


@pytest.mark.parametrize("decoder", DECODERS, ids=lambda cls: cls.__name__)
@FUZZ
@given(pick=st.integers(0, 99), data=st.data())
def test_a_valid_message_with_any_key_damaged_decodes_or_raises_one_clear_error(decoder, pick, data):
    """Arbitrary content rarely looks like a message: damage real ones, a key at a time (removed, or given a value
    of another type), and a record at a time (removed, or replaced)."""
    examples = [r for r in _examples() if type(r) is decoder]
    content = examples[pick % len(examples)].encode()
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(sorted(content.keys()) or ["x"]))
        record = content.get(name)
        keys = sorted(record.keys()) if record is not None else []
        how = data.draw(st.sampled_from(["drop record", "replace record", "drop key", "retype key"]))
        if how == "drop record" and record is not None:
            del content[name]
        elif how == "replace record" or not keys:
            content[name] = data.draw(_RECORDS)
        elif how == "drop key":
            del record[data.draw(st.sampled_from(keys))]
        else:
            key = data.draw(st.sampled_from(keys))
            values = (_METRIC_VALUES if isinstance(record, MetricRecord) else
                      _CONFIG_VALUES if isinstance(record, ConfigRecord) else _ARRAYS)
            record[key] = data.draw(values)
    _decodes_or_says_why(decoder, content)


# --- names ----------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("as_if_inside_a_serverapp")
def test_the_names_flower_fixes_are_what_flowers_strategies_send():
    """The instructions are built by Flower's strategies: the record names, the round number and FedProx's μ
    the merchant reads are the ones they write."""
    parameters = inspect.signature(FedAvg.__init__).parameters
    assert parameters["arrayrecord_key"].default == ARRAYS and parameters["configrecord_key"].default == CONFIG
    assert (TRAIN, EVALUATE) == (MessageType.TRAIN, MessageType.EVALUATE)
    strategy = FedProx(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                       min_available_nodes=1, proximal_mu=0.25)
    arrays = _arrays(BASE)
    sent = TrainInstruction(arrays, run_key="run-9", attempt=2, compression="fp16")
    for message in strategy.configure_train(4, arrays, sent.config(), OfflineGrid([5, 6])):
        assert message.metadata.message_type == TRAIN
        got = TrainInstruction.decode(message.content)
        assert (got.server_round, got.proximal_mu, got.run_key, got.attempt, got.compression) == (
            4, 0.25, "run-9", 2, "fp16")
    asked = EvaluateInstruction(arrays, run_key="run-9", stages=("valid",))
    for message in strategy.configure_evaluate(4, arrays, asked.config(), OfflineGrid([5, 6])):
        got = EvaluateInstruction.decode(message.content)
        assert message.metadata.message_type == EVALUATE and (got.server_round, got.stages) == (4, ("valid",))


def test_no_production_module_spells_a_wire_name():
    """Every record name, key and message type lives in common/protocol/messages.py: a module elsewhere that spells
    one as a string literal reads or builds messages by hand."""
    assert WIRE_NAMES and not WIRE_NAMES & FLOWER_NAMES
    offenders = []
    for folder in PRODUCTION:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "common" / "protocol"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in WIRE_NAMES:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "wire names outside common/protocol/messages.py:\n" + "\n".join(offenders)


def test_a_reply_carries_its_release_or_a_decline():
    with pytest.raises(ValueError, match="TrainReply carries its release or a decline"):
        TrainReply(epsilon=1.0)
    with pytest.raises(ValueError, match="SelectionReply carries its release or a decline"):
        SelectionReply(figures=np.zeros(3), decline="no budget")
    with pytest.raises(ValueError, match="StatisticsReply carries its release or a decline"):
        StatisticsReply()
