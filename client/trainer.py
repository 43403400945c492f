"""A merchant's local training round: augment, train with user-level DP-SGD (Opacus), account in the ledger.

The privacy unit is the user. Each user is one sample ``[views, positions]``: the original training sequence and
this round's augmented views. Their losses are averaged inside the sample, so Opacus clips one gradient per user,
and Poisson sampling over users (Opacus' default) makes the RDP accounting valid. ε composes over every round in
the ledger; noise is calibrated so that the planned rounds fit the remaining budget.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine

from fedaug.client.ghost_norms import BookKeeping  # also registers the output layer with Opacus
from fedaug.client.ledger import BudgetExceeded, PrivacyLedger, calibrate_noise
from fedaug.common.config import GRAD_SAMPLE_MODES, AugmentSection, LocalSection, PrivacySection, Recipe
from fedaug.common.errors import ConfigError
from fedaug.common.model.augment import Augmenter, View, random_chains
from fedaug.common.model.batching import Contrastive, UserSamples
from fedaug.common.model.sasrec import PerUserCrossEntropy, SASRec, SASRecConfig, smoothed_cross_entropy
from fedaug.common.model.training import MICRO_BATCH_TOKENS, train_step

DP_MICRO_BATCH_TOKENS = MICRO_BATCH_TOKENS // 2
"""Half the non-private micro-batch: a DP micro-batch holds item scores and their gradient for every position."""


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
    """One merchant's trainer. ``train_round`` runs the local epochs and commits the round to the ledger.

    ``ledger``: the privacy ledger, or the folder to open it in once the plan is checked (so a refused plan leaves
    no ledger behind); None for non-private training. ``rounds``: the rounds this run plans to train (noise is
    calibrated so that they all fit in the remaining budget); ``seed``: seeds every round's sampling and noise.
    ``features``: each user's side-feature rows (fedaug.common.data.features), for models that read them.
    ``micro_batch_tokens``: DP steps run each Poisson batch as length-bucketed micro-batches of at most this many
    padded positions."""

    def __init__(self, train_sequences: list[np.ndarray], n_items: int, privacy: PrivacySection,
                 local: LocalSection, augment: AugmentSection | None, ledger: PrivacyLedger | Path | None,
                 device: torch.device, *, rounds: int, seed: int, features: list[np.ndarray] | None = None,
                 micro_batch_tokens: int = DP_MICRO_BATCH_TOKENS):
        if privacy.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
        if privacy.private and ledger is None:
            raise ValueError("private training needs a ledger")
        self.sequences = train_sequences
        self.features = features
        self.n_users = trainable_users(train_sequences)
        self.n_items = n_items
        self.privacy, self.local, self.augment = privacy, local, augment
        self.rounds, self.seed, self.micro_batch_tokens = rounds, seed, micro_batch_tokens
        self.device = device
        self.delta = privacy.delta if privacy.delta is not None else 1.0 / (10 * max(self.n_users, 1))
        """[privacy] delta, or its default 1 / (10 × the users who can be trained on: ``trainable_users``)."""
        self.batch_size = (auto_batch_size(self.n_users, local.max_batch_size) if local.batch_size == "auto"
                           else local.batch_size)
        """Expected users per step: ``local.batch_size``, or what "auto" makes of it for these users."""
        if privacy.private:
            check_delta(self.delta, self.n_users)
            _warn_on_sampling(self.sample_rate, self.n_users, self.batch_size)
        self.ledger = PrivacyLedger(ledger) if isinstance(ledger, Path) else ledger
        self._noise: dict[str, float] = {}
        self._augmenter_cache: tuple[int, Augmenter] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_users / self.batch_size))

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
                                                  self.rounds * self.steps_per_round, self.delta,
                                                  self.privacy.epsilon, rdp_only=self.ledger.rdp_only)
        return self._noise[run_id]

    def _augmenter(self, max_len: int) -> Augmenter | None:
        if self.augment is None or not self.augment.enabled:
            return None
        if self._augmenter_cache is None or self._augmenter_cache[0] != max_len:
            self._augmenter_cache = (max_len, Augmenter(self.augment, self.sequences, self.n_items, max_len))
        return self._augmenter_cache[1]

    def samples(self, cfg: SASRecConfig, rng: np.random.Generator) -> UserSamples:
        """This round's samples for a model of ``cfg``: every user's sequence plus freshly augmented views of it,
        with side features where the model reads them."""
        settings, max_len = self.augment, cfg.max_len
        if cfg.side_features and self.features is None:
            raise ValueError("this model reads side features: the trainer needs the users' feature rows")
        side = {"features": self.features if cfg.side_features else None, "target_weights": cfg.target_weights}
        if settings is None or not settings.enabled or settings.views == 0:
            return UserSamples(self.sequences, max_len, **side)
        augmenter = self._augmenter(max_len)
        if settings.use_as == "next-item":
            return UserSamples(self.sequences, max_len, lambda seq: augmenter.source_views(seq, rng),
                               settings.views, **side)
        # Contrastive: [sequence, its augmentations, random public chains]; the chains never carry targets.
        negatives = settings.contrastive_negatives

        def views_of(seq):
            augmented = augmenter.source_views(seq, rng)
            augmented += [View(seq, np.arange(len(seq)))] * (settings.views - len(augmented))
            return augmented + random_chains(self.n_items, min(len(seq), max_len + 1), negatives, rng)

        return UserSamples(self.sequences, max_len, views_of, settings.views + negatives,
                           target_views=1 + settings.views if settings.use_as == "both" else 1,
                           contrastive=Contrastive(settings.views, settings.contrastive_weight, settings.temperature),
                           **side)

    def train_round(self, model: SASRec, run_id: str, round_: int,
                    on_step: Callable[[int, int], None] | None = None, proximal_mu: float = 0.0) -> RoundResult:
        """Train ``model`` in place. The ledger entry is committed before this returns; BudgetExceeded (before
        any training) means the merchant declines this round. ``on_step(step, expected_steps)`` reports progress.

        ``proximal_mu`` > 0 (FedProx) pulls the weights towards the ones the round started from after every step.
        """
        started = time.monotonic()
        seed = np.random.SeedSequence([self.seed, round_])
        rng = np.random.default_rng(seed)
        torch.manual_seed(int(seed.generate_state(1)[0]))
        noise = self.noise_multiplier(run_id)
        if self.privacy.private and self.ledger.epsilon_after(noise, self.sample_rate, self.steps_per_round,
                                                              self.delta) > self.privacy.epsilon * (1 + 1e-9):
            raise BudgetExceeded("the next round would exceed the privacy budget")
        samples = self.samples(model.cfg, rng)
        model.to(self.device).train()
        noising = self.augment is not None and self.augment.enabled
        model.attribute_noise = self.augment.attribute_sigma if noising else 0.0
        model.behaviour_noise = self.augment.behaviour_sigma if noising else 0.0
        model.context_noise = self.augment.context_sigma if noising else 0.0
        after_step = _proximal_pull(model, self.local.lr * proximal_mu) if proximal_mu > 0 else None
        try:
            if self.privacy.private:
                loss, steps = self._train_private(model, samples, noise, rng, on_step, after_step)
            else:
                loss, steps = self._train_plain(model, samples, rng, on_step, after_step)
        finally:
            model.attribute_noise = model.behaviour_noise = model.context_noise = 0.0
        epsilon = math.inf
        if self.privacy.private:
            epsilon = self.ledger.record(run_id, round_, noise, self.sample_rate, steps, self.delta,
                                         self.privacy.epsilon)
        return RoundResult(train_loss=loss, epsilon=epsilon, delta=self.delta, noise_multiplier=noise,
                           sample_rate=self.sample_rate, steps=steps, seconds=time.monotonic() - started,
                           num_examples=len(samples), augment_views=self.augment.views if samples.views > 1 else 0)

    def _train_plain(self, model: SASRec, samples: UserSamples, rng, on_step, after_step) -> tuple[float, int]:
        optimizer = torch.optim.Adam(model.parameters(), lr=self.local.lr)
        total, steps = 0.0, 0
        for _ in range(self.local.local_epochs):
            order = rng.permutation(len(samples))
            for start in range(0, len(order), self.batch_size):
                total += train_step(model, optimizer, samples, order[start : start + self.batch_size],
                                    self.device)
                steps += 1
                if after_step:
                    after_step()
                if on_step:
                    on_step(steps, self.steps_per_round)
        return total / max(steps, 1), steps

    def _train_private(self, model: SASRec, samples: UserSamples, noise: float, rng: np.random.Generator,
                       on_step, after_step) -> tuple[float, int]:
        step = PrivateStep(model, torch.optim.Adam(model.parameters(), lr=self.local.lr), len(samples),
                           self.batch_size, noise, self.privacy.max_grad_norm, self.privacy.grad_sample_mode,
                           self.micro_batch_tokens)
        total, steps = 0.0, 0
        try:
            for _ in range(self.steps_per_round):
                total += step(samples, poisson_rows(rng, len(samples), self.sample_rate), self.device)
                steps += 1
                if after_step:
                    after_step()
                if on_step:
                    on_step(steps, self.steps_per_round)
        finally:
            step.close()
        return total / max(steps, 1), steps


SAMPLE_RATE_WARNING = 0.5
AUTO_BATCH_STEPS = 3
"""batch_size "auto" keeps at least this many Poisson steps per epoch: a sampling rate of 1/3 at most, under
SAMPLE_RATE_WARNING, however few users a merchant has."""


def auto_batch_size(n_users: int, max_batch_size: int) -> int:
    """batch_size "auto": ``max_batch_size``, or the largest batch below it that still takes AUTO_BATCH_STEPS steps
    an epoch over ``n_users`` (so 1,024 stays 1,024 for 2,236 users, and becomes 497 for 996)."""
    largest = -(-n_users // (AUTO_BATCH_STEPS - 1)) - 1  # the largest b with ceil(n / b) >= AUTO_BATCH_STEPS
    return max(1, min(max_batch_size, largest))


def trainable_users(sequences: list[np.ndarray]) -> int:
    """Users with at least one next-item target (two events): the ones DP-SGD samples and protects."""
    return sum(len(s) >= 2 for s in sequences)


def check_delta(delta: float, n_users: int) -> None:
    """δ is the chance the guarantee fails outright, so it must stay below one user's share (1 / users)."""
    if delta >= 1 / max(n_users, 1):
        raise ConfigError(f"privacy.delta: {delta:g} must be below 1 / users = {1 / max(n_users, 1):g} (this "
                          f"merchant has {n_users} users who can train)")


def _warn_on_sampling(sample_rate: float, n_users: int, batch_size: int) -> None:
    """A Poisson rate near 1 means each step sees almost everyone: DP-SGD's amplification by sampling is lost."""
    if sample_rate >= SAMPLE_RATE_WARNING:
        warnings.warn(f"local.batch_size {batch_size} over {n_users} users is a sampling rate of {sample_rate:.2f}: "
                      "little privacy amplification; a smaller batch (or more users) costs less noise per ε",
                      PrivacyPlanWarning, stacklevel=3)


class PrivacyPlanWarning(UserWarning):
    """A private training plan that is valid but spends its budget poorly."""


def build_trainer(recipe: Recipe, train_sequences: list[np.ndarray], n_items: int, *, rounds: int, seed: int,
                  state_dir: Path, device: torch.device, features: list[np.ndarray] | None = None) -> LocalTrainer:
    """The one way a merchant's trainer is made (ClientApp, `fedaug local`, the audit): ``recipe`` for ``rounds``
    planned rounds, seeded, with the privacy ledger in ``state_dir`` when the recipe is private; ``features``: the
    users' side-feature rows (LeaveOneOut.train_features) for models that read them."""
    augment = recipe.augment if recipe.augment.active else None
    return LocalTrainer(train_sequences, n_items, recipe.privacy, recipe.local, augment,
                        state_dir if recipe.privacy.private else None, device, rounds=rounds, seed=seed,
                        features=features)


def _proximal_pull(model: SASRec, rate: float) -> Callable[[], None]:
    """FedProx's proximal term μ/2·‖w − w₀‖², applied as a decoupled step w ← w − lr·μ·(w − w₀) after each
    optimiser step. It involves no data, so under DP it is post-processing: it needs no clipping or accounting."""
    anchor = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def pull() -> None:
        for p, start in anchor:
            p.sub_(p - start, alpha=rate)

    return pull


def poisson_rows(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Poisson sampling: every row joins independently with probability ``rate`` (what the RDP accounting assumes;
    the batch may be empty)."""
    return np.flatnonzero(rng.random(n) < rate)


class PrivateStep:
    """One DP-SGD step per Poisson batch of users (Opacus), run as length-bucketed micro-batches.

    Every sampled user lands in exactly one micro-batch, trimmed to that batch's longest user; the clipped
    per-user gradients add up across micro-batches and noise is added once. So clipping, noise and accounting are
    those of one Poisson batch; only the padded work disappears (a Beauty user has 8.9 items on average, a random
    batch of 256 is ~50 wide). An empty batch still takes a noise-only step: skipping it would reveal that nobody
    was sampled.

    Ghost mode clips by book-keeping (client/ghost_norms.py: one backward pass, per-user norms from each layer's
    input and output gradient); hooks mode by Opacus' per-sample gradients.
    """

    def __init__(self, model: SASRec, optimizer: torch.optim.Optimizer, n_samples: int, batch_size: int,
                 noise_multiplier: float, max_grad_norm: float, mode: str = "ghost",
                 token_budget: int = DP_MICRO_BATCH_TOKENS):
        # The loader only tells Opacus the sample rate (1 / its length); batches come from poisson_rows.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n_samples)),
                                             batch_size=batch_size)
        self.module, self.optimizer, _, _ = privatize(model, optimizer, loader, noise_multiplier, max_grad_norm, mode,
                                                      loss_reduction="sum")
        # The per-user losses are summed, so every gradient is already per user (no [users, T, 12k] rescaled copy);
        # the optimizer still averages the noised sum over the expected batch size.
        self.optimizer.loss_reduction = "mean"
        self.per_user_loss = PerUserCrossEntropy(reduction="none", label_smoothing=model.cfg.label_smoothing)
        self.mode = mode
        self.token_budget = token_budget
        self.model = model
        self.clipping = None
        if mode == "ghost":
            self.module.remove_hooks()  # Opacus keeps the optimizer (noise); book-keeping clips
            self.clipping = BookKeeping(model, max_grad_norm)

    def __call__(self, samples: UserSamples, rows: np.ndarray, device) -> float:
        """Take the step for users ``rows``; returns their mean loss (0 for an empty batch)."""
        if len(rows) == 0:
            self._noise_only_step()
            return 0.0
        self.optimizer.zero_grad(set_to_none=True)
        buckets = samples.micro_batches(rows, self.token_budget)
        total = 0.0
        for i, bucket in enumerate(buckets):
            if self.clipping is not None:  # the clipped sums add up in p.grad
                with self.clipping.recording():
                    losses = self._forward(samples, bucket, device)[2]  # keeps no [positions, 12k] scores alive
                self.clipping.backward(losses)
            else:
                last = i == len(buckets) - 1
                if not last:
                    self.optimizer.signal_skip_step(True)  # accumulate this micro-batch's clipped sum, no noise yet
                losses = self._forward(samples, bucket, device)[2]
                losses.sum().backward()  # Opacus clips the per-sample gradients its hooks collected
                self.optimizer.step()
                if not last:
                    self.optimizer.zero_grad(set_to_none=True)  # keeps the accumulated sum
            total += float(losses.detach().sum())
        if self.clipping is not None:
            for p in self.optimizer.params:  # a layer that no sampled user reached has a zero gradient
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.optimizer.step()
        return total / len(rows)

    def _forward(self, samples: UserSamples, rows: np.ndarray, device):
        """Hidden states, item scores and per-user losses (next-item, plus InfoNCE when the samples carry
        contrastive views) for one micro-batch. Calls the model's parts directly; the clipping hooks sit on its
        layers. Under book-keeping the output layer scores target positions only, user after user (as non-private
        training does), instead of every padded position."""
        inputs, targets = samples.batch(rows, device)
        hidden = self.model.encode(inputs, samples.batch_side(rows, device))
        weights = samples.batch_weights(rows, device)
        if self.clipping is None:
            logits = self.model.item_logits(hidden)
            losses = self.per_user_loss(logits, targets, weights)
        else:
            mask = targets.reshape(hidden.shape[:2]) > 0
            counts = (samples.targets[rows] > 0).reshape(len(rows), -1).sum(1)  # the mask's rows, from the host
            with self.clipping.packed(counts):
                logits = self.model.item_logits(hidden[mask])
            row_losses = smoothed_cross_entropy(logits, targets.reshape(mask.shape)[mask],
                                                self.per_user_loss.label_smoothing)
            if weights is not None:
                row_losses = row_losses * weights.reshape(mask.shape)[mask]
            counts = torch.as_tensor(counts, device=hidden.device)
            users = torch.arange(len(rows), device=hidden.device).repeat_interleave(counts)
            losses = row_losses.new_zeros(len(rows)).index_add(0, users, row_losses) / counts.clamp(min=1)
        if samples.contrastive:
            c = samples.contrastive
            losses = losses + c.weight * self.model.contrastive_loss(
                hidden, samples.batch_view_lengths(rows, device), c.positives, c.temperature)
        return hidden, logits, losses

    def _noise_only_step(self) -> None:
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        for p in opt.params:  # no user clipped anything: Opacus' own noise step on zero sums (its generator and
            p.summed_grad = torch.zeros_like(p)  # sampling as privatize set them)
        opt.add_noise()
        for p in opt.params:
            p.grad /= opt.expected_batch_size
        opt.original_optimizer.step()

    def close(self) -> None:
        if self.clipping is not None:
            self.clipping.close()
        self.module._close()  # remove Opacus' hooks so the caller's model is a plain module again


NOISE_SOURCE = ("DP noise: torch's generator, seeded from OS entropy (Python's secrets) for every training round, "
                "never from the run's seed, with Opacus' floating-point-safe Gaussian sampling; not a cryptographic "
                "generator (Opacus' secure_mode needs torchcsprng, which has no build for this torch)")
"""Where the noise comes from, as the merchant daemon states it once at start."""


def privatize(model: SASRec, optimizer: torch.optim.Optimizer, loader, noise_multiplier: float,
              max_grad_norm: float, mode: str = "ghost", poisson: bool = True, label_smoothing: float = 0.0,
              loss_reduction: str = "mean"):
    """Opacus' make_private with one return shape for both modes: (module, optimizer, criterion, loader).

    Ghost mode returns a wrapped criterion whose ``backward`` runs the two ghost-clipping passes; hooks mode uses
    the plain per-user criterion. Our ledger, not this engine's accountant, is the accountant of record. The
    optimizer draws its noise as NOISE_SOURCE says.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")
    criterion = PerUserCrossEntropy(reduction=loss_reduction, label_smoothing=label_smoothing)
    with warnings.catch_warnings():
        # Opacus' note asks for secure_mode, which takes its generator from torchcsprng (no build for this torch);
        # its other half, floating-point-safe sampling, is switched on below with a generator of our own.
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        engine = PrivacyEngine(accountant="rdp")
        wrapped = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
            poisson_sampling=poisson, loss_reduction=loss_reduction)
    dp_optimizer = wrapped[1]
    # The noise comes from fresh OS entropy, never from the run's seed (which seeds sampling and dropout and may be
    # known): whoever can replay a seeded noise can subtract it from the released update. secure_mode on the
    # optimizer alone draws every noise tensor as Opacus' secure mode does (2n Gaussians, arXiv:2107.10138).
    device = next(model.parameters()).device
    dp_optimizer.generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    dp_optimizer.secure_mode = True
    # Opacus' per-user gradient hooks are full backward hooks on every trainable layer, the embedding tables among
    # them; their inputs are item ids, so torch notes on every backward that the hook sees outputs only. That is
    # all Opacus reads (capture_backprops_hook takes the output gradient and the activations its forward hook kept).
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                            "respect to module outputs since no inputs require gradients", category=UserWarning)
    if mode == "ghost":
        return wrapped
    private_model, dp_optimizer, dp_loader = wrapped
    return private_model, dp_optimizer, criterion, dp_loader
