"""The model is trainable under Opacus with per-user clipping, in both hooks and ghost modes.

Per-sample gradient norms from Opacus must match a torch.func reference (vmap over users of the gradient of each
user's own loss) — which also proves that dim 0 is the user through every parametrised layer.
"""

import pytest
import torch
from opacus import PrivacyEngine
from torch.func import functional_call, grad, vmap

from fedaug.common.model.sasrec import PerUserCrossEntropy, SASRec
from tests.support import model_config

N_ITEMS = 40


def _batch(seed=0, users=6, width=7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])[:users]
    items = torch.randint(1, N_ITEMS + 1, (users, width), generator=g)
    targets = torch.randint(1, N_ITEMS + 1, (users, width), generator=g)
    positions = torch.arange(width).expand(users, width)
    items[positions >= lengths[:, None]] = 0  # right padding
    targets[positions >= lengths[:, None]] = 0
    return items, targets


def _reference_grads(model, items, targets):
    """[users, parameters]: each user's own gradient (torch.func), in model.parameters() order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    criterion = PerUserCrossEntropy(reduction="sum")

    def user_loss(p, x, y):
        return criterion(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    grads = vmap(grad(user_loss), in_dims=(None, 0, 0))(params, items, targets)
    return torch.cat([grads[k].reshape(len(items), -1) for k, _ in model.named_parameters()], dim=1)


def _reference_norms(model, items, targets):
    return _reference_grads(model, items, targets).norm(dim=1)


def _private(model, mode, max_grad_norm):
    """(module, optimizer, criterion): ghost mode wraps the criterion, hooks mode uses it as is."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 1)), batch_size=6)
    out = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        criterion=PerUserCrossEntropy(), noise_multiplier=0.0, max_grad_norm=max_grad_norm, grad_sample_mode=mode,
        poisson_sampling=False)
    return (out[0], out[1], out[2]) if mode == "ghost" else (out[0], out[1], PerUserCrossEntropy())


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_per_sample_norms_match_torch_func(mode):
    torch.manual_seed(0)
    model = SASRec(model_config(N_ITEMS, hidden=16, heads=2, max_len=8, dropout=0.0))
    items, targets = _batch()
    expected = _reference_norms(model, items, targets)

    private_model, optimizer, criterion = _private(model, mode, max_grad_norm=1e6)
    loss = criterion(private_model(items), targets)
    loss.backward()
    if mode == "hooks":
        per_sample = [p.grad_sample.reshape(len(items), -1) for p in private_model.parameters() if p.requires_grad]
        norms = torch.cat(per_sample, dim=1).norm(dim=1)
    else:
        norms = private_model.per_sample_gradient_norms
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    assert (expected > 0).all()


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_opacus_clips_each_user_to_max_grad_norm(mode):
    torch.manual_seed(1)
    model = SASRec(model_config(N_ITEMS, hidden=16, heads=2, max_len=8, dropout=0.0))
    items, targets = _batch(seed=3)
    per_user = _reference_grads(model, items, targets)
    norms = per_user.norm(dim=1)
    clip = float(norms.min()) / 2  # every user must be clipped
    private_model, optimizer, criterion = _private(model, mode, max_grad_norm=clip)
    loss = criterion(private_model(items), targets)
    loss.backward()
    if mode == "hooks":
        optimizer.pre_step()
    summed = torch.cat([p.grad.reshape(-1) if mode == "ghost" else p.summed_grad.reshape(-1)
                        for p in private_model.parameters() if p.requires_grad])
    # Each user contributes its own gradient rescaled to norm exactly `clip`: the sum is that, vector for vector
    # (a zero or per-position-clipped sum fails here, where a norm bound alone would pass).
    expected = (per_user * (clip / norms)[:, None]).sum(0)
    torch.testing.assert_close(summed, expected, rtol=1e-3, atol=1e-6)
    assert summed.norm() <= len(items) * clip * (1 + 1e-5)
