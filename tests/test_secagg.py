"""SecAgg+ without transport (fedaug.runtime.secagg): the exact sum mod 2**bits over complete graphs and rings, the
dropouts each stage tolerates up to the threshold and the clean failure below it, the merchant's state between
messages, its refusals — and everything the aggregator receives in a round, which holds no merchant's vector."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from scipy import stats

from fedaug.runtime.flower import bytes_to_private_key, bytes_to_public_key, encrypt, share_plaintext, shared_key
from fedaug.runtime.secagg import (
    AggregatorSecAgg,
    MerchantSecAgg,
    SecAggFailed,
    default_threshold,
    neighbours,
    signed,
)


def secure_sum(vectors: dict[int, np.ndarray], *, bits: int = 32, degree: int | None = None,
               gone_after: dict[str, list[int]] | None = None, stored: bool = False,
               received: list | None = None) -> tuple[np.ndarray, AggregatorSecAgg]:
    """One round as fedaug's ServerApp drives it: each stage's message to every merchant still in, their replies
    back, the stage checked. ``gone_after``: {stage: merchants that reply to it and then never again};
    ``stored``: each merchant goes through to_bytes/from_bytes between messages (the ClientApp's context.state);
    ``received``: gets (stage, node, payload) for everything the aggregator receives."""
    gone_after = gone_after or {}
    received = [] if received is None else received
    nodes = sorted(vectors)
    aggregator = AggregatorSecAgg(nodes=nodes, length=len(vectors[nodes[0]]), bits=bits, degree=degree)
    merchants = {node: MerchantSecAgg.setup(node_id=node, threshold=aggregator.threshold, bits=bits)
                 for node in nodes}

    def merchant(node: int) -> MerchantSecAgg:
        if stored:
            merchants[node] = MerchantSecAgg.from_bytes(merchants[node].to_bytes())
        return merchants[node]

    def unmask(node: int) -> dict[int, bytes]:
        active, dead = aggregator.unmask_request(node)
        return merchant(node).unmask_shares(active=active, dead=dead)

    stages = (
        ("setup", lambda node: merchant(node).public_keys(), aggregator.add_public_keys),
        ("share_keys", lambda node: merchant(node).share_keys(aggregator.keys_for(node)), aggregator.add_ciphertexts),
        ("mask", lambda node: merchant(node).mask(aggregator.ciphertexts_for(node), vectors[node]),
         aggregator.add_masked),
        ("unmask", unmask, aggregator.add_shares),
    )
    live = list(nodes)
    for stage, ask, add in stages:
        replies = {node: ask(node) for node in live}  # the stage's messages all go out before replies come back
        for node, reply in replies.items():
            received.append((stage, node, reply))
            add(node, reply)
        aggregator.check(stage)
        live = [node for node in live if node not in gone_after.get(stage, ())]
    return aggregator.result(), aggregator


def random_vectors(count: int, length: int, *, low: int, high: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(10**6, size=count, replace=False).tolist())  # node ids are not 0..n-1
    return {node: rng.integers(low, high, size=length, dtype=np.int64) for node in ids}


def plain_sum(vectors: dict[int, np.ndarray], nodes, bits: int) -> np.ndarray:
    """The sum mod 2**bits, in Python integers, as signed values."""
    total = [sum(int(vectors[node][i]) for node in nodes) % 2**bits for i in range(len(vectors[nodes[0]]))]
    return np.array([value - 2**bits if value >= 2**(bits - 1) else value for value in total], dtype=np.int64)


# the graph, the threshold, signed values ---------------------------------------------------------------------------


def test_the_ring_is_symmetric_with_degree_neighbours_and_the_complete_graph_is_everyone_else():
    ring = neighbours([50, 10, 40, 20, 30, 60, 70], degree=4)
    assert ring[10] == (20, 30, 60, 70) and ring[40] == (20, 30, 50, 60)
    assert all(len(others) == 4 and node not in others for node, others in ring.items())
    assert all(node in ring[other] for node, others in ring.items() for other in others)
    for degree in (None, 6, 9):
        assert neighbours([3, 1, 2, 4, 5, 6, 7], degree=degree)[4] == (1, 2, 3, 5, 6, 7)
    with pytest.raises(SecAggFailed, match="setup: a ring's degree is even"):
        neighbours(range(10), degree=3)
    with pytest.raises(SecAggFailed, match="setup: node ids repeat"):
        neighbours([1, 2, 2, 3], degree=None)


def test_the_threshold_is_a_strict_majority_of_a_neighbourhood_with_the_node_itself():
    for degree in range(1, 30):
        t = default_threshold(degree)
        assert t > (degree + 1) / 2 and t - 1 <= (degree + 1) / 2 and t <= degree + 1


def test_signed_reads_values_mod_2_to_the_bits_in_the_centred_range():
    for bits in (1, 8, 32, 62):
        values = np.array([0, 1, 2**(bits - 1) - 1, 2**(bits - 1), 2**bits - 1], dtype=np.uint64)
        expected = [0, 1 - (2 if bits == 1 else 0), 2**(bits - 1) - 1, -(2**(bits - 1)), -1]
        assert signed(values, bits).tolist() == expected
    assert signed(np.array([-3, 5], dtype=np.int32), 8).tolist() == [-3, 5]
    with pytest.raises(SecAggFailed, match="1-D integer vector"):
        signed(np.zeros(3, dtype=np.float32), 8)


# the exact sum ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "degree"), [(3, None), (5, None), (10, None), (10, 4), (5, 2)])
def test_the_secure_sum_is_the_exact_sum_mod_2_to_the_bits(count, degree):
    vectors = random_vectors(count, 257, low=-2**20, high=2**20, seed=count)
    result, aggregator = secure_sum(vectors, degree=degree)
    assert aggregator.survivors == sorted(vectors)
    assert result.dtype == np.int64 and np.array_equal(result, sum(vectors.values()))


@pytest.mark.parametrize("bits", [8, 33, 62])
def test_sums_that_wrap_around_2_to_the_bits_come_out_mod_2_to_the_bits(bits):
    vectors = random_vectors(4, 65, low=-2**(bits - 1), high=2**(bits - 1), seed=bits)
    result, _ = secure_sum(vectors, bits=bits)
    expected = plain_sum(vectors, sorted(vectors), bits)
    assert np.array_equal(result, expected)
    assert bits == 8 or not np.array_equal(result, sum(vectors.values()))  # it did wrap


def test_the_merchants_state_survives_between_messages():
    vectors = random_vectors(5, 33, low=-100, high=100)
    result, _ = secure_sum(vectors, degree=2, stored=True, gone_after={"share_keys": [sorted(vectors)[1]]})
    assert np.array_equal(result, plain_sum(vectors, [n for n in sorted(vectors) if n != sorted(vectors)[1]], 32))
    with pytest.raises(SecAggFailed, match="state: not a stored SecAgg"):
        MerchantSecAgg.from_bytes(b'{"node_id": 1}')
    with pytest.raises(SecAggFailed, match="state: not a stored SecAgg"):
        MerchantSecAgg.from_bytes(b"\xff")


# dropouts -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["setup", "share_keys", "mask"])
@pytest.mark.parametrize(("count", "degree", "gone"), [(3, None, [1]), (5, None, [0, 3]), (10, 4, [2, 3]),
                                                       (10, None, [0, 5, 6, 9])])
def test_dropouts_up_to_the_threshold_leave_the_survivors_sum(stage, count, degree, gone):
    vectors = random_vectors(count, 40, low=-1000, high=1000, seed=count + len(gone))
    ids = sorted(vectors)
    gone = [ids[i] for i in gone]
    result, aggregator = secure_sum(vectors, degree=degree, gone_after={stage: gone})
    # after masking, a merchant that sends no shares is still in the sum; before, it is out
    summed = ids if stage == "mask" else [node for node in ids if node not in gone]
    assert aggregator.survivors == summed
    assert np.array_equal(result, plain_sum(vectors, summed, 32))


def test_one_dropout_after_each_stage_at_once():
    vectors = random_vectors(10, 40, low=-1000, high=1000, seed=7)
    ids = sorted(vectors)
    result, aggregator = secure_sum(vectors, gone_after={"setup": [ids[0]], "share_keys": [ids[4]],
                                                         "mask": [ids[8]]})
    summed = [node for node in ids if node not in (ids[0], ids[4])]
    assert aggregator.survivors == summed and np.array_equal(result, plain_sum(vectors, summed, 32))


@pytest.mark.parametrize(("stage", "count", "degree", "gone", "message"), [
    ("setup", 3, None, [0, 1], r"share_keys: 0 of 2 neighbours of node \d+ are left, 1 needed"),
    ("share_keys", 5, None, [0, 1, 2], r"mask: 1 of 4 neighbours of node \d+ are left, 2 needed"),
    ("share_keys", 10, 4, [4, 5, 6], r"mask: node \d+ dropped after sharing its keys and 2 of its 4 neighbours are "
                                     r"left to rebuild them, 3 needed"),
    ("mask", 5, None, [0, 1, 2], r"unmask: 2 of 5 share holders of node \d+ answered, 3 needed"),
    ("mask", 10, None, [0, 1, 2, 3, 4], r"unmask: 5 of 10 share holders of node \d+ answered, 6 needed"),
])
def test_below_the_threshold_the_round_fails_with_one_line_naming_the_stage(stage, count, degree, gone, message):
    vectors = random_vectors(count, 16, low=-10, high=10)
    ids = sorted(vectors)
    with pytest.raises(SecAggFailed, match=message):
        secure_sum(vectors, degree=degree, gone_after={stage: [ids[i] for i in gone]})


# refusals -----------------------------------------------------------------------------------------------------------


def three_merchants(bits: int = 16):
    """Three merchants through share_keys: (aggregator, merchants, ciphertexts addressed to each)."""
    aggregator = AggregatorSecAgg(nodes=[1, 2, 3], length=8, bits=bits)
    merchants = {node: MerchantSecAgg.setup(node_id=node, threshold=aggregator.threshold, bits=bits)
                 for node in (1, 2, 3)}
    for node, merchant in merchants.items():
        aggregator.add_public_keys(node, merchant.public_keys())
    replies = {node: merchant.share_keys(aggregator.keys_for(node)) for node, merchant in merchants.items()}
    for node, reply in replies.items():
        aggregator.add_ciphertexts(node, reply)
    return aggregator, merchants, {node: aggregator.ciphertexts_for(node) for node in merchants}


def test_altered_relabelled_or_forged_shares_are_refused():
    _, merchants, ciphertexts = three_merchants()
    vector = np.arange(8)
    altered = dict(ciphertexts[1])
    altered[2] = altered[2][:-8] + bytes(reversed(altered[2][-8:]))
    relabelled = {2: ciphertexts[1][3], 3: ciphertexts[1][2]}
    for bad in (altered, relabelled, {2: ciphertexts[3][2], 3: ciphertexts[1][3]}):  # the last is for node 3
        with pytest.raises(SecAggFailed, match="mask: the shares node [23] sent node 1 do not decrypt"):
            merchants[1].mask(bad, vector)
    # encrypted by node 2 for node 1, but saying it comes from node 3
    node_2_secret = base64.b64decode(json.loads(merchants[2].to_bytes())["secrets"]["enc_sk"])
    key = shared_key(bytes_to_private_key(node_2_secret), bytes_to_public_key(merchants[1].public_keys()[0]))
    forged = {2: encrypt(key, share_plaintext(3, 1, b"x" * 20, b"y" * 20)), 3: ciphertexts[1][3]}
    with pytest.raises(SecAggFailed, match="say they go from node 3 to node 1"):
        merchants[1].mask(forged, vector)
    assert merchants[1].mask(ciphertexts[1], vector).shape == (8,)  # nothing was kept from the refused calls


def test_a_merchant_answers_each_stage_once_and_the_unmask_stage_only_with_one_list():
    aggregator, merchants, ciphertexts = three_merchants()
    masked = merchants[1].mask(ciphertexts[1], np.arange(8))
    assert masked.dtype == np.uint32
    with pytest.raises(SecAggFailed, match="mask: node 1 is past mask, not share_keys"):
        merchants[1].mask(ciphertexts[1], np.zeros(8, dtype=np.int64))
    with pytest.raises(SecAggFailed, match=r"both active and dead"):
        merchants[1].unmask_shares(active=[1, 2], dead=[2])
    with pytest.raises(SecAggFailed, match="asked for its own secret key"):
        merchants[1].unmask_shares(active=[2, 3], dead=[1])
    with pytest.raises(SecAggFailed, match=r"holds no shares of nodes \[9\]"):
        merchants[1].unmask_shares(active=[1, 2], dead=[9])
    with pytest.raises(SecAggFailed, match="1 of node 1's neighbourhood are active, 2 needed"):
        merchants[1].unmask_shares(active=[1], dead=[2, 3])
    first = merchants[1].unmask_shares(active=[1, 2], dead=[3])
    assert merchants[1].unmask_shares(active=[2, 1], dead=[3]) == first  # the same question, the same answer
    # the classic attack: ask again with node 3 active, to get its seed share beside its key share
    with pytest.raises(SecAggFailed, match=r"already answered for active \[1, 2\], dead \[3\]"):
        merchants[1].unmask_shares(active=[1, 2, 3], dead=[])
    stored = MerchantSecAgg.from_bytes(merchants[1].to_bytes())
    with pytest.raises(SecAggFailed, match="already answered"):
        stored.unmask_shares(active=[1, 2, 3], dead=[])


def test_a_merchant_refuses_too_few_neighbours_a_minority_threshold_and_repeated_keys():
    merchants = {node: MerchantSecAgg.setup(node_id=node, threshold=3, bits=32) for node in range(5)}
    keys = {node: merchant.public_keys() for node, merchant in merchants.items()}
    with pytest.raises(SecAggFailed, match="share_keys: node 0 got the keys of 1 neighbours, 2 needed"):
        merchants[0].share_keys({1: keys[1]})
    with pytest.raises(SecAggFailed, match="threshold 3 is no strict majority of node 0's 6 share holders"):
        merchants[0].share_keys({**keys, 9: MerchantSecAgg.setup(node_id=9, threshold=3, bits=32).public_keys()})
    with pytest.raises(SecAggFailed, match="public keys repeat"):
        merchants[0].share_keys({1: keys[1], 2: keys[1]})
    with pytest.raises(SecAggFailed, match="the keys listed for node 0 are not its own"):
        merchants[0].share_keys({0: keys[1], 1: keys[1], 2: keys[2]})
    with pytest.raises(SecAggFailed, match="node 2's public key is not an elliptic-curve key"):
        merchants[0].share_keys({1: keys[1], 2: (b"not a key", keys[2][1])})
    assert set(merchants[0].share_keys({node: keys[node] for node in (0, 1, 2, 3)})) == {1, 2, 3}
    with pytest.raises(SecAggFailed, match="threshold 1"):
        MerchantSecAgg.setup(node_id=0, threshold=1, bits=32)
    with pytest.raises(SecAggFailed, match="bits from 1 to 62, got 63"):
        MerchantSecAgg.setup(node_id=0, threshold=2, bits=63)


def test_the_aggregator_refuses_a_federation_too_small_a_weak_threshold_and_replies_out_of_turn():
    with pytest.raises(SecAggFailed, match="setup: secure aggregation needs at least 3 merchants, got 2"):
        AggregatorSecAgg(nodes=[4, 9], length=3, bits=32)
    with pytest.raises(SecAggFailed, match=r"threshold 3 is not a strict majority of a neighbourhood of 6 nodes "
                                           r"\(4 to 6\)"):
        AggregatorSecAgg(nodes=range(6), length=3, bits=32, threshold=3)
    aggregator, merchants, _ = three_merchants(bits=16)
    with pytest.raises(SecAggFailed, match="setup: node 1's reply came while the mask stage was open"):
        aggregator.add_public_keys(1, merchants[1].public_keys())
    with pytest.raises(SecAggFailed, match="mask: node 7 is not in this secure sum"):
        aggregator.add_masked(7, np.zeros(8, dtype=np.uint16))
    for vector, message in ((np.zeros(7, dtype=np.uint16), "shape"), (np.zeros(8, dtype=np.float32), "float32"),
                            (np.full(8, 2**16, dtype=np.int64), r"outside \[0, 2\*\*16\)")):
        with pytest.raises(SecAggFailed, match=f"mask: node 1 sent .*{message}"):
            aggregator.add_masked(1, vector)
    aggregator.add_masked(1, np.zeros(8, dtype=np.uint16))
    with pytest.raises(SecAggFailed, match="mask: node 1 answered twice"):
        aggregator.add_masked(1, np.zeros(8, dtype=np.uint16))
    with pytest.raises(SecAggFailed, match="the sum is not ready"):
        aggregator.result()
    with pytest.raises(SecAggFailed, match="mask: node 2 sent no reply, so it takes no further part"):
        aggregator.unmask_request(2)
    fresh = AggregatorSecAgg(nodes=[1, 2, 3], length=8, bits=16)
    for node, merchant in merchants.items():
        fresh.add_public_keys(node, merchant.public_keys())
    with pytest.raises(SecAggFailed, match="share_keys: node 1's reply came while the setup stage was open"):
        fresh.add_ciphertexts(1, {2: b"x", 3: b"y"})
    assert set(fresh.keys_for(1)) == {2, 3}
    with pytest.raises(SecAggFailed, match=r"share_keys: node 1 sent shares for nodes \[2\], expected \[2, 3\]"):
        fresh.add_ciphertexts(1, {2: b"x"})


# what the aggregator sees (the acceptance 2) ----------------------------------------------------------------


def test_nothing_the_aggregator_receives_holds_a_merchants_vector_and_the_sum_is_exact():
    """Everything the aggregator receives in a round — public keys, encrypted shares, masked vectors, unmask shares
    — recorded: no merchant's vector is in it (nor its value mod 2**bits, nor its negation: no masked vector
    matches one at more coordinates than chance, and no bytes received hold one), the masked vectors' top bits are
    uniform, and the unmasked sum is the plain sum exactly. One merchant drops after sharing its keys, so key shares
    are in the record too."""
    bits, length = 32, 8192
    vectors = random_vectors(5, length, low=-2**12, high=2**12, seed=32)  # quantised updates: small signed integers
    ids = sorted(vectors)
    received: list = []
    result, aggregator = secure_sum(vectors, bits=bits, gone_after={"share_keys": [ids[2]]}, received=received)
    assert {stage for stage, _, _ in received} == {"setup", "share_keys", "mask", "unmask"}
    assert any(len(dead) for dead in (aggregator.unmask_request(node)[1] for node in aggregator.survivors))

    arrays = [payload for stage, _, payload in received if stage == "mask"]
    blobs = [value for stage, _, payload in received if stage != "mask"
             for value in (payload if isinstance(payload, tuple) else payload.values())]
    assert len(arrays) == 4 and all(isinstance(blob, bytes) for blob in blobs)
    for vector in vectors.values():
        for seen in (vector, -vector):
            reduced = (seen % 2**bits).astype(np.uint64)
            for array in arrays:  # not the vector, nor any part of it beyond chance (a coordinate matches at 2**-32)
                assert not np.array_equal(array, reduced) and np.count_nonzero(array == reduced) <= 3
            for dtype in (np.int64, np.int32, np.uint32):
                needle = (reduced.astype(np.uint32) if dtype == np.uint32 else seen.astype(dtype))[:8].tobytes()
                assert not any(needle in blob for blob in blobs)

    def top_bits_p(values: np.ndarray) -> float:
        counts = np.bincount((values.astype(np.uint64) >> np.uint64(bits - 4)).astype(np.int64), minlength=16)
        return stats.chisquare(counts).pvalue

    assert all(top_bits_p(array) > 1e-6 for array in arrays)
    assert all(top_bits_p(vector % 2**bits) < 1e-6 for vector in vectors.values())  # the test can tell
    survivors = [node for node in ids if node != ids[2]]
    assert aggregator.survivors == survivors
    assert np.array_equal(result, sum(vectors[node] for node in survivors))
