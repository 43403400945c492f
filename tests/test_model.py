"""SASRec: padding never leaks into real positions, the two loss paths agree, batches trim to their longest row."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedaug.common.errors import ConfigError
from fedaug.common.model.batching import UserSamples, pad_right
from fedaug.common.model.device import pick_device
from fedaug.common.model.sasrec import SASRec, smoothed_cross_entropy
from fedaug.common.model.training import train_step
from tests.support import model_config


def _model(**kw):
    torch.manual_seed(0)
    cfg = model_config(30, hidden=16, heads=2, max_len=10, dropout=0.0, label_smoothing=0.0, **kw)
    return SASRec(cfg).eval()


def test_right_padding_does_not_change_real_positions():
    model = _model()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[3, 4, 5, 0, 0, 0]])
    torch.testing.assert_close(model.encode(short), model.encode(padded)[:, :3])
    scores = model.score(padded, torch.tensor([3]))
    torch.testing.assert_close(scores, model.out(model.encode(short)[:, -1]))


def test_per_user_loss_and_flattened_loss_agree():
    model = _model()
    items = torch.tensor([[1, 2, 3], [4, 5, 0]])
    targets = torch.tensor([[2, 3, 6], [5, 7, 0]])
    flat = model.loss(items, targets)
    per_user = model.loss(items, targets, per_user=True)
    assert per_user.shape == (2,)
    full = torch.nn.functional.cross_entropy(model(items)[targets > 0], targets[targets > 0])
    torch.testing.assert_close(flat, full)
    # each user's own mean: recompute user 1 alone
    torch.testing.assert_close(per_user[1], model.loss(items[1:, :2], targets[1:, :2]))


def test_sampled_negative_loss_trains():
    torch.manual_seed(0)
    model = SASRec(model_config(30, hidden=16, heads=2, max_len=10, dropout=0.0, loss="sampled",
                                negatives=8))
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]])
    targets = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 0]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(items, targets).item()
    for _ in range(30):
        optimizer.zero_grad()
        model.loss(items, targets).backward()
        optimizer.step()
    assert model.loss(items, targets).item() < first
    assert model.loss(items, targets, per_user=True).shape == (2,)
    assert model.score(items, torch.tensor([4, 3])).shape == (2, 31)


def test_samples_trim_each_batch_to_its_longest_sequence():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.arange(1, 30) % 20 + 1, np.array([5, 6])]
    examples = UserSamples(seqs, max_len=10)
    assert list(examples.users) == [0, 2, 3]  # a single event gives no (input, target) pair
    inputs, targets = examples.batch(np.array([0, 1]), "cpu")  # example rows: users 0 and 2
    assert inputs.shape == (2, 1, 10)
    assert inputs[0, 0].tolist()[:3] == [1, 2, 0] and targets[0, 0].tolist()[:3] == [2, 3, 0]
    assert targets[1, 0].tolist() == (np.arange(1, 30) % 20 + 1)[-10:].tolist()
    inputs, _ = examples.batch(np.array([0]), "cpu")
    assert inputs.shape == (1, 1, 2)
    padded, lengths = pad_right([np.array([1, 2, 3, 4])], max_len=2)
    assert padded.tolist() == [[3, 4]] and lengths.tolist() == [2]


def test_device_choice():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(ConfigError):
        pick_device("tpu")


def test_views_dimension_keeps_users_first_and_matches_single_views():
    model = _model()
    a = torch.tensor([[1, 2, 3], [4, 5, 0]])
    b = torch.tensor([[3, 1, 0], [6, 7, 8]])
    both = torch.stack([a, b], dim=1)  # [B=2, views=2, T=3]
    torch.testing.assert_close(model.encode(both)[:, 3:], model.encode(b))  # views side by side, independent
    targets = torch.stack([torch.tensor([[2, 3, 9], [5, 6, 0]]), torch.tensor([[1, 4, 0], [7, 8, 9]])], dim=1)
    per_user = model.loss(both, targets, per_user=True)
    # user 0 has 3 + 2 targets over its two views: the mean over those five positions
    logits = model(both[0])
    manual = torch.nn.functional.cross_entropy(logits[targets[0] > 0], targets[0][targets[0] > 0])
    torch.testing.assert_close(per_user[0], manual)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_smoothed_cross_entropy_matches_torch_in_value_and_gradient(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    weights = torch.rand(7, dtype=torch.float64)
    expected = F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
    got = smoothed_cross_entropy(logits, labels, smoothing)
    torch.testing.assert_close(got, expected)
    (g_expected,) = torch.autograd.grad((expected * weights).sum(), logits)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_expected)
    assert torch.autograd.gradcheck(lambda z: smoothed_cross_entropy(z, labels, smoothing), (logits,))


def test_a_bucketed_step_takes_the_gradient_of_one_padded_batch():
    rng = np.random.default_rng(4)
    seqs = [rng.integers(1, 31, rng.integers(2, 11)) for _ in range(12)]
    samples = UserSamples(seqs, max_len=10)
    rows = np.arange(len(samples))
    model = _model()
    model.loss(*samples.batch(rows, "cpu")).backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters()}
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), samples, rows, "cpu", token_budget=12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def _catalog_model(item_dim=4):
    torch.manual_seed(0)
    attributes = torch.tensor([[0, 0]] + [[1 + i % 5, 0 if i % 3 else 6] for i in range(30)])
    cfg = model_config(30, hidden=16, heads=2, max_len=10, dropout=0.0, item_dim=item_dim, n_attributes=6)
    return SASRec(cfg, attributes)


@pytest.mark.parametrize("item_dim", [0, 4, 16])
def test_catalog_models_score_every_item_and_train_both_loss_paths(item_dim):
    model = _catalog_model(item_dim)
    items = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    targets = torch.tensor([[2, 3, 4, 0], [5, 6, 0, 0]])
    assert model(items).shape == (2, 4, 31)
    flat = model.loss(items, targets)
    per_user = model.loss(items, targets, per_user=True)
    assert torch.isfinite(flat) and per_user.shape == (2,)
    flat.backward()
    assert model.attr_emb.weight.grad.abs().sum() > 0 and model.attr_scores.weight.grad.abs().sum() > 0
    assert model.score(items, torch.tensor([3, 2])).shape == (2, 31)
    assert "item_attributes" not in model.state_dict()  # public catalog: rebuilt by every party, never sent


def test_items_with_the_same_attributes_score_alike_without_item_tables():
    model = _catalog_model(item_dim=0)
    scores = model.score(torch.tensor([[1, 2, 3]]), torch.tensor([3]))[0]
    assert scores[1] == scores[16]  # items 1 and 16 both have attributes {1, 6} and nothing else
    assert scores[1] != scores[2]


def test_attribute_noise_applies_only_while_training():
    model = _catalog_model()
    items = torch.tensor([[1, 2, 3]])
    model.attribute_noise = 0.5
    model.eval()
    torch.testing.assert_close(model(items), model(items))
    model.train()
    assert not torch.allclose(model(items), model(items))
    model.attribute_noise = 0.0
    torch.testing.assert_close(model(items), model(items))  # dropout 0: only the vector noise was random


def test_attribute_noise_is_the_seeds_formula():
    """a' = a + N(0, σ²) on every attribute vector an item is built from (the seed's vector-noise augmentation)."""
    model = _catalog_model(item_dim=0).train()
    items = torch.full((1, 2000), 2)  # item 2 has exactly one attribute (id 3)
    model.attribute_noise = 0.0
    clean = model._item_vectors(items)
    model.attribute_noise = 0.5
    noise = (model._item_vectors(items) - clean) / model.attribute_weight[items]
    assert abs(float(noise.std()) - 0.5) < 0.02 and abs(float(noise.mean())) < 0.02


def test_bad_catalog_tables_are_refused():
    cfg = model_config(3, hidden=8, heads=2, n_attributes=2)
    with pytest.raises(ValueError, match="item_attributes"):
        SASRec(cfg, torch.tensor([[0], [1], [2]]))  # 3 rows for 4 ids
    with pytest.raises(ValueError, match="0..2"):
        SASRec(cfg, torch.tensor([[0], [1], [2], [7]]))
    with pytest.raises(ValueError, match="catalog"):
        SASRec(dataclasses.replace(model_config(3, hidden=8, heads=2), item_dim=0))  # ModelSection refuses it too
