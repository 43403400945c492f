"""Byzantine merchants, for robustness experiments in simulation (`fedaug simulate --attack ... --attackers F`).

A chosen fraction of merchants trains as usual and then lies:
- ``scale``: sends global + λ·(update − global), a boosted update that drags the average;
- ``signflip``: sends global − λ·(update − global), pushing the model the wrong way;
- ``noise``: sends global + Gaussian noise with λ times the honest update's norm;
- ``labelflip``: poisons its data instead: every item id goes through a fixed random permutation of the catalog, so
  it learns (and sends) transitions that are wrong for everyone else.
Which merchants attack is a seeded choice over partition ids, so every process of a run agrees. None of this is in
the production ClientApp: simulations/apps.py attaches it (poisoned data at loading, ``poison_mod`` around training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Context, Message

from fedaug.common.data import BehaviorData
from fedaug.common.protocol.messages import TrainInstruction, TrainReply, Update
from fedaug.runtime.flower import ClientAppCallable, Mod

ATTACKS = ("scale", "signflip", "noise", "labelflip")
UPDATE_ATTACKS = ("scale", "signflip", "noise")


def attackers(n_merchants: int, fraction: float, seed: int) -> set[int]:
    """Partition ids of the Byzantine merchants: round(fraction · n) of them, seeded."""
    count = int(round(fraction * n_merchants))
    return set(np.random.default_rng([seed, 7919]).choice(n_merchants, size=count, replace=False).tolist())


def poison_update(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], attack: str, scale: float,
                  seed: int) -> dict[str, torch.Tensor]:
    """The update an attacker sends instead of ``trained`` (both state dicts; ``start`` is the global model)."""
    deltas = {k: trained[k].float() - start[k].float() for k in trained}
    if attack == "scale":
        moved = {k: scale * d for k, d in deltas.items()}
    elif attack == "signflip":
        moved = {k: -scale * d for k, d in deltas.items()}
    elif attack == "noise":
        norm = torch.sqrt(sum((d ** 2).sum() for d in deltas.values()))
        size = sum(d.numel() for d in deltas.values())
        generator = torch.Generator().manual_seed(seed)
        sigma = scale * float(norm) / max(size, 1) ** 0.5
        moved = {k: sigma * torch.randn(d.shape, generator=generator) for k, d in deltas.items()}
    else:
        raise ValueError(f"not an update attack: {attack!r}")
    return {k: (start[k].float() + moved[k]).to(trained[k].dtype) for k in trained}


def flip_labels(data: BehaviorData, seed: int) -> BehaviorData:
    """``data`` with every item id replaced through one seeded random permutation of the catalog."""
    permutation = np.concatenate([[0], np.random.default_rng([seed, 104729]).permutation(data.n_items) + 1])
    return replace(data, items=permutation[data.items])


def poison_mod(attack_of: Callable[[Context], tuple[str, float]]) -> Mod:
    """A Flower mod around training: for a merchant ``attack_of(context)`` names an update attack for, the reply's
    update is replaced by the poisoned one (``attack_of`` returns ("", 0) for honest merchants)."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        attack, scale = attack_of(context)
        if attack not in UPDATE_ATTACKS or reply.has_error():
            return reply
        answer = TrainReply.decode(reply.content)
        if answer.update is None:  # declined: nothing to poison
            return reply
        instruction = TrainInstruction.decode(msg.content)
        base = instruction.arrays
        sent = {k: torch.from_numpy(v) for k, v in answer.update.weights({k: a.numpy() for k, a in base.items()})
                .items()}
        poisoned = poison_update(base.to_torch_state_dict(), sent, attack, scale, seed=instruction.server_round)
        # Sent as the honest merchants send theirs (compressed when the round asks for it).
        update = Update.of({k: v.numpy() for k, v in poisoned.items()}, base, instruction.compression)
        reply.content = replace(answer, update=update).encode()
        return reply

    return mod
