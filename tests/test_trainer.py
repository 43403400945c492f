"""User-level DP-SGD: the DP step equals a one-user-at-a-time reference, clipping is exact, the ledger is honoured."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from fedaug.client.ghost_norms import BookKeeping
from fedaug.client.ledger import BudgetExceeded, PrivacyLedger
from fedaug.client.trainer import LocalTrainer, PrivateStep
from fedaug.common.config import AugmentSection, LocalSection, PrivacySection, SyntheticSection
from fedaug.common.data.features import CODE_SIZES
from fedaug.common.data.split import leave_one_out
from fedaug.common.data.synthetic import generate
from fedaug.common.model.augment import Augmenter, random_chains
from fedaug.common.model.batching import Contrastive, UserSamples, length_buckets
from fedaug.common.model.sasrec import PerUserCrossEntropy, SASRec
from tests.support import model_config

N_ITEMS = 30


def _model(seed=0, catalog=False):
    torch.manual_seed(seed)
    if not catalog:
        return SASRec(model_config(N_ITEMS, hidden=16, heads=2, max_len=8, dropout=0.0))
    # 7 public attributes, up to 3 per item; narrow per-item tables beside them
    attributes = torch.tensor([[0, 0, 0]] + [[1 + i % 7, 1 + (i * 3) % 7, 0 if i % 2 else 1 + (i * 5) % 7]
                                             for i in range(N_ITEMS)])
    return SASRec(model_config(N_ITEMS, hidden=16, heads=2, max_len=8, dropout=0.0, item_dim=4,
                               n_attributes=7), attributes)


def _user_views(users=6, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, N_ITEMS + 1, rng.integers(2, 9)) for _ in range(users)]
    aug = Augmenter(AugmentSection(views=1), seqs, N_ITEMS, max_len=8)
    return UserSamples(seqs, 8, lambda seq: aug.views(seq, rng), aug.settings.views)


def _reference_grads(model, inputs, targets, clip):
    """Per-user gradients, one user at a time, clipped to ``clip`` and averaged over the batch."""
    names, params = zip(*model.named_parameters(), strict=True)
    criterion = PerUserCrossEntropy(reduction="sum", label_smoothing=model.cfg.label_smoothing)
    per_user = [torch.autograd.grad(criterion(model(x.unsqueeze(0)), y.unsqueeze(0)), params, allow_unused=True)
                for x, y in zip(inputs, targets, strict=True)]
    per_user = {name: torch.stack([g[i] if g[i] is not None else torch.zeros_like(p) for g in per_user])
                for i, (name, p) in enumerate(zip(names, params, strict=True))}
    norms = torch.cat([g.reshape(len(inputs), -1) for g in per_user.values()], 1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / len(inputs) for k, g in per_user.items()}, norms


def _dp_grads(model, samples, rows, clip, mode):
    """fedaug's DP step without noise on users ``rows`` (expected batch = len(rows)): the mean clipped gradient."""
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=0.0), len(rows), len(rows), 0.0, clip, mode)
    step(samples, rows, "cpu")
    step.close()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_step_without_noise_equals_torch_func_reference(mode):
    samples = _user_views()
    rows = np.arange(len(samples))
    inputs, targets = samples.batch(rows, "cpu")  # [users, views, T]
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    criterion = PerUserCrossEntropy(reduction="sum", label_smoothing=model.cfg.label_smoothing)

    def user_loss(p, x, y):
        return criterion(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_user = vmap(grad(user_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    norms = torch.cat([g.reshape(len(rows), -1) for g in per_user.values()], 1).norm(dim=1)
    clip = float(norms.median())  # about half the users get clipped
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / len(rows) for k, g in per_user.items()}
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=0.0), len(samples), len(samples), 0.0, clip,
                       mode, token_budget=8 * samples.views)  # several micro-batches
    step(samples, rows, "cpu")
    step.close()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("catalog", [False, True])
@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_length_bucketed_micro_batches_take_the_same_step_as_one_batch(mode, catalog):
    samples = _user_views(users=9, seed=5)
    rows = np.arange(len(samples))
    budget = 8 * samples.views
    assert len(samples.micro_batches(rows, budget)) > 2
    inputs, targets = samples.batch(rows, "cpu")
    model = _model(2, catalog)
    _, norms = _reference_grads(model, inputs, targets, clip=1e9)
    clip = float(norms.median())
    expected, _ = _reference_grads(model, inputs, targets, clip)
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=0.0), len(samples), len(samples), 0.0, clip,
                       mode, token_budget=budget)
    step(samples, rows[::-1].copy(), "cpu")
    step.close()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_book_keeping_refuses_a_layer_that_runs_twice_in_one_forward():
    layer = torch.nn.Linear(3, 3)  # a tied layer: its per-user norm would miss the cross terms
    clipping = BookKeeping(layer, 1.0)
    with pytest.raises(ValueError, match="ran twice"), clipping.recording():
        layer(layer(torch.ones(2, 3)))
    clipping.close()


def test_an_empty_poisson_batch_still_takes_a_noise_only_step():
    model = _model(3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=1.0), 64, 8, 2.0, 0.5)
    step(_user_views(), np.array([], dtype=np.int64), "cpu")
    step.close()
    moved = torch.cat([(p.detach() - before[k]).reshape(-1) for k, p in model.named_parameters()])
    assert moved.std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.1)  # σ·C / expected batch size


@pytest.mark.parametrize("rows", [np.array([3]), np.arange(10), np.array([9, 0, 4, 4])])
def test_length_buckets_place_every_row_exactly_once_within_budget(rows):
    lengths = np.array([1, 50, 3, 7, 7, 2, 49, 9, 0, 20])
    buckets = length_buckets(rows, lengths, 60)
    assert sorted(np.concatenate(buckets).tolist()) == sorted(rows.tolist())
    assert all(len(b) == 1 or len(b) * max(lengths[b].max(), 1) <= 60 for b in buckets)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_every_clipped_user_gradient_is_within_max_grad_norm(mode):
    samples = _user_views(users=5, seed=3)
    model = _model(1)
    clip = 0.05
    for row in range(len(samples)):
        got = _dp_grads(model, samples, np.array([row]), clip, mode)  # a batch of one user: its own clipped g
        norm = torch.cat([g.reshape(-1) for g in got.values()]).norm()
        assert norm <= clip * (1 + 1e-5)
        assert norm >= clip * 0.99  # these gradients are all far above 0.05, so each is clipped to exactly C


def _trainer(tmp_path, epsilon=4.0, rounds=3, mode="ghost", augment=True):
    data = generate(SyntheticSection(users=120, items=80, seed=1, titles=False))
    split = leave_one_out(data)
    ledger = PrivacyLedger(tmp_path / "state")
    trainer = LocalTrainer(split.train.sequences(), data.n_items,
                           PrivacySection(epsilon=epsilon, max_grad_norm=1.0, grad_sample_mode=mode),
                           LocalSection(local_epochs=1, batch_size=32, lr=1e-2),
                           AugmentSection(views=1) if augment else None, ledger, torch.device("cpu"), rounds=rounds,
                           seed=0)
    model = SASRec(model_config(data.n_items, hidden=16, heads=2, max_len=20, dropout=0.1))
    return trainer, model, ledger


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_rounds_spend_the_budget_exactly_as_planned_and_then_decline(tmp_path, mode):
    trainer, model, ledger = _trainer(tmp_path, epsilon=4.0, rounds=3, mode=mode)
    results = [trainer.train_round(model, "run", r) for r in (1, 2, 3)]
    assert [r.epsilon for r in results] == sorted(r.epsilon for r in results)
    assert results[-1].epsilon <= 4.0 and results[-1].epsilon > 3.9  # the plan uses the budget, no more
    assert results[0].augment_views == 1 and results[0].num_examples == 120
    assert all(math.isfinite(r.train_loss) for r in results)
    assert [e.round for e in ledger.entries()] == [1, 2, 3]
    with pytest.raises(BudgetExceeded):
        trainer.train_round(model, "run", 4)
    assert len(ledger.entries()) == 3
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())


def test_a_restarted_merchant_keeps_composing(tmp_path):
    trainer, model, ledger = _trainer(tmp_path, epsilon=4.0, rounds=2)
    trainer.train_round(model, "run-1", 1)
    spent = ledger.epsilon(trainer.delta)
    ledger.close()
    again, model, ledger = _trainer(tmp_path, epsilon=4.0, rounds=2)  # new process, same state-dir
    assert again.epsilon_spent() == pytest.approx(spent)
    result = again.train_round(model, "run-2", 1)
    assert result.epsilon > spent and result.epsilon <= 4.0


def test_no_update_without_its_ledger_entry(tmp_path, monkeypatch):
    trainer, model, ledger = _trainer(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between training and commit")

    monkeypatch.setattr(ledger, "record", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_round(model, "run", 1)  # no RoundResult exists, so nothing can be sent
    monkeypatch.undo()
    assert ledger.entries() == []


def test_non_private_round_needs_no_ledger(tmp_path):
    data = generate(SyntheticSection(users=60, items=50, seed=2, titles=False))
    split = leave_one_out(data)
    trainer = LocalTrainer(split.train.sequences(), data.n_items, PrivacySection(epsilon=math.inf),
                           LocalSection(batch_size=16), None, None, torch.device("cpu"), rounds=1, seed=0)
    model = SASRec(model_config(data.n_items, hidden=16, heads=2, max_len=20))
    result = trainer.train_round(model, "run", 1)
    assert math.isinf(result.epsilon) and result.noise_multiplier == 0 and result.augment_views == 0


@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_fedprox_keeps_the_round_close_to_where_it_started(tmp_path, epsilon):
    """μ > 0 pulls the weights back towards the global model after every step (private or not)."""
    moved = {}
    for mu in (0.0, 50.0):
        trainer, model, _ = _trainer(tmp_path / str(mu), epsilon=epsilon, rounds=1, augment=False)
        torch.manual_seed(0)
        model = SASRec(model.cfg)
        start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        trainer.train_round(model, "run", 1, proximal_mu=mu)
        moved[mu] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm())
    assert 0 < moved[50.0] < 0.8 * moved[0.0]


def _contrastive_samples(users=7, seed=6, use_as="contrastive"):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, N_ITEMS + 1, rng.integers(2, 9)) for _ in range(users)]
    aug = Augmenter(AugmentSection(views=2), seqs, N_ITEMS, max_len=8)
    return UserSamples(seqs, 8, lambda s: aug.views(s, rng) + random_chains(N_ITEMS, len(s), 3, rng), 5,
                       target_views=3 if use_as == "both" else 1, contrastive=Contrastive(2, 0.5, 0.5))


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_contrastive_dp_step_clips_each_users_whole_objective(mode):
    samples = _contrastive_samples()
    rows = np.arange(len(samples))
    model = _model(4)
    c = samples.contrastive

    def user_loss(row):
        x, y = samples.batch(np.array([row]), "cpu")
        hidden = model.encode(x)
        lengths = samples.batch_view_lengths(np.array([row]), "cpu")
        return (PerUserCrossEntropy(reduction="sum", label_smoothing=model.cfg.label_smoothing)(
            model.item_logits(hidden), y) + c.weight * model.contrastive_loss(hidden, lengths, c.positives,
                                                                              c.temperature).sum())

    params = list(model.parameters())
    per_user = [torch.autograd.grad(user_loss(r), params) for r in rows]
    norms = torch.stack([torch.cat([g.reshape(-1) for g in gs]).norm() for gs in per_user])
    clip = float(norms.median())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * gs[i] for f, gs in zip(factor, per_user, strict=True)) / len(rows)
                for i in range(len(params))]
    step = PrivateStep(model, torch.optim.SGD(params, lr=0.0), len(samples), len(samples), 0.0, clip, mode,
                       token_budget=8 * samples.views)
    step(samples, rows, "cpu")
    step.close()
    for (name, p), e in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5, msg=name)


def test_contrastive_terms_never_mix_users():
    samples = _contrastive_samples(users=4)
    model = _model(5)
    rows = np.arange(4)
    x, _ = samples.batch(rows, "cpu")
    lengths = samples.batch_view_lengths(rows, "cpu")
    c = samples.contrastive
    before = model.contrastive_loss(model.encode(x), lengths, c.positives, c.temperature)
    x[3] = torch.randint(1, N_ITEMS + 1, x[3].shape)  # change another user entirely
    after = model.contrastive_loss(model.encode(x), lengths, c.positives, c.temperature)
    torch.testing.assert_close(after[:3], before[:3])
    assert not torch.allclose(after[3], before[3])


@pytest.mark.parametrize("use_as,target_views", [("contrastive", 1), ("both", 3)])
def test_only_next_item_views_carry_targets(use_as, target_views):
    samples = _contrastive_samples(use_as=use_as)
    assert samples.views == 6 and (samples.targets[:, :target_views] > 0).any(axis=2).all()
    assert (samples.targets[:, target_views:] == 0).all()  # negatives (and contrastive-only views): no targets


@pytest.mark.parametrize("use_as", ["contrastive", "both"])
@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_rounds_train_with_a_contrastive_objective(tmp_path, use_as, epsilon):
    """The InfoNCE term is in what a round trains and reports: the same round with the term's weight at 0 reports
    a loss lower by about the InfoNCE of one positive among the negatives, and (without DP noise, which is drawn
    afresh every round) ends at other weights, where a rerun with the term ends at the same ones."""
    data = generate(SyntheticSection(users=80, items=60, seed=3, titles=False))
    split = leave_one_out(data)

    def one_round(weight: float, folder: str):
        augment = AugmentSection(views=1, use_as=use_as, contrastive_weight=weight)
        trainer = LocalTrainer(split.train.sequences(), data.n_items, PrivacySection(epsilon=epsilon),
                               LocalSection(batch_size=16), augment,
                               PrivacyLedger(tmp_path / folder) if epsilon < math.inf else None, torch.device("cpu"),
                               rounds=1, seed=0)
        torch.manual_seed(0)
        model = SASRec(model_config(data.n_items, hidden=16, heads=2, max_len=20))
        return trainer.train_round(model, "run", 1), model.state_dict(), augment.contrastive_negatives

    with_term, trained, negatives = one_round(1.0, "with")
    without, trained_without, _ = one_round(0.0, "without")
    assert math.isfinite(with_term.train_loss) and with_term.augment_views == 1
    # InfoNCE over 1 positive and `negatives` random chains: log(1 + negatives) for a model that cannot tell them
    # apart, less where the augmented view already looks like its sequence
    assert 0.5 < with_term.train_loss - without.train_loss < 2 * math.log(1 + negatives)
    if epsilon == math.inf:
        _, again, _ = one_round(1.0, "again")
        assert all(torch.equal(again[name], trained[name]) for name in trained)
        assert any(not torch.allclose(trained_without[name], trained[name]) for name in trained)


def test_a_private_plan_needs_delta_below_one_users_share_and_warns_at_high_sampling_rates():
    from fedaug.client.trainer import PrivacyPlanWarning
    from fedaug.common.errors import ConfigError

    sequences = [np.arange(1, 6)] * 50  # 50 users who can train

    def trainer(delta=None, batch_size=8):
        return LocalTrainer(sequences, 10, PrivacySection(epsilon=8.0, delta=delta),
                            LocalSection(batch_size=batch_size), None, PrivacyLedger.__new__(PrivacyLedger),
                            torch.device("cpu"), rounds=1, seed=0)

    with pytest.raises(ConfigError, match=r"privacy.delta: 0.5 must be below 1 / users = 0.02"):
        trainer(delta=0.5)
    with pytest.raises(ConfigError, match="privacy.delta"):
        trainer(delta=0.02)
    with pytest.warns(PrivacyPlanWarning, match="sampling rate of 1.00"):
        trainer(batch_size=256)  # every user in every step
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer(delta=1e-3).delta == 1e-3  # a sound plan: no warning
        LocalTrainer(sequences, 10, PrivacySection(epsilon=math.inf, delta=0.5), LocalSection(batch_size=256),
                     None, None, torch.device("cpu"), rounds=1, seed=0)  # non-private: nothing to check


def test_dp_noise_does_not_follow_the_run_seed(tmp_path):
    """Two rounds trained with the same seed (so the same Poisson batches and dropout) release different updates:
    the noise is drawn from fresh entropy, so knowing the seed does not let anyone subtract it."""
    released = []
    for attempt in range(2):
        trainer, model, _ = _trainer(tmp_path / str(attempt), epsilon=4.0, rounds=1)
        torch.manual_seed(0)
        model = SASRec(model.cfg)  # the same initial weights both times
        trainer.train_round(model, "run", 1)
        released.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert any(not torch.equal(released[0][k], released[1][k]) for k in released[0])


def test_a_refused_private_plan_leaves_no_ledger_behind(tmp_path):
    """δ is checked before the ledger's folder is made: a retry with a sound δ finds no stray ledger."""
    from fedaug.client.trainer import build_trainer
    from fedaug.common.config import FederationConfig
    from fedaug.common.errors import ConfigError

    recipe = FederationConfig.model_validate({"privacy": {"epsilon": 8.0, "delta": 0.5},
                                              "model": {"tie_embeddings": False}}).recipe
    with pytest.raises(ConfigError, match="privacy.delta"):
        build_trainer(recipe, [np.arange(1, 6)] * 50, 10, rounds=1, seed=0, state_dir=tmp_path / "state",
                      device=torch.device("cpu"))
    assert not (tmp_path / "state").exists()


# ----------------------------------------------------------------------------- side vectors (behaviour, context)

SIDE_COLUMNS = ("device",)


def _side_model(seed=0):
    torch.manual_seed(seed)
    model = SASRec(model_config(N_ITEMS, hidden=16, heads=2, max_len=8, dropout=0.0, behaviour=True,
                                time_context=True, context_columns=SIDE_COLUMNS,
                                target_weights={"view": 0.25, "click": 0.5, "favourite": 1.0, "cart": 2.0,
                                                "purchase": 3.0}))
    for name in ("behaviour_emb", "context_emb", "context_proj"):  # large enough that clipping sees them
        torch.nn.init.normal_(getattr(model, name).weight, std=0.5)
    return model


def _side_samples(users=8, seed=7, views=1, ops=("crop", "reorder", "insert")):
    """Users with random event types, time codes and a numeric column (some unknown), augmented views."""
    rng = np.random.default_rng(seed)
    seqs = [rng.permutation(N_ITEMS)[: rng.integers(2, 9)] + 1 for _ in range(users)]  # no repeats in a user
    features = []
    for seq in seqs:
        rows = np.stack([rng.integers(0, size, len(seq)) for size in CODE_SIZES.values()], axis=1)
        features.append(np.concatenate([rows, rng.normal(size=(len(seq), 1))], axis=1).astype(np.float32))
    aug = Augmenter(AugmentSection(views=views, ops=ops), seqs, N_ITEMS, max_len=8)
    return UserSamples(seqs, 8, lambda s: aug.source_views(s, rng), views, features=features,
                       target_weights=_side_model().cfg.target_weights)


@pytest.mark.parametrize(("views", "budget"), [(1, 8), (2, 10_000)])
@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_dp_step_with_side_vectors_and_target_weights_equals_torch_func_reference(mode, views, budget):
    """The behaviour and context layers (two embeddings and a projection) are clipped per user with the rest.

    Budget 8: several micro-batches. Two views in wide micro-batches: users of one micro-batch have different
    target counts, not in length order, so book-keeping's packed output rows come in runs of unequal counts."""
    samples = _side_samples(views=views)
    rows = np.arange(len(samples))
    inputs, targets = samples.batch(rows, "cpu")
    side, weights = samples.batch_side(rows, "cpu"), samples.batch_weights(rows, "cpu")
    assert weights is not None and set(weights.unique().tolist()) > {1.0}
    model = _side_model(3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    criterion = PerUserCrossEntropy(reduction="sum", label_smoothing=model.cfg.label_smoothing)

    def user_loss(p, x, y, s, w):
        return criterion(functional_call(model, p, (x.unsqueeze(0), s.unsqueeze(0))), y.unsqueeze(0), w.unsqueeze(0))

    per_user = vmap(grad(user_loss), in_dims=(None, 0, 0, 0, 0))(params, inputs, targets, side, weights)
    for name in ("behaviour_emb.weight", "context_emb.weight", "context_proj.weight"):
        assert per_user[name].abs().sum() > 0, name  # the new layers take part in each user's gradient
    norms = torch.cat([g.reshape(len(rows), -1) for g in per_user.values()], 1).norm(dim=1)
    clip = float(norms.median())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / len(rows) for k, g in per_user.items()}
    step = PrivateStep(model, torch.optim.SGD(model.parameters(), lr=0.0), len(samples), len(samples), 0.0, clip,
                       mode, token_budget=budget * samples.views)
    buckets = samples.micro_batches(rows, budget * samples.views)
    assert len(buckets) > 2
    counts = [(samples.targets[b] > 0).reshape(len(b), -1).sum(1) for b in buckets]
    assert views == 1 or any(len(c) > 2 and len(set(c)) > 1 and (np.diff(c) > 0).any() for c in counts)
    step(samples, rows, "cpu")
    step.close()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)


def test_views_carry_each_items_own_side_features():
    """Crop and reorder move a position's features with its item (an item's behaviour code in a view is the one
    it has in the user's own sequence)."""
    samples = _side_samples(users=30, views=3, ops=("crop", "reorder"))
    compared = 0
    for row in range(len(samples)):
        items, side = samples.inputs[row], samples.side[row]
        for view in range(1, samples.views):
            for t in np.flatnonzero(items[view] > 0):
                (own,) = np.flatnonzero(items[0] == items[view, t]) if items[view, t] in items[0] else (None,)
                if own is not None:
                    assert side[view, t, 0] == side[0, own, 0]
                    compared += 1
    assert compared > 100


@pytest.mark.parametrize("kind", ["behaviour", "context"])
def test_each_vector_noise_changes_training_inputs_and_nothing_at_evaluation(kind):
    model = _side_model(5)
    samples = _side_samples(users=4)
    rows = np.arange(4)
    x, _ = samples.batch(rows, "cpu")
    side = samples.batch_side(rows, "cpu")
    model.train()
    clean = model.encode(x, side)
    setattr(model, f"{kind}_noise", 0.5)
    noised = model.encode(x, side)
    assert not torch.allclose(clean, noised)
    other = "context" if kind == "behaviour" else "behaviour"
    setattr(model, f"{kind}_noise", 0.0)
    setattr(model, f"{other}_noise", 0.5)
    assert not torch.allclose(model.encode(x, side), noised)  # the other kind's noise is a different input
    setattr(model, f"{other}_noise", 0.0)
    model.eval()
    evaluated = model.encode(x, side)
    setattr(model, f"{kind}_noise", 0.5)
    torch.testing.assert_close(model.encode(x, side), evaluated)  # evaluation never sees the noise


def test_a_trainer_applies_each_sigma_only_while_training(tmp_path, monkeypatch):
    """The trainer sets behaviour_sigma / context_sigma on the model for the round and clears them after."""
    data = generate(SyntheticSection(users=60, items=50, seed=4, titles=False))
    split = leave_one_out(data)
    seen = []
    original = SASRec._side_vectors

    def spy(self, *args):
        seen.append((self.training, self.behaviour_noise, self.context_noise))
        return original(self, *args)

    monkeypatch.setattr(SASRec, "_side_vectors", spy)
    trainer = LocalTrainer(split.train.sequences(), data.n_items, PrivacySection(epsilon=math.inf),
                           LocalSection(batch_size=16), AugmentSection(views=1, behaviour_sigma=0.3, context_sigma=0.2),
                           None, torch.device("cpu"), rounds=1, seed=0, features=split.train_features())
    model = SASRec(model_config(data.n_items, hidden=16, heads=2, max_len=20, behaviour=True,
                                time_context=True))
    trainer.train_round(model, "run", 1)
    assert seen and all(s == (True, 0.3, 0.2) for s in seen)
    assert (model.behaviour_noise, model.context_noise) == (0.0, 0.0)
