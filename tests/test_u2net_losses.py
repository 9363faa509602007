"""RL-U2Net's losses: AGWD (eqs. 18-19), InfoNCE + cosine alignment (eq. 17), the soft-voting ensemble."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_rl.u2net_losses import (AGWD, agwd_weight, alignment_loss, cosine_alignment, info_nce, paired_tokens,
                                   soft_vote, token_similarities)


def test_agwd_weight_is_eq_18():
    assert agwd_weight(0.9, 0.4, gamma=2.0, delta=0.1).item() == pytest.approx(math.tanh(2.0 * (0.9 - 0.4 - 0.1)))
    assert agwd_weight(torch.tensor(0.5), torch.tensor(0.5), gamma=1.0, delta=0.0).item() == 0.0


def test_first_balance_is_eq_19_on_the_current_losses():
    agwd = AGWD(gamma=2.0, delta=0.1)
    balanced = agwd.balance("dice", torch.tensor(0.3), torch.tensor(0.8))  # branch b is slow
    w = math.tanh(2.0 * (0.8 - 0.3 - 0.1))
    assert balanced.item() == pytest.approx(0.3 * (1 - w) + 0.8 * (1 + w))
    assert agwd.last_weight["dice"] == pytest.approx(w)


def test_weight_follows_the_running_losses_not_one_batch():
    agwd = AGWD(gamma=1.0, delta=0.0, momentum=0.9)
    agwd.balance("ce", torch.tensor(1.0), torch.tensor(0.2))  # running (1.0, 0.2): a slow
    loss_a, loss_b = torch.tensor(0.1), torch.tensor(0.3)  # this batch alone would call b slow
    balanced = agwd.balance("ce", loss_a, loss_b)
    running_a, running_b = 0.9 * 1.0 + 0.1 * 0.1, 0.9 * 0.2 + 0.1 * 0.3
    w = math.tanh(running_a - running_b)
    assert balanced.item() == pytest.approx(0.3 * (1 - w) + 0.1 * (1 + w))  # a, slow by its running loss, gets 1 + w
    torch.testing.assert_close(agwd.running["ce"], torch.tensor([running_a, running_b]))


def test_loss_kinds_are_balanced_separately():
    agwd = AGWD()
    dice = agwd.balance("dice", torch.tensor(0.9), torch.tensor(0.1))
    ce = agwd.balance("ce", torch.tensor(0.1), torch.tensor(0.9))
    w = math.tanh(0.9 - 0.1)
    assert dice.item() == pytest.approx(0.1 * (1 - w) + 0.9 * (1 + w)) == ce.item()  # a slow in one, b in the other
    assert set(agwd.running) == {"dice", "ce"}


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
    a = torch.randn(128, 8, generator=generator)
    same = info_nce(token_similarities(a, a.clone()))
    different = info_nce(token_similarities(a, a[torch.randperm(128, generator=generator)]))
    assert torch.isfinite(same) and torch.isfinite(different)
    assert same < different
    assert same < math.log(128)  # below chance over the 128 tokens


def test_paired_tokens_takes_the_same_voxels_of_all_maps_at_most_max_tokens_reproducibly():
    a = torch.randn(2, 4, 6, 5, 7)
    tokens = paired_tokens([a, 2 * a, -a], max_tokens=16, generator=torch.Generator().manual_seed(3))
    again = paired_tokens([a], max_tokens=16, generator=torch.Generator().manual_seed(3))
    assert tokens.shape == (3, 16, 4) and torch.equal(tokens[0], again[0])
    torch.testing.assert_close(tokens[1], 2 * tokens[0])
    torch.testing.assert_close(tokens[2], -tokens[0])
    all_vectors = a.movedim(1, -1).reshape(-1, 4)
    assert all((all_vectors == token).all(dim=1).any() for token in tokens[0])  # real voxels' channel vectors
    assert len({tuple(t.tolist()) for t in tokens[0]}) == 16  # distinct voxels
    small = a[:, :, :2, :2, :2]
    torch.testing.assert_close(paired_tokens([small, small], max_tokens=16)[0],
                               small.movedim(1, -1).reshape(-1, 4))  # 16 voxels: all of them
    with pytest.raises(ValueError, match="one grid"):
        paired_tokens([a, torch.randn(2, 4, 6, 5, 6)], max_tokens=16)


def test_alignment_loss_reaches_only_the_sampled_voxels():
    a = torch.randn(1, 4, 6, 6, 6, requires_grad=True)
    alignment_loss([a], [torch.randn(1, 4, 6, 6, 6)], max_tokens=16,
                   generator=torch.Generator().manual_seed(3)).backward()
    assert 0 < (a.grad.abs().sum(dim=1) != 0).sum() <= 16


def test_cosine_alignment_is_zero_for_identical_and_two_for_opposite():
    a = torch.randn(18, 5)
    assert cosine_alignment(token_similarities(a, a)).item() == pytest.approx(0, abs=1e-6)
    assert cosine_alignment(token_similarities(a, 2 * a)).item() == pytest.approx(0, abs=1e-6)
    assert cosine_alignment(token_similarities(a, -a)).item() == pytest.approx(2, abs=1e-6)
    torch.testing.assert_close(token_similarities(a, a.flip(0)).diagonal(),
                               torch.nn.functional.cosine_similarity(a, a.flip(0), dim=1))


def test_info_nce_is_the_mean_of_both_cross_entropies():
    similarities = torch.randn(6, 6)
    targets = torch.arange(6)
    expected = (F.cross_entropy(similarities / 0.2, targets) + F.cross_entropy(similarities.T / 0.2, targets)) / 2
    torch.testing.assert_close(info_nce(similarities, temperature=0.2), expected)
    torch.testing.assert_close(info_nce(torch.stack((similarities, similarities.T)), temperature=0.2),
                               torch.stack((expected, expected)))  # batched over leading axes


def test_alignment_loss_is_eq_17_on_the_sampled_tokens():
    a, b = torch.randn(1, 4, 3, 3, 3), torch.randn(1, 4, 3, 3, 3)
    tokens_a, tokens_b = paired_tokens([a, b], max_tokens=8, generator=torch.Generator().manual_seed(0))
    similarities = token_similarities(tokens_a, tokens_b)
    expected = 0.5 * info_nce(similarities, temperature=0.2) + 2.0 * cosine_alignment(similarities)
    actual = alignment_loss([a], [b], alpha=0.5, beta=2.0, temperature=0.2, max_tokens=8,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(actual, expected)


def test_alignment_loss_sums_pairs_and_batches_pairs_of_one_grid_on_shared_voxels():
    generator = torch.Generator().manual_seed(1)
    fine = [torch.randn(2, 4, 6, 6, 6, generator=generator) for _ in range(4)]
    coarse = [torch.randn(2, 8, 3, 3, 3, generator=generator) for _ in range(2)]
    own, aligned = [fine[0], coarse[0], fine[1]], [fine[2], coarse[1], fine[3]]
    actual = alignment_loss(own, aligned, max_tokens=16, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # the groups draw their voxels in the order they first appear
    state = draws.get_state()
    expected = alignment_loss([fine[0]], [fine[2]], max_tokens=16, generator=draws)
    draws.set_state(state)  # the two pairs of one grid share the voxels
    expected = expected + alignment_loss([fine[1]], [fine[3]], max_tokens=16, generator=draws)
    expected = expected + alignment_loss([coarse[0]], [coarse[1]], max_tokens=16, generator=draws)
    torch.testing.assert_close(actual, expected)


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
