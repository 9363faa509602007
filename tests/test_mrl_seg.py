"""MRL-Seg (nnunet_rl.mrl_seg, nnUNetTrainerMRLSeg): eqs. 3, 4-5, 10, 11-12 against hand-made maps and naive loops;
the networks; the trainer in nnU-Net's loop."""
import itertools
import math

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from helpers import cloned_state, ddp_steps, resumed_after_an_rl_step, started_trainer
from nnunet_rl import mrl_seg
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.mrl_seg import (MASK, RETAIN, RewardSettings, build_mrl_seg_network, cross_entropy_reward,
                               dataset_foreground_ratio, difficulty, difficulty_returns, foreground_prior,
                               global_reward, masked_input, prior_rewards, retained_prior)
from nnunet_rl.plans.rl_block import MRLSegSettings
from nnunet_rl.trainers.mrl_seg import plot_masks
from nnunet_rl.voxel_actor_critic import NeighbourReturns

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}
NORMS = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
HP = MRLSegSettings(encoder_stages=2, head_channels=8)
SETTINGS = RewardSettings(gamma=0.95, alpha=-0.5, beta=0.25, empty_ratio=0.05, use_prior=True, use_difficulty=True,
                          window=3)


@pytest.mark.parametrize("beta", torch.linspace(0.2, 0.3, 11).tolist())
def test_prior_eq3_peaks_at_a_foreground_background_ratio_in_0447_0548(beta):
    ratios = torch.arange(0.01, 2.0, 1e-4, dtype=torch.float64)
    background = torch.full_like(ratios, 1e4)
    prior = foreground_prior(ratios * background, background, alpha=-0.5, beta=beta)
    peak = ratios[prior.argmax()].item()
    assert 0.447 <= peak <= 0.548
    assert peak == pytest.approx(math.sqrt(beta), abs=1e-4)


def test_global_reward_eq3_on_hand_made_counts():
    rewards = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    foreground, background = torch.tensor([1.0]), torch.tensor([3.0])
    prior = -0.5 * (1 / 3 + 0.25 * 3)
    torch.testing.assert_close(foreground_prior(foreground, background, -0.5, 0.25), torch.tensor([prior]))
    expected = torch.tensor([(10.0 + prior) / 4])
    term = foreground_prior(foreground, background, -0.5, 0.25)
    torch.testing.assert_close(global_reward(rewards, term), expected)
    per_voxel = prior_rewards(rewards, term)
    assert per_voxel.shape == rewards.shape
    torch.testing.assert_close(per_voxel.mean(dim=(1, 2, 3)), expected)


def test_empty_foreground_or_background_stays_finite():
    rewards = torch.zeros(3, 1, 4, 4, 4)
    foreground, background = torch.tensor([0, 64, 0]), torch.tensor([64, 0, 0])
    prior = foreground_prior(foreground, background, -0.5, 0.25)
    assert torch.isfinite(prior).all()
    torch.testing.assert_close(prior[0], torch.tensor(-0.5 * (1 / 64 + 0.25 * 64)))
    assert torch.isfinite(global_reward(rewards, prior)).all()
    assert torch.isfinite(prior_rewards(rewards, prior)).all()
    empty = torch.zeros(3, 4, 4, 4, dtype=torch.long)
    adp = difficulty(empty, window=3)
    assert torch.equal(adp, torch.zeros(3, 1, 4, 4, 4))
    assert torch.isfinite(cross_entropy_reward(torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4), empty)).all()


def test_reward_eq5_on_hand_made_maps():
    # binary: foreground probability p per voxel before and after, as two-class logits [0, log(p / (1 − p))]
    def logits(p):
        p = torch.tensor(p)
        return torch.stack((torch.zeros_like(p), torch.log(p / (1 - p))))[None]

    reference = torch.tensor([[1, 1, 0, 0]])
    previous, current = [0.5, 0.8, 0.2, 0.5], [0.8, 0.5, 0.5, 0.2]
    reward = cross_entropy_reward(logits(previous), logits(current), reference)
    assert reward.shape == (1, 1, 4)
    # eq. 4: −y log p − (1 − y) log(1 − p); eq. 5: P(t−1) − P(t)
    expected = [math.log(0.8 / 0.5), math.log(0.5 / 0.8), math.log(0.5 / 0.8), math.log(0.8 / 0.5)]
    torch.testing.assert_close(reward[0, 0], torch.tensor(expected))


def test_reward_eq5_multiclass_and_masked():
    previous = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]).T)[None]
    current = torch.log(torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]).T)[None]
    reference = torch.tensor([[2, 1, 7]])  # 7: an ignore label, not a class of the logits
    valid = torch.tensor([[[True, True, False]]])
    reward = cross_entropy_reward(previous, current, reference, valid)
    torch.testing.assert_close(reward[0, 0], torch.tensor([math.log(0.8 / 0.3), math.log(0.5 / 0.3), 0.0]))


def naive_difficulty(reference: torch.Tensor, window: int) -> torch.Tensor:
    """Eq. 10 voxel by voxel: among the voxels of the window around i inside the image, i excluded, the fraction
    whose label differs from i's."""
    spatial = reference.shape[1:]
    result = torch.zeros(reference.shape[0], 1, *spatial)
    half = window // 2
    for b in range(reference.shape[0]):
        for i in itertools.product(*map(range, spatial)):
            different = members = 0
            for offset in itertools.product(range(-half, half + 1), repeat=len(spatial)):
                j = tuple(a + o for a, o in zip(i, offset))
                if any(offset) and all(0 <= c < s for c, s in zip(j, spatial)):
                    members += 1
                    different += int(reference[(b, *j)] != reference[(b, *i)])
            result[(b, 0, *i)] = different / members
    return result


@pytest.mark.parametrize("spatial, window", [((6, 7), 3), ((6, 7), 5), ((4, 5, 3), 3), ((5, 4, 6), 5)])
def test_difficulty_eq10_matches_a_loop_over_voxels_and_neighbours(spatial, window):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randint(0, 3, (2, *spatial), generator=generator)
    reference[1] = 0
    reference[1, 1:3, 2:4] = 2
    adp = difficulty(reference, window)
    torch.testing.assert_close(adp, naive_difficulty(reference, window))
    assert adp.min() >= 0 and adp.max() <= 1


def test_difficulty_is_one_for_a_voxel_unlike_all_its_neighbours():
    reference = torch.zeros(1, 5, 5, dtype=torch.long)
    reference[0, 2, 2] = 1
    adp = difficulty(reference, window=3)
    assert adp[0, 0, 2, 2] == 1
    assert adp[0, 0, 1, 1] == pytest.approx(1 / 8)
    assert adp[0, 0, 0, 0] == 0


@pytest.mark.parametrize("window", [1, 4])
def test_difficulty_refuses_windows_without_a_centre_or_neighbours(window):
    with pytest.raises(ValueError, match="odd and at least 3"):
        difficulty(torch.zeros(1, 4, 4, dtype=torch.long), window)


def naive_difficulty_returns(rewards, bootstrap, adp, weight, gamma):
    """Eqs. 11-12 voxel by voxel: R_i(t) = r_i(t) + γ Σ_{j∈N(i)} w_{i−j} (𝔍_i + R_j(t+1)), N(i) the neighbours of i
    inside the image, w_{i−j} stored at weight[centre + (j − i)] (the convolution's layout)."""
    spatial = bootstrap.shape[2:]
    half = weight.shape[0] // 2
    returns = []
    following = bootstrap
    for reward in reversed(rewards):
        current = reward.clone()
        for b in range(reward.shape[0]):
            for i in itertools.product(*map(range, spatial)):
                total = 0.0
                for offset in itertools.product(range(-half, half + 1), repeat=len(spatial)):
                    j = tuple(a + o for a, o in zip(i, offset))
                    if all(0 <= c < s for c, s in zip(j, spatial)):
                        total += weight[tuple(half + o for o in offset)] * (adp[(b, 0, *i)] + following[(b, 0, *j)])
                current[(b, 0, *i)] += gamma * total
        following = current
        returns.append(current)
    return returns[::-1]


@pytest.mark.parametrize("dim, steps", [(2, 2), (2, 3), (3, 2)])
def test_returns_eqs11_12_match_a_loop_over_voxels_and_neighbours(dim, steps):
    torch.manual_seed(0)
    omega = NeighbourReturns(CONVS[dim], kernel_size=3).omega
    with torch.no_grad():
        omega.weight.normal_()
    shape = (2, 1, *[5, 4, 3][:dim])
    rewards = [torch.randn(shape) for _ in range(steps)]
    bootstrap, adp = torch.randn(shape), torch.rand(shape)
    with torch.no_grad():
        returns = difficulty_returns(rewards, bootstrap, adp, omega, gamma=0.95)
        expected = naive_difficulty_returns(rewards, bootstrap, adp, omega.weight[0, 0], 0.95)
    assert len(returns) == steps
    for actual, wanted in zip(returns, expected):
        torch.testing.assert_close(actual, wanted)


def test_returns_without_adp_are_eq12_as_printed_and_omega_learns_from_them():
    torch.manual_seed(0)
    omega = NeighbourReturns(nn.Conv2d, kernel_size=3).omega
    with torch.no_grad():
        omega.weight.normal_()
    rewards = [torch.randn(1, 1, 6, 6) for _ in range(3)]
    bootstrap = torch.randn(1, 1, 6, 6)
    with torch.no_grad():
        first = difficulty_returns(rewards, bootstrap, torch.zeros(1, 1, 6, 6), omega, 0.95)[0]
        # eq. 12: R(0) = r*(0) + γ w∗r*(1) + γ² w²∗r*(2) + γ³ w³∗V(s(3)), wⁿ∗ the convolution applied n times
        expected = rewards[0] + 0.95 * omega(rewards[1]) + 0.95 ** 2 * omega(omega(rewards[2])) + \
            0.95 ** 3 * omega(omega(omega(bootstrap)))
    torch.testing.assert_close(first, expected)
    returns = difficulty_returns(rewards, bootstrap, torch.rand(1, 1, 6, 6), omega, 0.95)
    returns[0].square().mean().backward()
    assert omega.weight.grad.abs().sum() > 0


def test_retained_prior_counts_retained_valid_voxels_and_uses_the_dataset_ratio_without_foreground():
    reference = torch.tensor([[1, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    masked = torch.tensor([[[False, False, True, False, False, False]], [[True, False, False, False, False, False]]])
    valid = torch.tensor([[[True, True, True, True, True, False]], [[True] * 6]])
    prior = retained_prior(masked, reference, valid, empty_ratio=0.1, alpha=-0.5, beta=0.25)
    # sample 0: N_F = 2 (labels 1 and 2 are foreground), N_B = 2 (one masked, one not valid)
    torch.testing.assert_close(prior[0], foreground_prior(torch.tensor(2.0), torch.tensor(2.0), -0.5, 0.25))
    # sample 1: no foreground, the dataset's ratio whatever is masked
    torch.testing.assert_close(prior[1], torch.tensor(-0.5 * (0.1 + 0.25 / 0.1)))
    assert dataset_foreground_ratio({"a": 0.1, "b": 0.1}) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="0 < sum < 1"):
        dataset_foreground_ratio({"a": 0.0})


def test_masking_the_background_of_an_imbalanced_patch_raises_the_prior():
    reference = torch.zeros(1, 10, 10, dtype=torch.long)
    reference[0, :2, :2] = 1  # 4 foreground voxels of 100
    nothing = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    background = (reference == 0)[:, None] & (torch.rand(1, 1, 10, 10, generator=torch.Generator().manual_seed(0))
                                               < 0.9)
    before = retained_prior(nothing, reference, None, 0.05, -0.5, 0.25)
    after = retained_prior(background, reference, None, 0.05, -0.5, 0.25)
    assert after > before


def small_network(dim: int, input_channels: int = 2, hp: MRLSegSettings = HP) -> mrl_seg.MRLSegNetwork:
    segmentation = PlainConvUNet(input_channels=input_channels, n_stages=3, features_per_stage=[4, 8, 8],
                                 conv_op=CONVS[dim], kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1,
                                 num_classes=3, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=NORMS[dim],
                                 norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                                 nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return build_mrl_seg_network(segmentation, input_channels, hp)


def undecided(network: mrl_seg.MRLSegNetwork) -> mrl_seg.MRLSegNetwork:
    """A policy whose greedy actions differ between voxels (the initial policy retains everything greedily)."""
    torch.manual_seed(1)
    with torch.no_grad():
        network.reinforcement.actor_critic.policy.out.bias.zero_()
        network.reinforcement.actor_critic.policy.out.weight.normal_()
    return network


@pytest.mark.parametrize("dim, spatial", [(2, (16, 20)), (3, (8, 8, 12))])
def test_heads_give_two_actions_and_a_value_per_voxel(dim, spatial):
    network = small_network(dim)
    x = torch.randn(2, 2, *spatial)
    logits, values = network.reinforcement(x, torch.zeros(2, 1, *spatial, dtype=torch.bool))
    assert logits.shape == (2, 2, *spatial) and values.shape == (2, 1, *spatial)
    outputs = network(x)  # deep supervision on, no episode: nnU-Net's training outputs on the unmasked input
    assert isinstance(outputs, list) and outputs[0].shape == (2, 3, *spatial)
    torch.testing.assert_close(outputs[0], network.segmentation(x)[0])


def test_masking_zeroes_every_channel_of_masked_voxels():
    image = torch.randn(2, 3, 4, 5)
    masked = torch.rand(2, 1, 4, 5) < 0.5
    out = masked_input(image, masked)
    assert torch.equal(out, torch.where(masked, torch.zeros_like(image), image))


@pytest.mark.parametrize("dim, spatial", [(2, (16, 20)), (3, (8, 8, 12))])
def test_prediction_is_the_segmentation_net_on_the_greedily_masked_input_and_deterministic(dim, spatial):
    network = undecided(small_network(dim)).eval()
    network.decoder.deep_supervision = False  # what nnUNetv2_predict builds
    x = torch.randn(2, 2, *spatial)
    with torch.no_grad():
        first, second = network(x), network(x)
        masks = network.greedy_masks(x)
        expected = network.segmentation(masked_input(x, masks[-1]))
    assert first.shape == (2, 3, *spatial)
    assert torch.equal(first, second)
    assert torch.equal(first, expected)
    assert len(masks) == HP.steps + 1 and not masks[0].any()
    assert 0 < masks[-1].float().mean() < 1
    assert all(torch.equal(earlier & later, earlier) for earlier, later in zip(masks, masks[1:]))  # masks only grow


def test_untrained_policy_masks_nothing_greedily_and_non_finite_policies_retain():
    network = small_network(2).eval()
    network.decoder.deep_supervision = False
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        assert not network.greedy_masks(x)[-1].any()
        torch.testing.assert_close(network(x), network.segmentation(x))
        keep = torch.softmax(network.reinforcement.actor_critic.policy.out.bias, dim=0)[RETAIN]
        assert float(keep) ** HP.steps == pytest.approx(HP.initial_episode_retain_probability)
        network.reinforcement.actor_critic.policy.out.bias[MASK] = 5.0  # mask everything
        assert network.greedy_masks(x)[-1].all()
        network.reinforcement.actor_critic.policy.out.bias.fill_(float("nan"))
        assert not network.greedy_masks(x)[-1].any()


def test_sampled_episodes_retain_voxels_whose_policy_is_not_finite():
    network = small_network(2)
    with torch.no_grad():
        network.reinforcement.actor_critic.policy.out.bias.fill_(float("nan"))
    x, reference = torch.randn(1, 2, 16, 16), torch.randint(0, 3, (1, 16, 16))
    with network.training_episodes(reference, None, SETTINGS, torch.Generator().manual_seed(0)) as episodes:
        network(x)
    (episode,) = episodes
    assert episode.masked_fractions == [0.0] * HP.steps  # retained, as the greedy steps retain them
    assert episode.losses is None


def test_reinforcement_encoder_is_initialised_from_the_segmentation_encoder():
    network = small_network(2)
    with torch.no_grad():
        for parameter in network.segmentation.encoder.parameters():
            parameter.add_(1.0)
    x = torch.randn(1, 2, 16, 16)
    copied = network.reinforcement.encoder
    assert len(copied.body.stages) == HP.encoder_stages
    assert not torch.equal(copied.body(x), network.segmentation.encoder.stages[:2](x))
    copied.initialise_from(network.segmentation.encoder)
    assert torch.equal(copied.body(x), network.segmentation.encoder.stages[:2](x))


@pytest.mark.parametrize("dim", [2, 3])
def test_training_episode_trains_the_reinforcement_net_and_omega_and_returns_the_masked_output(dim):
    network = small_network(dim)
    with torch.no_grad():  # as after a first update: the zero-initialised output layers pass gradients on
        network.reinforcement.actor_critic.policy.out.weight.normal_(std=0.1)
        network.reinforcement.actor_critic.value.out.weight.normal_(std=0.1)
    spatial = (16, 16) if dim == 2 else (8, 8, 8)
    x, reference = torch.randn(2, 2, *spatial), torch.randint(0, 3, (2, *spatial))
    generator = torch.Generator().manual_seed(0)
    with network.training_episodes(reference, None, SETTINGS, generator) as episodes:
        outputs = network(x)
    (episode,) = episodes
    assert isinstance(outputs, list) and outputs[0].shape == (2, 3, *spatial)
    assert len(episode.mean_rewards) == len(episode.masked_fractions) == HP.steps
    assert episode.masked_fractions == sorted(episode.masked_fractions) and episode.masked_fractions[-1] > 0
    episode.losses.total.backward()
    for module in (network.reinforcement.encoder, network.reinforcement.actor_critic.policy,
                   network.reinforcement.actor_critic.value, network.reinforcement.actor_critic.returns):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module
    assert all(p.grad is None for p in network.segmentation.parameters())  # rewards carry no gradient
    outputs[0].sum().backward()
    assert any(p.grad is not None for p in network.segmentation.parameters())


def test_policy_loss_leaves_out_voxels_masked_before_the_step(monkeypatch):
    network = small_network(2)
    with torch.no_grad():  # half the voxels masked per step, with gradients through the output layer
        network.reinforcement.actor_critic.policy.out.bias.zero_()
        network.reinforcement.actor_critic.policy.out.weight.normal_(std=0.1)
        network.reinforcement.actor_critic.value.out.weight.normal_(std=0.1)
    x, reference = torch.randn(2, 2, 12, 12), torch.randint(0, 3, (2, 12, 12))
    valid = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1)) < 0.9
    recorded = {}
    original = mrl_seg.a2c_losses

    def spy(logits, values, actions, returns, *args, **kwargs):
        for step_logits in logits:
            step_logits.retain_grad()
        recorded.update(logits=logits, actions=actions)
        return original(logits, values, actions, returns, *args, **kwargs)
    monkeypatch.setattr(mrl_seg, "a2c_losses", spy)
    with network.training_episodes(reference, valid, SETTINGS, torch.Generator().manual_seed(0)) as episodes:
        network(x)
    episodes[0].losses.policy.backward()
    masked = torch.zeros_like(valid)
    for t, (step_logits, action) in enumerate(zip(recorded["logits"], recorded["actions"])):
        gradient = step_logits.grad.abs().sum(dim=1, keepdim=True)
        if t > 0:
            assert masked.any()
        assert not gradient[masked | ~valid].any(), t  # acting on a masked voxel changes nothing: no policy gradient
        assert gradient[~masked & valid].gt(0).float().mean() > 0.9, t
        masked = masked | (action == MASK)[:, None]


def test_bootstrap_value_is_computed_without_a_graph(monkeypatch):
    network = small_network(2)
    calls = []
    original = mrl_seg.ReinforcementNet.state_value

    def spy(self, *args):
        calls.append(torch.is_grad_enabled())
        return original(self, *args)
    monkeypatch.setattr(mrl_seg.ReinforcementNet, "state_value", spy)
    reference = torch.randint(0, 3, (1, 12, 12))
    with network.training_episodes(reference, None, SETTINGS, torch.Generator().manual_seed(0)):
        network(torch.randn(1, 2, 12, 12))
    assert calls == [False]


def test_episode_rewards_are_eq5_plus_eq3_and_shuffled_for_the_control(monkeypatch):
    network = small_network(2)
    x, reference = torch.randn(1, 2, 12, 12), torch.randint(0, 3, (1, 12, 12))
    recorded = []
    original = mrl_seg.MRLSegNetwork._reward

    def spy(*args):
        reward = original(*args)
        recorded.append((args, reward))
        return reward
    monkeypatch.setattr(mrl_seg.MRLSegNetwork, "_reward", staticmethod(spy))
    with network.training_episodes(reference, None, SETTINGS, torch.Generator().manual_seed(0)):
        network(x)
    (previous, current, masked, ref, valid, settings, generator), reward = recorded[0]
    prior = retained_prior(masked, ref, None, 0.05, -0.5, 0.25)
    torch.testing.assert_close(reward, prior_rewards(cross_entropy_reward(previous, current, ref), prior))
    control = original(previous, current, masked, ref, None, RewardSettings(**{**vars(SETTINGS),
                                                                                "shuffle_rewards": True}),
                       torch.Generator().manual_seed(0))
    assert not torch.equal(control, reward)
    assert torch.equal(control.flatten().sort().values, reward.flatten().sort().values)


@pytest.fixture(scope="module")
def trainer(planned_dataset):
    from nnunet_rl.trainers import nnUNetTrainerMRLSeg_3epochs_2iters
    yield from started_trainer(planned_dataset, nnUNetTrainerMRLSeg_3epochs_2iters, "2d")


def test_trainer_reads_the_dataset_foreground_ratio_from_the_rl_block(trainer):
    fractions = trainer.rl_block["dataset"]["label_fractions"]
    assert trainer.reward_settings.empty_ratio == pytest.approx(dataset_foreground_ratio(fractions))
    assert 0 < trainer.reward_settings.empty_ratio < 1


def test_trainer_pretrains_then_initialises_the_reinforcement_net_and_trains_it(trainer):
    assert trainer.rl_start_epoch == 1  # floor(0.5 · 3)
    network = trainer.bare_network
    trainer.current_epoch = 0
    before = cloned_state(trainer.rl_module)
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    assert all(torch.equal(before[k], v) for k, v in network.reinforcement.state_dict().items())
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()  # the first RL epoch: the encoder copies the pre-trained Segmentation-Net's
    source = network.segmentation.encoder.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in network.reinforcement.encoder.body.state_dict().items())
    initialised = cloned_state(trainer.rl_module)
    trainer.train_step(next(trainer.dataloader_train))
    after = network.reinforcement.state_dict()
    assert not torch.equal(initialised["actor_critic.policy.out.weight"], after["actor_critic.policy.out.weight"])
    (episode,) = trainer._episodes
    assert episode.losses is not None and all(math.isfinite(r) for r in episode.mean_rewards)
    trainer.on_train_epoch_end([{"loss": 0.0}])
    logged = trainer.logger.local_logger.my_fantastic_logging
    assert math.isfinite(logged["mrl_seg/reward_step4"][-1]) and logged["mrl_seg/skipped_updates"][-1] == 0


def test_validation_in_the_rl_phase_measures_the_masked_segmentation_per_step(trainer, tmp_path):
    trainer.current_epoch = 1
    network = trainer.bare_network
    bias = network.reinforcement.actor_critic.policy.out.bias.detach().clone()
    try:
        with torch.no_grad():
            network.reinforcement.actor_critic.policy.out.bias.copy_(torch.tensor([20.0, -20.0]))  # mask everything
        trainer.on_validation_epoch_start()
        result = trainer.validation_step(next(trainer.dataloader_val))
    finally:
        with torch.no_grad():
            network.reinforcement.actor_critic.policy.out.bias.copy_(bias)
    (confusion,) = trainer._step_confusions
    assert confusion.shape[0] == HP.steps + 1
    assert trainer._figure_patch["masks"][-1].all() and not trainer._figure_patch["masked"].any()
    trainer.on_validation_epoch_end([result])
    assert len(trainer.step_dice_history[1]) == HP.steps + 1
    plot_masks(trainer._figure_patch, str(tmp_path / "masks.png"))
    assert (tmp_path / "masks.png").stat().st_size > 0


def test_trainer_skips_the_update_on_non_finite_rewards(trainer, monkeypatch):
    def nan_reward(previous, current, reference, valid=None):
        return torch.full_like(previous[:, :1], float("nan"))
    monkeypatch.setattr(mrl_seg, "cross_entropy_reward", nan_reward)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    before = cloned_state(trainer.rl_module)
    trainer.train_step(next(trainer.dataloader_train))
    after = trainer.bare_network.reinforcement.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "actor_critic" in k)
    trainer.on_train_epoch_end([{"loss": 0.0}])
    assert trainer.logger.local_logger.my_fantastic_logging["mrl_seg/skipped_updates"][-1] == 1


def test_reinforcement_net_trains_with_adam_and_the_segmentation_net_with_nnunets_sgd(trainer):
    from nnunet_rl.heads_optimizer import SGDWithAdamHeads
    optimizer = trainer.optimizer
    assert isinstance(optimizer, SGDWithAdamHeads)
    network = trainer.bare_network
    in_sgd = {id(p) for group in optimizer.sgd.param_groups for p in group["params"]}
    in_adam = {id(p) for group in optimizer.adam.param_groups for p in group["params"]}
    assert in_adam == {id(p) for p in network.reinforcement.parameters()}  # encoder, heads and w
    assert in_sgd == {id(p) for p in network.segmentation.parameters()}
    assert optimizer.sgd.defaults["momentum"] == 0.99 and optimizer.sgd.defaults["nesterov"]  # nnU-Net's
    assert optimizer.lr_scale == pytest.approx(MRLSegSettings().heads_lr / trainer.initial_lr)


def test_reward_telemetry_averages_the_finite_episodes(trainer):
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    skipped = mrl_seg.Episode(None, [float("nan")] * HP.steps, [0.0] * HP.steps)
    finite = mrl_seg.Episode(mrl_seg.A2CLosses(torch.tensor(0.5), torch.tensor(0.25)),
                             [1.0, 2.0, 3.0, 4.0], [0.1] * HP.steps)
    trainer._episodes = [skipped, finite, finite]
    trainer.on_train_epoch_end([{"loss": 0.0}])
    logged = trainer.logger.local_logger.my_fantastic_logging
    assert [logged[f"mrl_seg/reward_step{t}"][-1] for t in range(1, 5)] == [1.0, 2.0, 3.0, 4.0]
    assert logged["mrl_seg/skipped_updates"][-1] == 1 and logged["mrl_seg/policy_loss"][-1] == 0.5


def test_checkpoint_round_trip_restores_the_reinforcement_net_adam_and_sampler(trainer, tmp_path, planned_dataset):
    resumed = resumed_after_an_rl_step(trainer, planned_dataset, tmp_path, fallback=RETAIN)
    for key, value in trainer.bare_network.state_dict().items():
        assert torch.equal(value, resumed.bare_network.state_dict()[key]), key
    assert resumed.step_dice_history == trainer.step_dice_history


@pytest.mark.parametrize("variant, pinned", [("_noFB", {"use_prior": False}), ("_noADP", {"use_difficulty": False}),
                                             ("_noPretrain", {"pretrain": False, "use_prior": False,
                                                              "use_difficulty": False})])
def test_variants_pin_the_table_v_ablations(variant, pinned):
    from nnunet_rl import trainers
    cls = getattr(trainers, f"nnUNetTrainerMRLSeg{variant}")
    assert cls.hyperparameters_from({}, "mrl_seg") == MRLSegSettings(**pinned)
    assert issubclass(getattr(trainers, f"nnUNetTrainerMRLSeg{variant}_3epochs_2iters"), cls)
    assert trainers.nnUNetTrainerMRLSeg_shuffledReward.shuffle_rewards


def test_region_based_datasets_are_refused(trainer, monkeypatch):
    monkeypatch.setattr(type(trainer.label_manager), "has_regions", property(lambda self: True))
    with pytest.raises(NnunetRLError, match="regions"):
        type(trainer).initialize(trainer)


@pytest.mark.parametrize("fractions, message", [(None, "rerun `nnunet-rl plan"), ({"1": 0.6, "2": 0.4}, "0 < sum < 1")])
def test_missing_or_invalid_label_fractions_are_refused(trainer, monkeypatch, fractions, message):
    block = {**trainer.rl_block, "dataset": {**trainer.rl_block["dataset"], "label_fractions": fractions}}
    monkeypatch.setattr(type(trainer), "rl_block", property(lambda self: block))
    with pytest.raises(NnunetRLError, match=message):
        trainer._dataset_foreground_ratio(MRLSegSettings())


def test_an_unknown_heads_optimizer_is_refused(trainer, monkeypatch):
    monkeypatch.setattr(trainer, "rl_hyperparameters", lambda component: MRLSegSettings(heads_optimizer="rmsprop"))
    with pytest.raises(NnunetRLError, match="'adam' or 'sgd', not 'rmsprop'"):
        trainer.configure_optimizers()


def test_ddp_accepts_the_reinforcement_net_trained_in_the_loss_and_idle_with_a_zero_gradient(
        single_rank_process_group):
    """As PixelRL's heads: the episode runs in the wrapped forward, its A2C losses join the loss outside it; before
    the RL phase the Reinforcement-Net is unused and gets its gradient from the zero term."""
    from nnunet_rl.trainers.base import RLTrainerBase
    network, inputs = small_network(2), torch.randn(2, 2, 16, 16)
    with network.training_episodes(torch.randint(0, 3, (2, 16, 16)), None, SETTINGS, None) as episodes:
        ddp_steps(network, inputs, lambda network, outputs: episodes[-1].losses.total)
    ddp_steps(small_network(2), inputs,
              lambda network, outputs: RLTrainerBase.zero_gradient_term(network.reinforcement))
    with pytest.raises(RuntimeError, match="reduction"):  # the pre-training phase without the term
        ddp_steps(small_network(2), inputs, lambda network, outputs: 0.0)
