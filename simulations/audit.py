"""`fedaug audit`: an empirical lower bound on ε from one training run (Steinke, Nasr & Jagielski, 2023).

M canary users — random item chains no real user has — are each added to a merchant's training data with
probability ½, and the merchant trains exactly as it would (same trainer, DP settings, rounds). Every canary is
then scored by the trained model's log-likelihood of its chain. The auditor guesses "in" for the r/2 best-scored
canaries and "out" for the r/2 worst, abstaining on the rest. If training is (ε, δ)-DP, the number of correct
guesses is stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) (plus a δ term), so a count that would be
too unlikely under ε refutes it: the largest such ε at 95% confidence is the lower bound ε_lb. A correct
implementation has ε_lb ≤ ε; a non-private one lets the auditor see memorised canaries (ε_lb well above 0).
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from fedaug.client.ledger import PrivacyLedger
from fedaug.client.trainer import build_trainer
from fedaug.common.atomic import write_bytes_atomic, write_json_atomic
from fedaug.common.config import MerchantRunConfig
from fedaug.common.data import BehaviorData
from fedaug.common.data.source import load_catalog_data, load_data
from fedaug.common.data.split import leave_one_out
from fedaug.common.errors import ConfigError, FedaugError
from fedaug.common.model.build import build_model, train_features
from fedaug.common.model.device import pick_device
from fedaug.common.model.metrics import json_number
from fedaug.common.model.training import set_seed
from fedaug.common.records import OnRound, RoundRecord
from fedaug.runtime.export import CATALOG_FILE, events_frame, write_catalog_tsv
from fedaug.server import checkpoint
from fedaug.simulations.scenario import SimulationConfig
from fedaug.simulations.simulate import run_simulate


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] for an (ε, δ)-DP mechanism over m canaries each included with probability ½
    (Steinke et al. 2023, Theorem 3.3): the ε-randomised-response tail plus the δ term."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0:
        return min(tail, 1.0)
    worst, below = 0.0, 0.0
    for i in range(1, v + 1):  # max over i of P[v - i <= Binomial(r, q) < v] / i
        below += float(stats.binom.pmf(v - i, r, q))
        worst = max(worst, below / i)
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that v correct guesses of r refute at ``confidence`` (0 when none is refuted)."""
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < alpha:  # p grows with ε: find an ε the data cannot refute
        low, high = high, high * 2
        if high > 1e3:
            return math.inf
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < alpha else (low, middle)
    return low


def guess(scores: np.ndarray, included: np.ndarray, guesses: int) -> tuple[int, int]:
    """Guess "in" for the guesses/2 highest scores, "out" for the guesses/2 lowest; (r, v) = (guesses, correct)."""
    order = np.argsort(scores, kind="stable")
    half = guesses // 2
    guessed_out, guessed_in = order[:half], order[len(order) - (guesses - half):]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    return guesses, correct


def make_canaries(n_items: int, count: int, length: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random chains of distinct catalog items: sequences no real user follows, so only membership explains a
    model that finds them likely."""
    if length > n_items:
        raise ConfigError(f"--canary-length: {length} is longer than the catalog ({n_items} items)")
    return [rng.choice(np.arange(1, n_items + 1), size=length, replace=False) for _ in range(count)]


@torch.no_grad()
def chain_log_likelihood(model, chains: list[np.ndarray], device: torch.device, batch: int = 256) -> np.ndarray:
    """Mean log-probability the model gives each chain's next items (teacher forcing), one score per chain."""
    model.eval()
    scores = []
    max_len = model.cfg.max_len
    for start in range(0, len(chains), batch):
        part = [c[-(max_len + 1):] for c in chains[start:start + batch]]
        width = max(len(c) for c in part) - 1
        items = torch.zeros((len(part), width), dtype=torch.long)
        targets = torch.zeros((len(part), width), dtype=torch.long)
        for row, chain in enumerate(part):
            items[row, :len(chain) - 1] = torch.as_tensor(chain[:-1])
            targets[row, :len(chain) - 1] = torch.as_tensor(chain[1:])
        logits = model(items.to(device)).float()
        logp = torch.log_softmax(logits[..., 1:], dim=-1)  # item 0 is padding, never a target
        mask = (targets > 0).to(device)
        picked = logp.gather(-1, (targets.to(device) - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append(((picked * mask).sum(1) / mask.sum(1)).cpu().numpy())
    return np.concatenate(scores)


def run_audit(config: MerchantRunConfig, canaries: int, out: Path, *, guesses: int | None = None,
              canary_length: int = 20, confidence: float = 0.95, seed: int = 0,
              on_round: OnRound | None = None) -> dict:
    """Train one merchant on its data plus the included canaries; write ``out/audit.json`` and the plot."""
    started = time.monotonic()
    guesses = _guess_count(canaries, guesses)
    rng = np.random.default_rng(seed)
    device = pick_device(config.device)
    data = load_data(config.data, config.synthetic)
    split = leave_one_out(data)
    chains = make_canaries(data.n_items, canaries, canary_length, rng)
    included = rng.random(canaries) < 0.5
    train = split.train.sequences() + [c for c, inside in zip(chains, included, strict=True) if inside]
    out = Path(out)
    features = train_features(config.model, split)
    if features is not None:  # a canary's events have no type or time: unknown side features
        width = features[0].shape[1] if features else 0
        features += [np.zeros((len(c), width), np.float32) for c, inside in zip(chains, included, strict=True)
                     if inside]
    trainer = build_trainer(config.recipe, train, data.n_items, rounds=config.local.rounds, seed=config.local.seed,
                            state_dir=out / "state", device=device, features=features)
    set_seed(config.local.seed)
    model = build_model(config.model, data).to(device)
    run_id = uuid.uuid4().hex
    for round_ in range(1, config.local.rounds + 1):
        result = trainer.train_round(model, run_id, round_)
        if on_round:
            on_round(round_, config.local.rounds, RoundRecord(round=round_, train_loss=result.train_loss,
                                                              epsilon_max=result.epsilon, seconds=result.seconds))
    scores = chain_log_likelihood(model, chains, device)
    return _conclude(out, scores, included, guesses, confidence, trainer.epsilon_spent(),
                     trainer.delta if config.privacy.private else 0.0,
                     {"path": "merchant", "canary_length": canary_length, "rounds": config.local.rounds,
                      "users": data.n_users, "seconds": round(time.monotonic() - started, 2),
                      "config": config.model_dump(mode="json")})


def run_federated_audit(config: SimulationConfig, canaries: int, out: Path, *, canary_merchant: int = 0,
                        guesses: int | None = None, canary_length: int = 20, confidence: float = 0.95,
                        seed: int = 0, on_round: OnRound | None = None) -> dict:
    """The audit through the federated path: the included canaries become users of one simulated merchant, the
    very ServerApp and ClientApp train for [federation] rounds in Flower's simulation engine (``out/federation``),
    and the final global model — what the merchant's updates are released into — is scored. The claim audited is
    that merchant's ε from its own ledger."""
    started = time.monotonic()
    guesses = _guess_count(canaries, guesses)
    rng = np.random.default_rng(seed)
    data = config.assigned(load_data(config.data, config.synthetic))
    n_merchants = int(data.merchant.max()) + 1
    if not 0 <= canary_merchant < n_merchants:
        raise ConfigError(f"--canary-merchant: must be between 0 and {n_merchants - 1}, got {canary_merchant}")
    chains = make_canaries(data.n_items, canaries, canary_length, rng)
    included = rng.random(canaries) < 0.5
    out = Path(out)
    federated = _with_canaries(config, data, [c for c, inside in zip(chains, included, strict=True) if inside],
                               canary_merchant, out / "data")
    metrics = run_simulate(federated, out / "federation", on_round=on_round)
    state_dir = out / "federation" / "state"
    catalog = load_catalog_data(federated.data)
    if not np.array_equal(catalog.catalog.raw_ids, data.catalog.raw_ids):  # the canaries' ids must mean the same
        raise ConfigError(f"{out / 'data' / CATALOG_FILE}: catalog read back numbers items differently")
    model = build_model(federated.model, catalog)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in checkpoint.load(state_dir).arrays.items()})
    device = pick_device(config.device)
    scores = chain_log_likelihood(model.to(device), chains, device)
    epsilon, delta = math.inf, 0.0
    if config.privacy.private:
        ledger = PrivacyLedger(state_dir / f"merchant-{canary_merchant}")
        delta = ledger.entries()[-1].delta
        epsilon = ledger.epsilon(delta)
        ledger.close()
    users = next(m.users for m in metrics.merchants if m.merchant == canary_merchant)
    return _conclude(out, scores, included, guesses, confidence, epsilon, delta,
                     {"path": "federated", "merchants": n_merchants, "canary_merchant": canary_merchant,
                      "canary_merchant_users": users, "canary_length": canary_length,
                      "rounds": config.federation.rounds, "test": metrics.test,
                      "seconds": round(time.monotonic() - started, 2), "config": federated.model_dump(mode="json")})


def _with_canaries(config: SimulationConfig, data: BehaviorData, canaries: list[np.ndarray], merchant: int,
                   data_dir: Path) -> SimulationConfig:
    """The simulation config over ``data`` (merchants assigned) plus ``canaries`` as users of ``merchant``, written
    as an events file with a merchant_id column and the data's catalog (so item numbering and attributes stay)."""
    width = len(str(int(data.merchant.max())))
    names = np.array([f"merchant-{m:0{width}d}" for m in range(int(data.merchant.max()) + 1)])  # sorts as numbers
    frame = events_frame(data)
    frame["merchant_id"] = names[data.merchant[data.event_user()]]
    lengths = [len(c) for c in canaries]
    if data.user_ids.dtype == object:  # text ids: the canaries' own names
        ids = np.array([f"fedaug-canary-{k}" for k in range(len(canaries))], dtype=object)
        if set(ids.tolist()) & set(data.user_ids.tolist()):
            raise FedaugError("the data already has users named fedaug-canary-N; the audit cannot add its own")
    else:  # integer ids: the canaries come after them all
        first = int(data.user_ids.max()) + 1
        ids = np.arange(first, first + len(canaries))
    extra = pd.DataFrame({"user_id": np.repeat(ids, lengths),
                          "item_id": data.catalog.raw_ids[np.concatenate(canaries)] if canaries else [],
                          "timestamp": np.arange(sum(lengths), dtype=np.int64), "merchant_id": names[merchant]})
    for column in frame.columns.difference(extra.columns):  # event type, context: the data's most common value
        extra[column] = frame[column].mode().iloc[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    write_catalog_tsv(data.catalog, data_dir / CATALOG_FILE)
    write_bytes_atomic(data_dir / "events.csv", pd.concat([frame, extra[frame.columns]]).to_csv(index=False).encode())
    return config.changed(data={"path": data_dir / "events.csv", "format": "events", "catalog": data_dir / CATALOG_FILE,
                                "timestamps": None, "attributes": None, "k_core": None, "columns": None,
                                "events": None},  # written under the standard names
                          simulation={"partition": "column", "merchants": len(names), "mode": "federated"})


def _guess_count(canaries: int, guesses: int | None) -> int:
    if canaries < 2:
        raise ConfigError(f"--canaries: need at least 2, got {canaries}")
    guesses = guesses or max(2, canaries // 5)
    if not 1 <= guesses <= canaries:
        raise ConfigError(f"--guesses: must be between 1 and --canaries ({canaries}), got {guesses}")
    return guesses


def _conclude(out: Path, scores: np.ndarray, included: np.ndarray, guesses: int, confidence: float,
              epsilon: float, delta: float, details: dict) -> dict:
    """Guess, bound ε, write ``out/audit.json`` and ``out/audit.png``."""
    r, v = guess(scores, included, guesses)
    lower = epsilon_lower_bound(len(scores), r, v, delta, confidence)
    audit = {"epsilon_claimed": json_number(epsilon), "delta": delta, "epsilon_lower_bound": json_number(lower),
             "canaries": len(scores), "guesses": r, "correct": v, "confidence": confidence,
             "included": int(included.sum())} | details
    write_json_atomic(out / "audit.json", audit)
    _plot(scores, included, audit, out / "audit.png")
    return audit


def _plot(scores: np.ndarray, included: np.ndarray, audit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(scores.min(), scores.max(), 40)
    ax.hist(scores[included], bins=bins, alpha=0.6, label=f"trained on ({included.sum()})")
    ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"left out ({(~included).sum()})")
    ax.set_xlabel("canary score: mean log-likelihood of its chain")
    ax.set_ylabel("canaries")
    claimed, lower = (_text(audit[k]) for k in ("epsilon_claimed", "epsilon_lower_bound"))
    ax.set_title(f"ε claimed {claimed}, empirical lower bound {lower} "
                 f"({audit['correct']}/{audit['guesses']} guesses right)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _text(epsilon) -> str:
    return epsilon if isinstance(epsilon, str) else f"{epsilon:.3f}"
