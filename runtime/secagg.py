"""SecAgg+ (Bell et al., CCS 2020) for the Message API: the merchant's and the aggregator's halves, without transport.

Flower's SecAgg+ exists only in its legacy workflow (``SecAggPlusWorkflow`` wants a ``LegacyContext``, its client mod
quantises a legacy ``FitRes``). Here are the protocol's two halves as plain objects over integer vectors mod
``2**bits``: what is summed comes already quantised (and noised), so nothing is quantised inside the protocol. fedaug's
ServerApp and ClientApp carry their messages. The parts are Flower's own (through ``fedaug.runtime.flower``): key pairs
on SECP384R1, ECDH key agreement, Fernet encryption of the shares, the shares' plaintext format, and Shamir's secret
sharing over GF(2^128).

Four stages, one message round each:

1. setup: every merchant makes two key pairs (one to encrypt shares, one for pairwise masks) and a 32-byte mask seed,
   and sends the public keys;
2. share_keys: it splits its seed and its masking secret key into Shamir shares (``threshold`` of them rebuild each)
   for itself and each neighbour, and sends each neighbour's encrypted for it;
3. mask: it sends ``vector + private mask + sum of pairwise masks`` mod ``2**bits``, one pairwise mask per neighbour
   whose shares reached it (added by the larger node id, subtracted by the smaller, so each pair cancels in the sum);
4. unmask: each survivor sends the seed shares of its surviving neighbours (and its own) and the secret-key shares of
   its neighbours that dropped after sharing; the aggregator rebuilds those, takes off the survivors' private masks
   and the dropped nodes' pairwise masks, and is left with the survivors' sum.

The communication graph is a ring over the sorted node ids (SecAgg+), or the complete graph (SecAgg). The threshold is
a strict majority of each neighbourhood, and a merchant answers the unmask stage once: so the aggregator never holds
both a node's seed and its masking key, which together would unmask its vector.

One departure from Flower: its ``pseudo_rand_gen`` folds the mask seed to 32 bits (numpy's ``RandomState``), which a
curious aggregator can search exhaustively. The masks here are AES-256-CTR keystreams (``cryptography``) keyed by
HKDF-SHA256 of the seed or of the pairwise ECDH key, labelled apart for private and pairwise masks, read as uint32
(bits <= 32) or uint64 words mod ``2**bits`` (which divides the word range, so every value is equally likely).

Assumed: the aggregator follows the protocol (it is curious, not malicious); each merchant's view of who its neighbours
are comes from the aggregator. Arithmetic is in uint64, where additions wrap mod ``2**64`` and so mod ``2**bits``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedaug.common.errors import FedaugError
from fedaug.runtime.flower import (
    bytes_to_private_key,
    bytes_to_public_key,
    decrypt,
    encrypt,
    generate_key_pair,
    private_key_to_bytes,
    public_key_to_bytes,
    shamir_combine,
    shamir_split,
    share_plaintext,
    share_plaintext_parts,
    shared_key,
)

MIN_NODES = 3
"""The fewest merchants a secure sum runs with: with two, each would learn the other's vector from the sum."""
MAX_BITS = 62
SEED_BYTES = 32
PRIVATE_LABEL = b"fedaug secagg+ private mask"
PAIRWISE_LABEL = b"fedaug secagg+ pairwise mask"
STAGES = ("setup", "share_keys", "mask", "unmask")
"""The stages in order; SecAggFailed messages and ``AggregatorSecAgg.check`` name them so."""


class SecAggFailed(FedaugError):
    """A secure sum that cannot go on: one line naming the stage and why."""


def neighbours(nodes: Sequence[int], *, degree: int | None) -> dict[int, tuple[int, ...]]:
    """SecAgg+'s communication graph over the sorted node ids: each node's ``degree`` nearest on a ring
    (``degree // 2`` each side; so ``degree`` is even), or the complete graph when ``degree`` is None or at least
    ``len(nodes) - 1``. A node is never its own neighbour."""
    ids = sorted(int(node) for node in nodes)
    if len(set(ids)) != len(ids):
        raise SecAggFailed(f"setup: node ids repeat in {ids}")
    count = len(ids)
    if degree is None or degree >= count - 1:
        return {node: tuple(other for other in ids if other != node) for node in ids}
    if degree < 2 or degree % 2:
        raise SecAggFailed(f"setup: a ring's degree is even and at least 2 (half of it each side), got {degree}")
    half = degree // 2
    return {node: tuple(sorted(ids[(at + step) % count] for step in range(-half, half + 1) if step))
            for at, node in enumerate(ids)}


def default_threshold(degree: int) -> int:
    """The Shamir threshold for nodes of ``degree`` neighbours: a strict majority of a neighbourhood with the node
    itself (more than ``(degree + 1) / 2``), so the aggregator can never gather both a node's seed shares and its key
    shares from nodes that each answer once."""
    if degree < 1:
        raise SecAggFailed(f"setup: a node needs at least one neighbour, got degree {degree}")
    return (degree + 1) // 2 + 1


def signed(vector: np.ndarray, bits: int) -> np.ndarray:
    """Values mod ``2**bits`` as int64 in ``[-2**(bits-1), 2**(bits-1))``."""
    _check_bits(bits)
    shift = 64 - bits
    return (_reduced(vector, bits, "signed") << np.uint64(shift)).view(np.int64) >> np.int64(shift)


def wire_dtype(bits: int) -> np.dtype:
    """The dtype of a masked vector: the smallest unsigned word that holds ``bits``."""
    return np.dtype(np.uint32 if bits <= 32 else np.uint64)


class MerchantSecAgg:
    """One merchant's side of one secure sum. Its state holds its secret keys: it survives between Flower messages
    through ``to_bytes``/``from_bytes`` (the ClientApp's ``context.state``) and never leaves the merchant.

    Each stage runs once, in order; a refused call changes nothing."""

    def __init__(self, *, node_id: int, threshold: int, bits: int, secrets: dict[str, bytes], stage: str = "setup",
                 neighbour_keys: dict[int, tuple[bytes, bytes]] | None = None,
                 shares: dict[int, tuple[bytes, bytes]] | None = None,
                 answered: tuple[list[int], list[int]] | None = None):
        """Use ``setup`` (a fresh merchant) or ``from_bytes`` (a stored one)."""
        self.node_id, self.threshold, self.bits = node_id, threshold, bits
        self._secrets = secrets  # enc_sk, enc_pk, mask_sk, mask_pk (PEM) and seed
        self._stage = stage  # the last stage done
        self._neighbour_keys = neighbour_keys or {}
        self._shares = shares or {}  # source -> (seed share, secret-key share), its own included
        self._answered = answered

    @classmethod
    def setup(cls, *, node_id: int, threshold: int, bits: int) -> MerchantSecAgg:
        """Fresh key pairs and mask seed for node ``node_id``, sums mod ``2**bits``, ``threshold`` shares per secret."""
        _check_bits(bits)
        if threshold < 2:
            raise SecAggFailed(f"setup: node {node_id} got threshold {threshold}; at least 2, or one share reveals "
                               f"a secret")
        secrets = {"seed": os.urandom(SEED_BYTES)}
        for name in ("enc", "mask"):
            private, public = generate_key_pair()
            secrets[f"{name}_sk"], secrets[f"{name}_pk"] = private_key_to_bytes(private), public_key_to_bytes(public)
        return cls(node_id=int(node_id), threshold=threshold, bits=bits, secrets=secrets)

    def public_keys(self) -> tuple[bytes, bytes]:
        """(encryption public key, masking public key), for the aggregator to pass to the neighbours."""
        return self._secrets["enc_pk"], self._secrets["mask_pk"]

    def share_keys(self, neighbour_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shamir shares of the mask seed and the masking secret key, for itself and each neighbour in
        ``neighbour_keys`` ({node: public keys}; its own entry, if there, must be its own keys): {neighbour: its
        shares, encrypted for it}. Refuses fewer than ``threshold - 1`` neighbours, and a threshold that is no strict
        majority of the share holders."""
        self._expect("share_keys")
        keys = {int(node): (bytes(pair[0]), bytes(pair[1])) for node, pair in neighbour_keys.items()}
        if keys.pop(self.node_id, self.public_keys()) != self.public_keys():
            raise SecAggFailed(f"share_keys: the keys listed for node {self.node_id} are not its own")
        holders = len(keys) + 1
        if holders < self.threshold:
            raise SecAggFailed(f"share_keys: node {self.node_id} got the keys of {len(keys)} neighbours, "
                               f"{self.threshold - 1} needed")
        if 2 * self.threshold <= holders:
            raise SecAggFailed(f"share_keys: threshold {self.threshold} is no strict majority of node {self.node_id}'s "
                               f"{holders} share holders")
        every = [key for pair in [*keys.values(), self.public_keys()] for key in pair]
        if len(set(every)) != len(every):
            raise SecAggFailed(f"share_keys: public keys repeat among node {self.node_id}'s neighbours")
        encryption = bytes_to_private_key(self._secrets["enc_sk"])
        peers = {node: _public_key(pair[0], "share_keys", node) for node, pair in keys.items()}
        order = sorted([*keys, self.node_id])
        seed_shares = shamir_split(self._secrets["seed"], self.threshold, len(order))
        key_shares = shamir_split(self._secrets["mask_sk"], self.threshold, len(order))
        out, own = {}, None
        for node, seed_share, key_share in zip(order, seed_shares, key_shares, strict=True):
            if node == self.node_id:
                own = (seed_share, key_share)
            else:
                plaintext = share_plaintext(self.node_id, node, seed_share, key_share)
                out[node] = encrypt(_ecdh(encryption, peers[node], "share_keys", node), plaintext)
        self._neighbour_keys, self._shares = keys, {self.node_id: own}
        self._stage = "share_keys"
        return out

    def mask(self, ciphertexts: dict[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Decrypts and checks the shares sent to it ({source: ciphertext}) and keeps them; returns ``vector`` (an
        integer vector, read mod ``2**bits``) + its private mask + one pairwise mask per source (added if this node's
        id is the larger) mod ``2**bits``, as ``wire_dtype(bits)``."""
        self._expect("mask")
        sources = sorted(int(source) for source in ciphertexts)
        strangers = [source for source in sources if source not in self._neighbour_keys]
        if strangers:
            raise SecAggFailed(f"mask: node {self.node_id} got shares from nodes {strangers}, not its neighbours")
        if len(sources) + 1 < self.threshold:
            raise SecAggFailed(f"mask: {len(sources)} neighbours of node {self.node_id} sent shares, "
                               f"{self.threshold - 1} needed")
        words = _reduced(vector, self.bits, "mask")
        encryption = bytes_to_private_key(self._secrets["enc_sk"])
        shares = {}
        for source in sources:
            peer = _public_key(self._neighbour_keys[source][0], "mask", source)
            try:
                plaintext = decrypt(_ecdh(encryption, peer, "mask", source), bytes(ciphertexts[source]))
            except InvalidToken:
                raise SecAggFailed(f"mask: the shares node {source} sent node {self.node_id} do not decrypt "
                                   f"(altered, or encrypted for another node)") from None
            origin, destination, seed_share, key_share = share_plaintext_parts(plaintext)
            if (origin, destination) != (source, self.node_id):
                raise SecAggFailed(f"mask: the shares node {self.node_id} got as node {source}'s say they go from "
                                   f"node {origin} to node {destination}")
            shares[source] = (seed_share, key_share)
        masked = words + _mask(self._secrets["seed"], PRIVATE_LABEL, len(words), self.bits)
        masking = bytes_to_private_key(self._secrets["mask_sk"])
        for source in sources:
            pairwise = _pairwise(masking, self._neighbour_keys[source][1], source, len(words), self.bits, "mask")
            masked = masked + pairwise if self.node_id > source else masked - pairwise
        self._shares.update(shares)
        self._stage = "mask"
        return (masked & _low(self.bits)).astype(wire_dtype(self.bits))

    def unmask_shares(self, *, active: Sequence[int], dead: Sequence[int]) -> dict[int, bytes]:
        """{node: share}: the seed shares of the ``active`` nodes (itself included if listed) and the secret-key
        shares of the ``dead`` ones. Answers once: refuses a node listed in both, itself listed dead, a node whose
        shares it does not hold, fewer than ``threshold`` active, and a second call with other lists (which could
        give the aggregator both secrets of one node)."""
        request = (sorted({int(node) for node in active}), sorted({int(node) for node in dead}))
        if self._answered is not None and request != self._answered:
            raise SecAggFailed(f"unmask: node {self.node_id} already answered for active {self._answered[0]}, dead "
                               f"{self._answered[1]}; it refuses active {request[0]}, dead {request[1]}")
        if self._answered is None:
            self._expect("unmask")
        active, dead = request
        both = sorted(set(active) & set(dead))
        if both:
            raise SecAggFailed(f"unmask: node {self.node_id} was asked for nodes {both} as both active and dead")
        if self.node_id in dead:
            raise SecAggFailed(f"unmask: node {self.node_id} was asked for its own secret key")
        unknown = [node for node in active + dead if node not in self._shares]
        if unknown:
            raise SecAggFailed(f"unmask: node {self.node_id} holds no shares of nodes {unknown}")
        if len(active) < self.threshold:
            raise SecAggFailed(f"unmask: {len(active)} of node {self.node_id}'s neighbourhood are active, "
                               f"{self.threshold} needed")
        self._answered, self._stage = request, "unmask"
        return {**{node: self._shares[node][0] for node in active}, **{node: self._shares[node][1] for node in dead}}

    def to_bytes(self) -> bytes:
        """The whole state, secret keys included (for the merchant's own ``context.state`` only)."""
        state = {"node_id": self.node_id, "threshold": self.threshold, "bits": self.bits, "stage": self._stage,
                 "secrets": {name: _b64(value) for name, value in self._secrets.items()},
                 "neighbour_keys": {str(node): [_b64(key) for key in pair]
                                    for node, pair in self._neighbour_keys.items()},
                 "shares": {str(node): [_b64(share) for share in pair] for node, pair in self._shares.items()},
                 "answered": self._answered}
        return json.dumps(state, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> MerchantSecAgg:
        """The merchant ``to_bytes`` wrote; SecAggFailed if ``data`` is not one."""
        try:
            state = json.loads(data)
            answered = state["answered"]
            merchant = cls(
                node_id=int(state["node_id"]), threshold=int(state["threshold"]), bits=int(state["bits"]),
                secrets={name: _unb64(value) for name, value in state["secrets"].items()}, stage=state["stage"],
                neighbour_keys={int(node): tuple(_unb64(key) for key in pair)
                                for node, pair in state["neighbour_keys"].items()},
                shares={int(node): tuple(_unb64(share) for share in pair) for node, pair in state["shares"].items()},
                answered=None if answered is None else ([int(n) for n in answered[0]], [int(n) for n in answered[1]]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise SecAggFailed(f"state: not a stored SecAgg+ merchant ({type(exc).__name__}: {exc})") from None
        if merchant._stage not in STAGES or set(merchant._secrets) != {"seed", "enc_sk", "enc_pk", "mask_sk",
                                                                       "mask_pk"}:
            raise SecAggFailed("state: not a stored SecAgg+ merchant (unknown stage or keys)")
        return merchant

    def _expect(self, stage: str) -> None:
        done = STAGES[STAGES.index(stage) - 1]
        if self._stage != done:
            raise SecAggFailed(f"{stage}: node {self.node_id} is past {self._stage}, not {done}; each stage runs once, "
                               f"in order")


class AggregatorSecAgg:
    """The aggregator's side of one secure sum of ``length``-long vectors mod ``2**bits`` over ``nodes``: it relays
    keys and encrypted shares between neighbours, sums the masked vectors, and rebuilds from the survivors' shares
    what takes the masks off. It sees neither a merchant's vector nor the secrets that would unmask one.

    Each stage's replies come in (``add_*``) before the next stage's messages go out (``*_for``, ``unmask_request``):
    the first of those closes the stage, and a late reply is refused. Keeps a running sum, not the vectors."""

    def __init__(self, *, nodes: Sequence[int], length: int, bits: int, degree: int | None = None,
                 threshold: int | None = None):
        """``degree``: each node's neighbours on the ring (None: all others); ``threshold``: shares that rebuild a
        secret (None: ``default_threshold``; at least that, at most a neighbourhood)."""
        _check_bits(bits)
        if len(set(nodes)) < MIN_NODES:
            raise SecAggFailed(f"setup: secure aggregation needs at least {MIN_NODES} merchants, got {len(set(nodes))}")
        if length < 1:
            raise SecAggFailed(f"setup: vectors of length {length}")
        self.length, self.bits = int(length), bits
        self.neighbours: dict[int, tuple[int, ...]] = neighbours(nodes, degree=degree)
        width = len(next(iter(self.neighbours.values())))
        least = default_threshold(width)
        self.threshold: int = least if threshold is None else int(threshold)
        if not least <= self.threshold <= width + 1:
            raise SecAggFailed(f"setup: threshold {threshold} is not a strict majority of a neighbourhood of "
                               f"{width + 1} nodes ({least} to {width + 1})")
        self.survivors: list[int] = []
        self._stage = "setup"  # the stage whose replies are coming in
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._sum = np.zeros(self.length, dtype=np.uint64)
        self._answers: dict[int, dict[int, bytes]] = {}

    def add_public_keys(self, node: int, keys: tuple[bytes, bytes]) -> None:
        """Node ``node``'s (encryption, masking) public keys."""
        self._accept("setup", node, self._keys)
        pair = (bytes(keys[0]), bytes(keys[1]))
        for key in pair:
            _public_key(key, "setup", node)
        self._keys[node] = pair

    def keys_for(self, node: int) -> dict[int, tuple[bytes, bytes]]:
        """The public keys of ``node``'s neighbours that sent theirs (closes the setup stage)."""
        self._close("setup", node, self._keys)
        return {other: self._keys[other] for other in self.neighbours[node] if other in self._keys}

    def add_ciphertexts(self, node: int, ciphertexts: dict[int, bytes]) -> None:
        """Node ``node``'s encrypted shares, {destination: ciphertext}: one for each neighbour it got keys of."""
        self._accept("share_keys", node, self._ciphertexts)
        if node not in self._keys:
            raise SecAggFailed(f"share_keys: node {node} sent shares but no keys")
        got, expected = sorted(int(other) for other in ciphertexts), sorted(self.keys_for(node))
        if got != expected:
            raise SecAggFailed(f"share_keys: node {node} sent shares for nodes {got}, expected {expected}")
        self._ciphertexts[node] = {int(other): bytes(text) for other, text in ciphertexts.items()}

    def ciphertexts_for(self, node: int) -> dict[int, bytes]:
        """{source: ciphertext}: the shares addressed to ``node`` (closes the share_keys stage)."""
        self._close("share_keys", node, self._ciphertexts)
        return {other: self._ciphertexts[other][node] for other in self.neighbours[node] if other in self._ciphertexts}

    def add_masked(self, node: int, vector: np.ndarray) -> None:
        """Node ``node``'s masked vector: ``length`` integers in ``[0, 2**bits)``."""
        self._accept("mask", node, set(self.survivors))
        if node not in self._ciphertexts:
            raise SecAggFailed(f"mask: node {node} sent a masked vector but no shares")
        array = np.asarray(vector)
        if array.shape != (self.length,) or not np.issubdtype(array.dtype, np.integer):
            raise SecAggFailed(f"mask: node {node} sent a {array.dtype} vector of shape {array.shape}, expected "
                               f"{self.length} integers")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= 2**self.bits):
            raise SecAggFailed(f"mask: node {node} sent values outside [0, 2**{self.bits})")
        self._sum += array.astype(np.uint64)
        self.survivors = sorted([*self.survivors, node])

    def unmask_request(self, node: int) -> tuple[list[int], list[int]]:
        """(active, dead) for survivor ``node``: itself and its neighbours that masked; its neighbours that shared
        their keys but sent no masked vector (closes the mask stage)."""
        self._close("mask", node, set(self.survivors))
        active = sorted([node, *(other for other in self.neighbours[node] if other in self.survivors)])
        return active, [other for other in self.neighbours[node] if other in self._dead()]

    def add_shares(self, node: int, shares: dict[int, bytes]) -> None:
        """Survivor ``node``'s answer to its ``unmask_request``: {node asked for: share}."""
        self._accept("unmask", node, self._answers)
        if node not in self.survivors:
            raise SecAggFailed(f"unmask: node {node} sent shares but no masked vector")
        got, expected = sorted(int(other) for other in shares), sorted(sum(self.unmask_request(node), []))
        if got != expected:
            raise SecAggFailed(f"unmask: node {node} sent shares of nodes {got}, expected {expected}")
        self._answers[node] = {int(other): bytes(share) for other, share in shares.items()}

    def check(self, stage: str) -> None:
        """SecAggFailed if too few nodes are left after ``stage`` (one of STAGES) for the sum to come out: each node
        still in needs ``threshold - 1`` neighbours still in; after masking, each survivor needs that many surviving
        neighbours, and each node dead since sharing its keys ``threshold`` of them; after unmasking, each of those
        secrets needs ``threshold`` shares."""
        if stage not in STAGES:
            raise ValueError(f"unknown SecAgg+ stage {stage!r} (one of {STAGES})")
        left = {"setup": set(self._keys), "share_keys": set(self._ciphertexts)}.get(stage, set(self.survivors))
        if not left:
            raise SecAggFailed(f"{stage}: no merchant is left")
        t = self.threshold
        if stage in ("setup", "share_keys", "mask"):
            for node in sorted(left):
                have = sum(other in left for other in self.neighbours[node])
                if have < t - 1:
                    raise SecAggFailed(f"{stage}: {have} of {len(self.neighbours[node])} neighbours of node {node} "
                                       f"are left, {t - 1} needed")
        if stage == "mask":
            for node in self._dead():
                have = sum(other in left for other in self.neighbours[node])
                if have < t:
                    raise SecAggFailed(f"mask: node {node} dropped after sharing its keys and {have} of its "
                                       f"{len(self.neighbours[node])} neighbours are left to rebuild them, {t} needed")
        if stage == "unmask":
            for node in [*self.survivors, *self._dead()]:
                holders = [other for other in (node, *self.neighbours[node]) if other in self.survivors]
                have = sum(other in self._answers for other in holders)
                if have < t:
                    raise SecAggFailed(f"unmask: {have} of {len(holders)} share holders of node {node} answered, "
                                       f"{t} needed")

    def result(self) -> np.ndarray:
        """The sum of the survivors' vectors mod ``2**bits``, as signed int64 (``signed``)."""
        if self._stage != "unmask":
            raise SecAggFailed(f"unmask: the sum is not ready (the {self._stage} stage is still open)")
        self.check("unmask")
        total = self._sum.copy()
        for node in self.survivors:
            seed = self._rebuild(node)
            if len(seed) != SEED_BYTES:
                raise SecAggFailed(f"unmask: node {node}'s mask seed rebuilt to {len(seed)} bytes, not {SEED_BYTES}")
            total -= _mask(seed, PRIVATE_LABEL, self.length, self.bits)
        for node in self._dead():
            try:
                secret = bytes_to_private_key(self._rebuild(node))
                rebuilt = public_key_to_bytes(secret.public_key())
            except (ValueError, TypeError, UnsupportedAlgorithm):
                rebuilt = None
            if rebuilt != self._keys[node][1]:
                raise SecAggFailed(f"unmask: node {node}'s masking key does not rebuild from its shares")
            for other in self.neighbours[node]:
                if other in self.survivors:
                    pairwise = _pairwise(secret, self._keys[other][1], other, self.length, self.bits, "unmask")
                    total = total - pairwise if other > node else total + pairwise
        return signed(total, self.bits)

    def _rebuild(self, node: int) -> bytes:
        shares = [answer[node] for answer in self._answers.values() if node in answer][:self.threshold]
        try:
            return shamir_combine(shares)
        except (ValueError, IndexError):
            raise SecAggFailed(f"unmask: node {node}'s shares do not combine") from None

    def _dead(self) -> list[int]:
        return sorted(set(self._ciphertexts) - set(self.survivors)) if self._stage in ("mask", "unmask") else []

    def _accept(self, stage: str, node: int, seen) -> None:
        if node not in self.neighbours:
            raise SecAggFailed(f"{stage}: node {node} is not in this secure sum")
        if self._stage != stage:
            raise SecAggFailed(f"{stage}: node {node}'s reply came while the {self._stage} stage was open")
        if node in seen:
            raise SecAggFailed(f"{stage}: node {node} answered twice")

    def _close(self, stage: str, node: int, replied) -> None:
        if self._stage == stage:
            self._stage = STAGES[STAGES.index(stage) + 1]
        elif STAGES.index(self._stage) <= STAGES.index(stage):
            raise SecAggFailed(f"{STAGES[STAGES.index(stage) + 1]}: asked before the {stage} stage's replies")
        if node not in replied:
            raise SecAggFailed(f"{stage}: node {node} sent no reply, so it takes no further part")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise SecAggFailed(f"setup: sums mod 2**bits take bits from 1 to {MAX_BITS}, got {bits}")


def _low(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _reduced(vector: np.ndarray, bits: int, stage: str) -> np.ndarray:
    """An integer vector's values mod ``2**bits``, as uint64 (negative values wrap)."""
    array = np.asarray(vector)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise SecAggFailed(f"{stage}: expected a 1-D integer vector, got {array.dtype} of shape {array.shape}")
    words = array.astype(np.uint64) if np.issubdtype(array.dtype, np.unsignedinteger) else \
        array.astype(np.int64).view(np.uint64)
    return words & _low(bits)


def _mask(secret: bytes, label: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform values mod ``2**bits`` (uint64): AES-256-CTR under HKDF-SHA256(``secret``, info=``label``)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(secret)
    word = wire_dtype(bits)
    stream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(length * word.itemsize))
    return np.frombuffer(stream, dtype=word).astype(np.uint64) & _low(bits)


def _pairwise(private, public: bytes, node: int, length: int, bits: int, stage: str) -> np.ndarray:
    """The pairwise mask between the owner of ``private`` and ``node`` (whose masking public key is ``public``)."""
    return _mask(_ecdh(private, _public_key(public, stage, node), stage, node), PAIRWISE_LABEL, length, bits)


def _public_key(data: bytes, stage: str, node: int) -> ec.EllipticCurvePublicKey:
    try:
        key = bytes_to_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SecAggFailed(f"{stage}: node {node}'s public key is not an elliptic-curve key in PEM")
    return key


def _ecdh(private, public, stage: str, node: int) -> bytes:
    try:
        return shared_key(private, public)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SecAggFailed(f"{stage}: no key agreement with node {node}'s public key (another curve)") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)
