"""Compressed updates (common/protocol/codec.py): unbiased int8, bounded error, the bytes they save, and the server
refusing an encoding that does not fit the global model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedaug.common.protocol.codec import INT8_LEVELS, Encoded, decode, encode

BASE = {"w": np.linspace(-1, 1, 600, dtype=np.float32).reshape(20, 30), "b": np.zeros(30, np.float32),
        "steps": np.array([3], np.int64)}


def _update(rng, scale=0.01):
    return {"w": BASE["w"] + rng.normal(0, scale, BASE["w"].shape).astype(np.float32),
            "b": rng.normal(0, scale, 30).astype(np.float32), "steps": np.array([4], np.int64)}


@pytest.mark.parametrize("kind, ratio", [("fp16", 0.5), ("int8", 0.25)])
def test_a_compressed_update_decodes_close_to_the_weights_at_a_fraction_of_the_bytes(kind, ratio):
    update = _update(np.random.default_rng(0))
    encoded = encode(update, BASE, kind)
    decoded = decode(encoded, BASE)
    float_bytes = sum(v.nbytes for v in update.values() if v.dtype.kind == "f")
    # The int64 tensor travels as it is; int8 adds one fp32 scale per float tensor.
    assert encoded.nbytes == 8 + ratio * float_bytes + 4 * len(encoded.scales)
    assert len(encoded.scales) == (2 if kind == "int8" else 0)
    assert set(decoded) == set(update) and all(decoded[k].dtype == update[k].dtype for k in update)
    assert np.array_equal(decoded["steps"], update["steps"])
    for key in ("w", "b"):
        delta = update[key] - BASE[key]
        step = np.abs(delta).max() / INT8_LEVELS if kind == "int8" else np.abs(delta).max() * 2.0 ** -10
        assert np.abs(decoded[key] - update[key]).max() <= step * 1.001


def test_int8_rounding_is_unbiased_and_a_replayed_update_encodes_to_the_same_bytes():
    rng = np.random.default_rng(1)
    update = _update(rng)
    again = encode(update, BASE, "int8")
    assert all(np.array_equal(a, b) for a, b in zip(encode(update, BASE, "int8").arrays.values(),
                                                    again.arrays.values(), strict=True))
    # Averaged over many merchants' roundings (distinct updates of one delta), the de-quantised delta converges
    # on the true one far below a quantisation step: stochastic rounding has no bias for FedAvg to accumulate.
    delta = update["w"] - BASE["w"]
    step = np.abs(delta).max() / INT8_LEVELS
    sums = np.zeros_like(delta, dtype=np.float64)
    for i in range(400):
        tagged = dict(update, steps=np.array([i], np.int64))  # a different update: different rounding draws
        sums += decode(encode(tagged, BASE, "int8"), BASE)["w"] - BASE["w"]
    bias = sums / 400 - delta
    assert np.abs(bias).mean() < 0.05 * step
    nearest = np.round(delta / step) * step  # deterministic rounding's error, for scale
    assert np.abs(bias).mean() < 0.2 * np.abs(nearest - delta).mean()


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e3, 1e3, width=32)),
       arrays(np.float32, st.integers(1, 50), elements=st.floats(-1e3, 1e3, width=32)))
def test_any_delta_decodes_within_one_int8_step(base, update):
    n = min(len(base), len(update))
    base, update = {"x": base[:n]}, {"x": update[:n]}
    decoded = decode(encode(update, base, "int8"), base)["x"]
    delta = update["x"].astype(np.float64) - base["x"]
    step = np.abs(delta).max() / INT8_LEVELS
    assert np.all(np.abs(decoded.astype(np.float64) - update["x"]) <= step * 1.001 + 1e-3 * np.abs(update["x"]) + 1e-6)


def test_an_encoding_that_does_not_fit_the_global_model_is_refused_naming_the_tensor():
    encoded = encode(_update(np.random.default_rng(2)), BASE, "int8")
    with pytest.raises(ValueError, match="'w' has dtype float32, expected int8"):
        decode(Encoded("int8", encoded.arrays | {"w": encoded.arrays["w"].astype(np.float32)}, encoded.scales), BASE)
    with pytest.raises(ValueError, match="'b' has no positive finite int8 scale"):
        decode(Encoded("int8", encoded.arrays, encoded.scales | {"b": float("nan")}), BASE)
    with pytest.raises(ValueError, match="codes outside"):
        decode(Encoded("int8", encoded.arrays | {"b": np.full(30, -128, np.int8)}, encoded.scales), BASE)
    with pytest.raises(ValueError, match="unknown kind 'int4'"):
        decode(Encoded("int4", encoded.arrays, encoded.scales), BASE)
    with pytest.raises(ValueError, match="unknown kind"):
        encode(_update(np.random.default_rng(2)), BASE, "zip")
