"""RL-U2Net's losses: AGWD (eqs. 18-19), InfoNCE + cosine alignment (eq. 17), the soft-voting ensemble."""
import math

import pytest
import torch

from nnunet_rl.u2net_losses import AGWD, agwd_weight, alignment_loss, cosine_alignment, info_nce, soft_vote


def test_agwd_weight_is_eq_18():
    assert agwd_weight(0.9, 0.4, gamma=2.0, delta=0.1).item() == pytest.approx(math.tanh(2.0 * (0.9 - 0.4 - 0.1)))
    assert agwd_weight(torch.tensor(0.5), torch.tensor(0.5), gamma=1.0, delta=0.0).item() == 0.0


def test_first_balance_is_eq_19_on_the_current_losses():
    agwd = AGWD(gamma=2.0, delta=0.1)
    balanced = agwd.balance("dice", torch.tensor(0.3), torch.tensor(0.8))  # branch b is slow
    w = math.tanh(2.0 * (0.8 - 0.3 - 0.1))
    assert balanced.item() == pytest.approx(0.3 * (1 - w) + 0.8 * (1 + w))
    assert agwd.last_weight["dice"] == pytest.approx(w)
    assert agwd.last_slow["dice"] == 1


def test_weight_follows_the_running_losses_not_one_batch():
    agwd = AGWD(gamma=1.0, delta=0.0, momentum=0.9)
    agwd.balance("ce", torch.tensor(1.0), torch.tensor(0.2))  # running (1.0, 0.2): a slow
    loss_a, loss_b = torch.tensor(0.1), torch.tensor(0.3)  # this batch alone would call b slow
    balanced = agwd.balance("ce", loss_a, loss_b)
    running_a, running_b = 0.9 * 1.0 + 0.1 * 0.1, 0.9 * 0.2 + 0.1 * 0.3
    w = math.tanh(running_a - running_b)
    assert agwd.last_slow["ce"] == 0
    assert balanced.item() == pytest.approx(0.3 * (1 - w) + 0.1 * (1 + w))
    torch.testing.assert_close(agwd.running["ce"], torch.tensor([running_a, running_b]))


def test_loss_kinds_are_balanced_separately():
    agwd = AGWD()
    agwd.balance("dice", torch.tensor(0.9), torch.tensor(0.1))
    agwd.balance("ce", torch.tensor(0.1), torch.tensor(0.9))
    assert agwd.last_slow == {"dice": 0, "ce": 1}


def test_gradients_reach_both_losses_and_favour_the_slow_one():
    loss_a, loss_b = torch.tensor(0.2, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    AGWD(gamma=1.0, delta=0.0).balance("dice", loss_a, loss_b).backward()
    w = math.tanh(0.5)
    assert loss_a.grad.item() == pytest.approx(1 - w) and loss_b.grad.item() == pytest.approx(1 + w)


def test_agwd_state_dict_roundtrip():
    agwd = AGWD()
    agwd.balance("dice", torch.tensor(0.6), torch.tensor(0.4))
    resumed = AGWD()
    resumed.load_state_dict(agwd.state_dict())
    args = ("dice", torch.tensor(0.5), torch.tensor(0.45))
    assert resumed.balance(*args).item() == agwd.balance(*args).item()


def test_info_nce_is_lower_for_identical_features_than_for_shuffled_ones():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 8, 4, 4, 4, generator=generator)
    shuffled = a.flatten(2)[:, :, torch.randperm(64, generator=generator)].reshape(a.shape)
    same = info_nce(a, a.clone(), generator=torch.Generator().manual_seed(1))
    different = info_nce(a, shuffled, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(same) and torch.isfinite(different)
    assert same < different
    assert same < math.log(128)  # below chance over the 128 tokens of the batch


def test_info_nce_samples_at_most_max_tokens_reproducibly_and_gives_gradients():
    a = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    b = torch.randn(1, 4, 6, 6, 6)
    first = info_nce(a, b, max_tokens=16, generator=torch.Generator().manual_seed(3))
    again = info_nce(a, b, max_tokens=16, generator=torch.Generator().manual_seed(3))
    assert first.item() == again.item()
    first.backward()
    assert (a.grad != 0).sum() <= 16 * 4
    with pytest.raises(ValueError, match="one grid"):
        info_nce(a, torch.randn(1, 4, 6, 6, 5))


def test_cosine_alignment_is_zero_for_identical_and_two_for_opposite():
    a = torch.randn(2, 5, 3, 3)
    assert cosine_alignment(a, a).item() == pytest.approx(0, abs=1e-6)
    assert cosine_alignment(a, 2 * a).item() == pytest.approx(0, abs=1e-6)
    assert cosine_alignment(a, -a).item() == pytest.approx(2, abs=1e-6)


def test_alignment_loss_is_eq_17():
    a, b = torch.randn(1, 4, 3, 3, 3), torch.randn(1, 4, 3, 3, 3)
    expected = 0.5 * info_nce(a, b, temperature=0.2) + 2.0 * cosine_alignment(a, b)
    torch.testing.assert_close(alignment_loss(a, b, alpha=0.5, beta=2.0, temperature=0.2), expected)


def test_soft_vote_is_the_log_of_the_averaged_probabilities():
    logits_a, logits_b = torch.randn(2, 4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    probabilities = torch.softmax(soft_vote(logits_a, logits_b), dim=1)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 3, 3, 3))
    torch.testing.assert_close(probabilities, (torch.softmax(logits_a, 1) + torch.softmax(logits_b, 1)) / 2)


def test_soft_vote_is_stable_for_huge_logits():
    logits_a = torch.tensor([[1e4, -1e4, 0.0]]).reshape(1, 3, 1)
    logits_b = torch.tensor([[-1e4, 1e4, 0.0]]).reshape(1, 3, 1)
    voted = soft_vote(logits_a, logits_b)
    assert torch.isfinite(voted).all()
    torch.testing.assert_close(torch.softmax(voted, dim=1).flatten(), torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        soft_vote(logits_a, logits_b[:, :2])
