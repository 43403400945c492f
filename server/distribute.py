"""The end of a federation: the aggregator writes the final global model as a bundle (common/recommend/bundle.py) into
its state directory and sends the bundle's files to every connected merchant (Flower message ``query.model``), who
writes the same bundle into its own state directory. Re-sending the model is post-processing: no ε."""

from __future__ import annotations

import math
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid

from fedaug.common.config import FederationConfig, FederationSection
from fedaug.common.data import ItemCatalog
from fedaug.common.data.source import event_schema
from fedaug.common.model.evaluate import SASRecScorer
from fedaug.common.model.sasrec import SASRec
from fedaug.common.priors.composite import compose
from fedaug.common.priors.dp_counts import ReleaseRule
from fedaug.common.priors.text_prior import TextPrior
from fedaug.common.protocol.messages import MODEL, ModelDelivery, ModelReceipt, ProtocolError
from fedaug.common.recommend.bundle import bundle_files, bundle_hash, write_bundle_files
from fedaug.common.records import merchant_name
from fedaug.server.checkpoint import ServerState

MODEL_DIR = "model"


def final_bundle(model: SASRec, state: ServerState, catalog: ItemCatalog, config: FederationConfig, *,
                 prior: TextPrior | None = None, neighbours: np.ndarray | None = None,
                 candidate: bool = False) -> dict[str, bytes]:
    """The model every merchant receives: the final global model composed with the public text prior and the
    merchants' summed DP statistics (their serve release) by public rules (fedaug.common.priors.composite), the model at
    the weight the federated DP evaluation chose (``state.selection``; none: left out), over the public catalog; its
    card names each part, its weight and the ε behind it. ``candidate``: the model the merchants evaluate for
    that choice instead — the fit counts (no validation item in them), the model's weight left to them."""
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.arrays.items()})
    settings = config.federation
    statistics = None if state.statistics is None else state.statistics.fit if candidate else state.statistics.serve
    scorer, parts = compose(SASRecScorer(model.cpu().eval(), "cpu"), prior, statistics, neighbours,
                            ReleaseRule.from_section(settings), evaluation=None if candidate else state.selection)
    epsilons = [m["epsilon"] for m in state.merchants.values() if m.get("epsilon", -1) >= 0]
    epsilon = max(epsilons, default=None)
    private = epsilon is not None and math.isfinite(epsilon)
    if "statistics" in parts:
        parts["statistics"]["merchants"] = state.statistics_merchants
        parts["statistics"]["epsilon_share"] = settings.statistics_share if private else None
        parts["statistics"]["release"] = state.statistics_release
    parts["model"] |= {"rounds": state.round, "merchants": len(state.merchants)}
    delta = config.privacy.delta
    return bundle_files(scorer, catalog,
                        trained={"mode": "federated", "rounds": state.round, "round": state.round,
                                 "merchants": len(state.merchants), "run_key": state.run_key},
                        privacy=_privacy(settings, state, epsilon, delta) if private else None,
                        parts=parts, text_encoder=_encoder(config) if prior is not None else None,
                        schema=event_schema(config.data))


SECURE_ASSUMPTIONS = ("each user shops at one merchant", "the aggregator follows the protocol",
                      "at most T merchants drop out or collude with the aggregator")
"""What a release through secure aggregation with pooled noise assumes (README, "Secure aggregation")."""


def _privacy(settings: FederationSection, state: ServerState, epsilon: float, delta: float | None) -> dict:
    how = state.statistics_release or {}
    secured = how.get("secure_aggregation") is not None
    out = {"epsilon": epsilon, "delta": delta if delta is not None else "1/(10·users)", "unit": "user",
           "accountant": ("RDP (a Skellam release is accounted by its Rényi-DP bound), composed over every release"
                          if secured else "min(PRV, RDP), composed over every release"),
           "noise": how.get("noise", "local"), "releases": _releases(settings, state)}
    if secured:
        out["secure_aggregation"] = how | {"assumes": list(SECURE_ASSUMPTIONS)}
    return out


def _releases(settings: FederationSection, state: ServerState) -> list[dict]:
    """Every release behind the model in the order the merchants' ledgers record them, each with the largest ε a
    merchant reported after it (the ledgers compose them all; the last is the model's ε)."""
    out = []
    evaluated = state.selection is not None
    if state.statistics is not None:
        out.append({"release": ("the federated DP evaluation's reservation (Gaussian, 1 release, "
                                f"{settings.selection_share:g} of the budget) and " if evaluated else "")
                    + f"DP statistics (popularity and transition counts, {_mechanism(state)}, 4 releases, "
                      f"{settings.statistics_share:g} of what was left)",
                    "epsilon_after": state.statistics_epsilon})
    by_round = [m.get("epsilon_by_round", {}) for m in state.merchants.values()]
    last = max((float(r[str(state.round)]) for r in by_round if str(state.round) in r), default=None)
    out.append({"release": f"DP-SGD updates ({state.round} rounds)", "epsilon_after": last})
    if evaluated:
        out.append({"release": "the federated DP evaluation's figures (its reserved release, sent once)",
                    "epsilon_after": last, "merchants": state.selection.get("merchants")})
    return out


def _mechanism(state: ServerState) -> str:
    how = state.statistics_release or {}
    if how.get("secure_aggregation") is None:
        return "Gaussian, each merchant's own"
    noise = {"pooled": "pooled: each merchant added a share of one noise",
             "local": "each merchant added a whole noise", "none": "no noise"}[how["noise"]]
    return (f"Skellam through secure aggregation ({noise}; {how['survivors']} of {how['merchants']} merchants "
            f"summed, T = {how['tolerated']})")


def _encoder(config: FederationConfig) -> str:
    return "packaged" if config.text.encoder is None else str(Path(config.text.encoder).resolve())


def distribute_model(grid: Grid, settings: FederationSection, files: dict[str, bytes]) -> list[int]:
    """Write the bundle to ``settings.state_dir/model`` and send it to every connected merchant; the nodes that
    confirmed holding the same bundle (same content hash)."""
    path = write_bundle_files(Path(settings.state_dir) / MODEL_DIR, files)
    expected = bundle_hash(path)
    delivery = ModelDelivery(dict(files))
    messages = [Message(delivery.encode(), dst_node_id=node, message_type=MODEL) for node in grid.get_node_ids()]
    confirmed = []
    for reply in grid.send_and_receive(messages, timeout=settings.round_timeout):
        node = reply.metadata.src_node_id
        name = merchant_name(node, None, settings.names)
        if reply.has_error():
            log(WARNING, "fedaug model: %s could not store the final model (%s)", name, reply.error.reason)
        elif (problem := _receipt_problem(reply, expected)) is not None:
            log(WARNING, "fedaug model: %s %s", name, problem)
        else:
            confirmed.append(node)
    log(INFO, "fedaug: the final model (%s) is with %d of %d merchants", path, len(confirmed), len(messages))
    return confirmed


def _receipt_problem(reply: Message, expected: str) -> str | None:
    """Why a merchant's receipt does not confirm the bundle hashed ``expected``, or None."""
    try:
        receipt = ModelReceipt.decode(reply.content)
    except ProtocolError as exc:
        return f"sent no readable receipt ({exc})"
    return None if receipt.bundle_hash == expected else "stored a different bundle"
