"""The end of a federation: the aggregator writes the final global model as a bundle (common/bundle.py) into its
state directory and sends the bundle's files to every connected merchant (Flower message ``query.model``), who
writes the same bundle into its own state directory. Re-sending the model is post-processing: no ε."""

from __future__ import annotations

import math
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.bundle import bundle_files, bundle_hash, write_bundle_files
from common.config import FederationSection
from common.data import ItemCatalog
from common.evaluate import SASRecScorer
from common.model import SASRec
from common.records import merchant_name

from .checkpoint import ServerState

QUERY = "query.model"
MODEL_DIR = "model"


def final_bundle(model: SASRec, state: ServerState, catalog: ItemCatalog, delta) -> dict[str, bytes]:
    """The final global model over the public catalog, with what trained it and the merchants' largest ε."""
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.arrays.items()})
    epsilons = [m["epsilon"] for m in state.merchants.values() if m.get("epsilon", -1) >= 0]
    epsilon = max(epsilons, default=None)
    private = epsilon is not None and math.isfinite(epsilon)
    return bundle_files(SASRecScorer(model.cpu().eval(), "cpu"), catalog,
                        trained={"mode": "federated", "rounds": state.round, "round": state.round,
                                 "merchants": len(state.merchants), "run_key": state.run_key},
                        privacy={"epsilon": epsilon, "delta": delta if delta is not None else "1/(10·users)",
                                 "unit": "user", "accountant": "min(PRV, RDP), composed over every release"}
                        if private else None)


def distribute_model(grid: Grid, settings: FederationSection, files: dict[str, bytes]) -> list[int]:
    """Write the bundle to ``settings.state_dir/model`` and send it to every connected merchant; the nodes that
    confirmed holding the same bundle (same content hash)."""
    path = write_bundle_files(Path(settings.state_dir) / MODEL_DIR, files)
    expected = bundle_hash(path)
    record = ConfigRecord({name: data for name, data in files.items()})
    messages = [Message(RecordDict({"bundle": record}), dst_node_id=node, message_type=QUERY)
                for node in grid.get_node_ids()]
    confirmed = []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        node = reply.metadata.src_node_id
        name = merchant_name(node, None, settings.names)
        if reply.has_error():
            log(WARNING, "fedaug model: %s could not store the final model (%s)", name, reply.error.reason)
        elif str(reply.content["bundle"].get("hash", "")) != expected:
            log(WARNING, "fedaug model: %s stored a different bundle", name)
        else:
            confirmed.append(node)
    log(INFO, "fedaug: the final model (%s) is with %d of %d merchants", path, len(confirmed), len(messages))
    return confirmed
