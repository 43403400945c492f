"""Flower's private API, in one place.

Flower's documented API is the ``__all__`` of the packages in ``PUBLIC``; the rest of the code imports those
directly. Everything else we use — the simulation engine's in-process entry point and the run identity it needs,
the Ray actor pool's sizing, the privacy accountant behind Flower's own DP strategies, the type of a ClientApp mod —
lives in Flower's internals (``flwr.supercore``, ``flwr.server.superlink``, ``flwr.simulation.ray_transport``,
underscored names, undocumented submodules), which any Flower release may move. Those names are re-exported here,
under our own names, and nowhere else (tests/test_boundaries.py checks both).

Each is resolved when first imported from here, so a merchant that never simulates never loads Ray; a Flower
upgrade that moved one fails with ``FlowerMoved`` naming it, where it was looked for and the installed Flower
version — on the first import, and in tests/test_boundaries.py, which resolves every one.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version

PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation", "flwr.common")
"""Flower's documented packages: a name in one's ``__all__`` is public API."""

PRIVATE: dict[str, tuple[str, str]] = {
    # the type of a ClientApp mod (flwr.clientapp exports only ClientApp and mod)
    "Mod": ("flwr.clientapp.typing", "Mod"),
    "ClientAppCallable": ("flwr.clientapp.typing", "ClientAppCallable"),
    # the accountant Flower's server-side DP strategies are accounted with
    "NeighboringRelation": ("flwr.supercore.privacy_accounting", "NeighboringRelation"),
    "PrivacyConfig": ("flwr.supercore.privacy_accounting", "PrivacyConfig"),
    "SamplingMethod": ("flwr.supercore.privacy_accounting", "SamplingMethod"),
    "RdpAccountant": ("flwr.supercore.privacy_accounting.rdp_accountant", "RdpAccountant"),
    # the simulation engine run in this process (the public run_simulation takes no ServerApp context or run)
    "run_simulation_in_process": ("flwr.simulation.run_simulation", "_run_simulation"),
    "Run": ("flwr.supercore.run", "Run"),
    "TaskIdentity": ("flwr.supercore.task_identity", "TaskIdentity"),
    "random_id": ("flwr.server.superlink.linkstate.utils", "generate_rand_int_from_bytes"),
    "RUN_ID_NUM_BYTES": ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    "TASK_ID_NUM_BYTES": ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    "SUPERLINK_NODE_ID": ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    "NOOP_FEDERATION_ID": ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    # how many merchants Flower's Ray backend runs at once
    "ray_pool_size": ("flwr.simulation.ray_transport.ray_actor", "pool_size_from_resources"),
    # SecAgg+'s building blocks (fedaug.runtime.secagg): Shamir shares, ECDH + Fernet for the shares, key pairs
    "shamir_split": ("flwr.common.secure_aggregation.crypto.shamir", "create_shares"),
    "shamir_combine": ("flwr.common.secure_aggregation.crypto.shamir", "combine_shares"),
    "shared_key": ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "generate_shared_key"),
    "encrypt": ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "encrypt"),
    "decrypt": ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "decrypt"),
    "share_plaintext": ("flwr.common.secure_aggregation.secaggplus_utils", "share_keys_plaintext_concat"),
    "share_plaintext_parts": ("flwr.common.secure_aggregation.secaggplus_utils", "share_keys_plaintext_separate"),
    "generate_key_pair": ("flwr.supercore.primitives.asymmetric", "generate_key_pairs"),
    "private_key_to_bytes": ("flwr.supercore.primitives.asymmetric", "private_key_to_bytes"),
    "public_key_to_bytes": ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes"),
    "bytes_to_private_key": ("flwr.supercore.primitives.asymmetric", "bytes_to_private_key"),
    "bytes_to_public_key": ("flwr.supercore.primitives.asymmetric", "bytes_to_public_key"),
}
"""Our name -> (Flower module, Flower name)."""


class FlowerMoved(ImportError):
    """A Flower release no longer has a private name this module re-exports."""


def resolve(name: str):
    """The Flower object behind our ``name``, or FlowerMoved naming what moved and the installed Flower."""
    module, attribute = PRIVATE[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise FlowerMoved(f"Flower {version('flwr')} has no {module}.{attribute} (re-exported as "
                          f"fedaug.runtime.flower.{name}): a Flower upgrade moved its private API; point "
                          f"runtime/flower.py at the new place") from exc


def __getattr__(name: str):
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = resolve(name)
    return value

