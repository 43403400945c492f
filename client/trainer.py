"""A merchant's local training round: augment, train with user-level DP-SGD (Opacus), account in the ledger.

The privacy unit is the user. Each user is one sample ``[views, positions]``: the original training sequence and
this round's augmented views. Their losses are averaged inside the sample, so Opacus clips one gradient per user,
and Poisson sampling over users (Opacus' default) makes the RDP accounting valid. ε composes over every round in
the ledger; noise is calibrated so that the planned rounds fit the remaining budget.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine

from common.augment import Augmenter, AugmentSettings
from common.batching import pad_right
from common.model import PerUserCrossEntropy, SASRec

from .ledger import BudgetExceeded, PrivacyLedger, calibrate_noise

GRAD_SAMPLE_MODES = ("ghost", "hooks")


@dataclass(frozen=True)
class PrivacySettings:
    epsilon: float = 8.0
    """Total budget of this merchant, over every round it will ever train; inf = non-private."""
    delta: float | None = None
    """Default 1 / (10 * local users)."""
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "ghost"
    planned_rounds: int = 1
    """Rounds this run plans to train; noise is calibrated so that they all fit in the remaining budget."""

    @property
    def private(self) -> bool:
        return not math.isinf(self.epsilon)

    def delta_for(self, n_users: int) -> float:
        return self.delta if self.delta is not None else 1.0 / (10 * max(n_users, 1))


@dataclass(frozen=True)
class LocalSettings:
    local_epochs: int = 1
    batch_size: int = 256
    """Expected users per step (Poisson sampling rate = batch_size / users)."""
    lr: float = 1e-3
    seed: int = 0


class UserViews:
    """This round's samples: for every user with a target, ``[1 + views, T]`` inputs and targets."""

    def __init__(self, sequences: list[np.ndarray], augmenter: Augmenter | None, max_len: int,
                 rng: np.random.Generator):
        usable = [s for s in sequences if len(s) >= 2]
        self.views = 1 + (augmenter.settings.views if augmenter and augmenter.settings.enabled else 0)
        windows = []
        for seq in usable:
            views = [seq] + (augmenter.views(seq, rng) if augmenter else [])
            views += [seq] * (self.views - len(views))  # keep a fixed number of views per user
            windows.extend(v[-(max_len + 1):] for v in views)
        inputs, lengths = pad_right([w[:-1] for w in windows], max_len)
        targets, _ = pad_right([w[1:] for w in windows], max_len)
        self.inputs = inputs.reshape(len(usable), self.views, -1)
        self.targets = targets.reshape(len(usable), self.views, -1)
        self.lengths = lengths.reshape(len(usable), self.views).max(axis=1)

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(self.lengths[rows].max(initial=0)), 1)
        return (torch.from_numpy(self.inputs[rows, :, :width]).to(device),
                torch.from_numpy(self.targets[rows, :, :width]).to(device))


@dataclass
class RoundResult:
    train_loss: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    num_examples: int
    augment_views: int


class LocalTrainer:
    """One merchant's trainer. ``train_round`` runs the local epochs and commits the round to the ledger."""

    def __init__(self, train_sequences: list[np.ndarray], n_items: int, privacy: PrivacySettings,
                 local: LocalSettings, augment: AugmentSettings | None, ledger: PrivacyLedger | None,
                 device: torch.device):
        if privacy.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
        if privacy.private and ledger is None:
            raise ValueError("private training needs a ledger")
        self.sequences = train_sequences
        self.n_users = sum(len(s) >= 2 for s in train_sequences)
        self.n_items = n_items
        self.privacy, self.local, self.augment = privacy, local, augment
        self.ledger = ledger
        self.device = device
        self.delta = privacy.delta_for(self.n_users)
        self._noise: dict[str, float] = {}
        self._augmenter_cache: tuple[int, Augmenter] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_users / self.local.batch_size))

    @property
    def sample_rate(self) -> float:
        """Poisson rate per step, as Opacus derives it from the loader: 1 / steps per epoch."""
        return 1.0 / self.steps_per_epoch

    @property
    def steps_per_round(self) -> int:
        return self.local.local_epochs * self.steps_per_epoch

    def epsilon_spent(self) -> float:
        return self.ledger.epsilon(self.delta) if self.ledger else (0.0 if self.privacy.private else math.inf)

    def noise_multiplier(self, run_id: str) -> float:
        """Noise for run ``run_id``, calibrated once so that all its planned rounds fit into the budget that was
        left before the run began (every other run's ledger entries).

        Derived from the ledger alone, so a merchant restarted mid-run picks the same noise. Raises BudgetExceeded
        when even the largest noise cannot fit; past the plan, rounds decline rather than drown in noise.
        """
        if not self.privacy.private:
            return 0.0
        if run_id not in self._noise:
            before = [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.ledger.entries() if e.run_id != run_id]
            self._noise[run_id] = calibrate_noise(before, self.sample_rate,
                                                  self.privacy.planned_rounds * self.steps_per_round, self.delta,
                                                  self.privacy.epsilon)
        return self._noise[run_id]

    def _augmenter(self, max_len: int) -> Augmenter | None:
        if self.augment is None or not self.augment.enabled:
            return None
        if self._augmenter_cache is None or self._augmenter_cache[0] != max_len:
            self._augmenter_cache = (max_len, Augmenter(self.augment, self.sequences, self.n_items, max_len))
        return self._augmenter_cache[1]

    def train_round(self, model: SASRec, run_id: str, round_: int,
                    on_step: Callable[[int, int], None] | None = None) -> RoundResult:
        """Train ``model`` in place. The ledger entry is committed before this returns; BudgetExceeded (before
        any training) means the merchant declines this round. ``on_step(step, expected_steps)`` reports progress."""
        started = time.monotonic()
        seed = np.random.SeedSequence([self.local.seed, round_])
        rng = np.random.default_rng(seed)
        torch.manual_seed(int(seed.generate_state(1)[0]))
        noise = self.noise_multiplier(run_id)
        if self.privacy.private and self.ledger.epsilon_after(noise, self.sample_rate, self.steps_per_round,
                                                              self.delta) > self.privacy.epsilon * (1 + 1e-9):
            raise BudgetExceeded("the next round would exceed the privacy budget")
        samples = UserViews(self.sequences, self._augmenter(model.cfg.max_len), model.cfg.max_len, rng)
        model.to(self.device).train()
        if self.privacy.private:
            loss, steps = self._train_private(model, samples, noise, on_step)
        else:
            loss, steps = self._train_plain(model, samples, rng, on_step)
        epsilon = math.inf
        if self.privacy.private:
            epsilon = self.ledger.record(run_id, round_, noise, self.sample_rate, steps, self.delta,
                                         self.privacy.epsilon)
        return RoundResult(train_loss=loss, epsilon=epsilon, delta=self.delta, noise_multiplier=noise,
                           sample_rate=self.sample_rate, steps=steps, seconds=time.monotonic() - started,
                           num_examples=len(samples), augment_views=samples.views - 1)

    def _train_plain(self, model: SASRec, samples: UserViews, rng, on_step) -> tuple[float, int]:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.local.lr)
        total, steps = 0.0, 0
        for _ in range(self.local.local_epochs):
            order = rng.permutation(len(samples))
            for start in range(0, len(order), self.local.batch_size):
                inputs, targets = samples.batch(order[start : start + self.local.batch_size], self.device)
                loss = model.loss(inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
                if on_step:
                    on_step(steps, self.steps_per_round)
        return total / max(steps, 1), steps

    def _train_private(self, model: SASRec, samples: UserViews, noise: float, on_step) -> tuple[float, int]:
        index = torch.utils.data.TensorDataset(torch.arange(len(samples)))
        loader = torch.utils.data.DataLoader(index, batch_size=self.local.batch_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.local.lr)
        private_model, dp_optimizer, criterion, dp_loader = privatize(
            model, optimizer, loader, noise, self.privacy.max_grad_norm, self.privacy.grad_sample_mode,
            label_smoothing=model.cfg.label_smoothing)
        total, steps = 0.0, 0
        try:
            for _ in range(self.local.local_epochs):
                for (rows,) in dp_loader:
                    inputs, targets = samples.batch(rows.numpy(), self.device)
                    loss = criterion(private_model(inputs), targets)
                    loss.backward()
                    dp_optimizer.step()
                    dp_optimizer.zero_grad(set_to_none=True)
                    total, steps = total + float(loss.item()), steps + 1
                    if on_step:
                        on_step(steps, self.steps_per_round)
        finally:
            private_model._close()  # remove Opacus' hooks so the caller's model is a plain module again
        return total / max(steps, 1), steps


def privatize(model: SASRec, optimizer: torch.optim.Optimizer, loader, noise_multiplier: float,
              max_grad_norm: float, mode: str = "ghost", poisson: bool = True, label_smoothing: float = 0.0):
    """Opacus' make_private with one return shape for both modes: (module, optimizer, criterion, loader).

    Ghost mode returns a wrapped criterion whose ``backward`` runs the two ghost-clipping passes; hooks mode uses
    the plain per-user criterion. Our ledger, not this engine's accountant, is the accountant of record.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
    engine = PrivacyEngine(accountant="rdp")
    criterion = PerUserCrossEntropy(label_smoothing=label_smoothing)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
            poisson_sampling=poisson)
    if mode == "ghost":
        return wrapped
    private_model, dp_optimizer, dp_loader = wrapped
    return private_model, dp_optimizer, criterion, dp_loader
