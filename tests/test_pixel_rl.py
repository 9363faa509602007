"""PixelDRL-MG's per-voxel actor-critic (nnunet_rl.voxel_actor_critic, nnunet_rl.pixel_rl) and nnUNetTrainerPixelRL."""
import dataclasses
import itertools
from pathlib import Path

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from helpers import cloned_state, ddp_steps, resumed_after_an_rl_step, started_trainer
from nnunet_rl import agent_figures, pixel_rl
from nnunet_rl.pixel_rl import KEEP, SET_TO_BACKGROUND, build_pixel_rl_network, squared_error_reward
from nnunet_rl.plans.rl_block import PixelRLSettings
from nnunet_rl.voxel_actor_critic import (NeighbourReturns, VoxelActorCritic, a2c_losses, greedy_rollout,
                                          sample_actions)

HP = PixelRLSettings(t_max=3)
HP_TRAINER_STEPS = PixelRLSettings().t_max
OPS = {2: (nn.Conv2d, nn.InstanceNorm2d), 3: (nn.Conv3d, nn.InstanceNorm3d)}


def small_network(dim: int, num_classes: int = 3, hp: PixelRLSettings = HP) -> pixel_rl.PixelRLNetwork:
    conv_op, norm_op = OPS[dim]
    backbone = PlainConvUNet(input_channels=1, n_stages=3, features_per_stage=[4, 8, 8], conv_op=conv_op,
                             kernel_sizes=3, strides=[1, 2, 2], n_conv_per_stage=1, num_classes=num_classes,
                             n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm_op,
                             norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                             nonlin_kwargs={"inplace": True}, deep_supervision=True)
    return build_pixel_rl_network(backbone, num_classes, hp)


def test_reward_eq12_on_hand_made_maps():
    # voxels: false positive removed, true positive removed, wrong class removed, kept, background kept
    previous = torch.tensor([[1, 2, 1, 2, 0]])
    current = torch.tensor([[0, 0, 0, 2, 0]])
    reference = torch.tensor([[0, 2, 2, 2, 0]])
    reward = squared_error_reward(previous, current, reference, num_classes=3)
    assert reward.shape == (1, 1, 5)
    assert reward[0, 0].tolist() == [2.0, -2.0, 0.0, 0.0, 0.0]


def naive_neighbour_return(reward, next_value, weight, gamma):
    """Eq. 8 voxel by voxel: R_i = r_i + γ Σ_{j∈N(i)} ω_{i−j} V_j, N(i) the 3^d window around i (zero outside),
    ω_{i−j} stored at weight[centre + (j − i)] (the convolution's layout)."""
    spatial = reward.shape[2:]
    result = reward.clone()
    for i in itertools.product(*map(range, spatial)):
        total = 0.0
        for offset in itertools.product((-1, 0, 1), repeat=len(spatial)):
            j = tuple(a + o for a, o in zip(i, offset))
            if all(0 <= c < s for c, s in zip(j, spatial)):
                total += weight[tuple(1 + o for o in offset)] * next_value[(0, 0, *j)]
        result[(0, 0, *i)] += gamma * total
    return result


@pytest.mark.parametrize("dim", [2, 3])
def test_returns_eq8_match_a_loop_over_neighbours(dim):
    torch.manual_seed(0)
    returns = NeighbourReturns(OPS[dim][0], kernel_size=3)
    with torch.no_grad():
        returns.omega.weight.normal_()
    shape = (1, 1, *[5, 4, 3][:dim])
    reward, next_value = torch.randn(shape), torch.randn(shape)
    with torch.no_grad():
        (one_step,) = returns([reward], next_value, gamma=0.95)
        expected = naive_neighbour_return(reward, next_value, returns.omega.weight[0, 0], 0.95)
        torch.testing.assert_close(one_step, expected)
        # three steps, Algorithm 1: R(2) is eq. 8, then R(t) = r(t) + γ R(t+1); ω weights values, not rewards
        rewards = [torch.randn(shape) for _ in range(3)]
        returns_by_step = returns(rewards, next_value, gamma=0.95)
        last = naive_neighbour_return(rewards[2], next_value, returns.omega.weight[0, 0], 0.95)
        torch.testing.assert_close(returns_by_step[2], last)
        torch.testing.assert_close(returns_by_step[1], rewards[1] + 0.95 * last)
        torch.testing.assert_close(returns_by_step[0], rewards[0] + 0.95 * rewards[1] + 0.95 ** 2 * last)


def test_omega_starts_as_the_per_voxel_a3c_return():
    returns = NeighbourReturns(nn.Conv3d)
    reward, value = torch.randn(1, 1, 4, 4, 4), torch.randn(1, 1, 4, 4, 4)
    torch.testing.assert_close(returns([reward], value, 0.95)[0], reward + 0.95 * value)


@pytest.mark.parametrize("dim, spatial", [(2, (13, 17)), (3, (5, 7, 9))])
@pytest.mark.parametrize("use_sam, dilations", [(True, (1, 2, 4)), (False, (1, 1, 1))])
def test_heads_output_one_value_per_voxel(dim, spatial, use_sam, dilations):
    conv_op, norm_op = OPS[dim]
    heads = VoxelActorCritic(feature_channels=6, state_channels=3, num_actions=2, conv_op=conv_op, norm_op=norm_op,
                             dilations=dilations, use_sam=use_sam)
    features, state = torch.randn(2, 6, *spatial), torch.randn(2, 3, *spatial)
    logits, values = heads(heads.attend(features), state)
    assert logits.shape == (2, 2, *spatial) and values.shape == (2, 1, *spatial)
    assert sample_actions(logits, fallback=1).shape == (2, *spatial)


def concatenated_input_heads(heads: VoxelActorCritic, features: torch.Tensor, state: torch.Tensor):
    """Both heads run on the concatenation [SAM(features), state], written out layer by layer."""
    joint = torch.cat((heads.sam(features), state), dim=1)
    return tuple(head.out(head.body(joint)) for head in (heads.policy, heads.value))


@pytest.mark.parametrize("dim, spatial", [(2, (13, 17)), (3, (5, 7, 9))])
@pytest.mark.parametrize("norm", [True, False])
def test_heads_respond_to_the_fixed_features_once_as_to_the_concatenated_input(dim, spatial, norm):
    """The first convolution split into the fixed features' share (once per episode) and the state's (every step) is
    the convolution of [features, state]: the same logits and values, and the same gradients for every parameter and
    for the features. In float64, so that rounding cannot hide a difference; without a norm too, which would hide a
    constant added to the first layer."""
    conv_op, norm_op = OPS[dim]
    heads = VoxelActorCritic(feature_channels=6, state_channels=3, num_actions=2, conv_op=conv_op,
                             norm_op=norm_op if norm else None, norm_op_kwargs={"affine": True},
                             dilations=(1, 2)).double()
    with torch.no_grad():
        for head in (heads.policy, heads.value):
            head.out.weight.normal_()
    features = torch.randn(2, 6, *spatial, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, *spatial, dtype=torch.float64)
    inputs = [*heads.parameters(), features]
    episode = heads.attend(features)
    split = (heads.action_logits(episode, state), heads.state_value(episode, state))
    whole = concatenated_input_heads(heads, features, state)
    for ours, reference in zip(split, whole):
        torch.testing.assert_close(ours, reference)
        for a, b in zip(torch.autograd.grad(ours.square().sum(), inputs, retain_graph=True, allow_unused=True),
                        torch.autograd.grad(reference.square().sum(), inputs, retain_graph=True, allow_unused=True)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


def test_a_head_without_a_convolution_is_refused():
    with pytest.raises(ValueError, match="at least one 3"):
        VoxelActorCritic(feature_channels=6, state_channels=3, num_actions=2, conv_op=nn.Conv2d, dilations=())


def test_sam_is_a_softmax_over_the_patch():
    heads = VoxelActorCritic(feature_channels=4, state_channels=1, num_actions=2, conv_op=nn.Conv2d)
    attention = heads.sam.attention(torch.randn(2, 4, 6, 5))
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(2, 4))


def test_sam_reweights_by_at_most_one_and_is_the_identity_when_uniform():
    sam = VoxelActorCritic(feature_channels=4, state_channels=1, num_actions=2, conv_op=nn.Conv3d).sam
    features = torch.randn(1, 4, 8, 8, 8) * 50
    assert torch.all(sam(features).abs() <= features.abs())
    with torch.no_grad():
        sam.project.weight.zero_()
        sam.project.bias.zero_()
    constant = torch.full((1, 4, 64, 64, 64), 3.0)  # 262144 voxels: a reweighting by N·M_att would pass fp16's max
    torch.testing.assert_close(sam(constant), constant)


def test_refined_logits_exchange_the_argmax_and_the_refined_label():
    logits = torch.tensor([[[0.1, 0.2, 0.3, 2.0], [2.0, 0.5, 0.0, 0.1], [1.0, 3.0, -1.0, 0.0]]])  # 3 labels, 4 voxels
    refined = torch.tensor([[0, 2, 0, 1]])
    out = pixel_rl.refined_logits(logits, refined)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 0.1, 1.0]))  # removed: background takes label 1's
    torch.testing.assert_close(out[0, :, 3], torch.tensor([0.1, 2.0, 0.0]))  # proposed label 1 where bg was argmax
    torch.testing.assert_close(out[0, :, 1:3], logits[0, :, 1:3])  # the argmax kept: the backbone's logits
    assert torch.equal(out.argmax(dim=1), refined)


def test_initial_map_adds_uncertain_background_to_the_argmax():
    probabilities = torch.tensor([[[0.95, 0.6, 0.4, 0.85], [0.03, 0.1, 0.5, 0.05], [0.02, 0.3, 0.1, 0.1]]])
    logits = probabilities.log()
    assert pixel_rl.initial_map(logits, 0.0).tolist() == [[0, 0, 1, 0]]  # the argmax
    assert pixel_rl.initial_map(logits, 0.9).tolist() == [[0, 2, 1, 2]]  # background below 0.9: best foreground
    saturated = torch.tensor([[[40.0], [0.0], [1.0]]])  # softmax gives background exactly 1 in float32
    assert torch.softmax(saturated, dim=1)[0, 0, 0] == 1
    assert pixel_rl.initial_map(saturated, 1.0).tolist() == [[2]]  # 1: every voxel, the paper's initial state


@pytest.mark.parametrize("dim, spatial", [(2, (16, 20)), (3, (8, 8, 12))])
def test_refined_prediction_is_the_greedy_map_at_full_resolution_and_deterministic(dim, spatial):
    torch.manual_seed(0)
    network = small_network(dim).eval()
    network.decoder.deep_supervision = False  # what nnUNetv2_predict builds
    with torch.no_grad():
        network.actor_critic.policy.out.bias.zero_()  # an undecided policy, so greedy steps do change labels
        network.actor_critic.policy.out.weight.normal_()
        x = torch.randn(2, 1, *spatial)
        first, second = network(x), network(x)
        logits = network.backbone(x)
        maps = network.greedy_episode(network.initial_map(logits), network.take_features())
    assert first.shape == (2, 3, *spatial)
    assert torch.equal(first, second)
    assert not torch.equal(maps[-1], maps[0])
    assert torch.equal(first.argmax(dim=1), maps[-1])
    agree = maps[-1] == logits.argmax(dim=1)
    assert torch.equal(first.movedim(1, -1)[agree], logits.movedim(1, -1)[agree])


def test_greedy_rollout_stops_running_steps_once_one_changes_nothing():
    calls = []

    def step(state):
        calls.append(state.clone())
        return (state - 1).clamp(min=0)

    maps = greedy_rollout(torch.tensor([2, 1]), step, 5)
    assert [m.tolist() for m in maps] == [[2, 1], [1, 0], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert len(calls) == 3  # the third step changed nothing: steps 4 and 5 are not run
    assert len(greedy_rollout(torch.tensor([9]), step, 0)) == 1


@pytest.mark.parametrize("dim, spatial", [(2, (16, 20)), (3, (8, 8, 12))])
def test_greedy_episode_equals_every_step_run_with_both_heads(dim, spatial):
    torch.manual_seed(1)
    network = small_network(dim, hp=dataclasses.replace(HP, t_max=6)).eval()
    with torch.no_grad():
        network.actor_critic.policy.out.bias.zero_()
        network.actor_critic.policy.out.weight.normal_()
        x = torch.randn(2, 1, *spatial)
        labels = network.backbone(x)[0].argmax(dim=1)
        features = network.take_features()
        maps = network.greedy_episode(labels, features)
        attended, naive = network.actor_critic.attend(features), [labels]
        for _ in range(6):
            logits, _ = network.actor_critic(attended, pixel_rl.one_hot(naive[-1], 3))
            naive.append(pixel_rl.apply_actions(naive[-1], logits.argmax(dim=1)))
    assert len(maps) == 7
    assert all(torch.equal(a, b) for a, b in zip(maps, naive))


def test_greedy_steps_keep_voxels_whose_policy_is_not_finite():
    network = small_network(2).eval()
    network.decoder.deep_supervision = False
    with torch.no_grad():
        network.actor_critic.policy.out.bias.copy_(torch.tensor([5.0, 0.0]))  # every voxel: set to background
        x = torch.randn(1, 1, 16, 16)
        labels = torch.ones(1, 16, 16, dtype=torch.long)
        network.backbone(x)
        features = network.take_features()
        assert network.greedy_episode(labels, features)[-1].sum() == 0
        network.actor_critic.policy.out.bias.fill_(float("nan"))
        assert torch.equal(network.greedy_episode(labels, features)[-1], labels)


def test_shuffled_rewards_are_a_permutation_within_each_sample():
    reward = torch.arange(2 * 5 * 4, dtype=torch.float32).view(2, 1, 5, 4)
    shuffled = pixel_rl.shuffled_over_voxels(reward, torch.Generator().manual_seed(0))
    assert not torch.equal(shuffled, reward)
    for sample in range(2):
        assert torch.equal(shuffled[sample].flatten().sort().values, reward[sample].flatten())


def test_dice_per_step_on_hand_made_maps():
    reference = torch.tensor([[1, 1, 2, 0, 3]])
    maps = [torch.tensor([[1, 1, 2, 1, 3]]), torch.tensor([[1, 0, 2, 0, 3]])]
    confusion = pixel_rl.step_confusion(maps, reference, num_classes=3, ignore_label=3)
    assert confusion.shape == (2, 2, 3)
    assert confusion[0].tolist() == [[2, 1, 0], [1, 0, 0]] and confusion[1].tolist() == [[1, 0, 1], [1, 0, 0]]
    assert pixel_rl.dice_per_step(confusion) == pytest.approx([(0.8 + 1) / 2, (2 / 3 + 1) / 2])


def test_action_figure_counts_right_and_wrong_removals_of_the_middle_plane_of_hand_made_maps(tmp_path):
    reference = torch.tensor([[0, 0, 1], [1, 1, 0]])
    planes = [torch.tensor([[1, 0, 1], [1, 2, 2]]),  # f(0)
              torch.tensor([[0, 0, 1], [0, 2, 2]]),  # step 1: a false positive and a true positive removed
              torch.tensor([[0, 0, 0], [0, 0, 0]])]  # step 2: one of each, and a label-2 voxel of reference 1

    def batch(plane: torch.Tensor) -> torch.Tensor:  # (2, 3, 2, 3): the plane is sample 0's middle one
        volume = torch.randint(0, 3, (2, 3, 2, 3), generator=torch.Generator().manual_seed(0))
        volume[0, 1] = plane
        return volume
    data = torch.randn(2, 2, 3, 2, 3)
    patch = agent_figures.actions_patch(data, batch(reference), [batch(plane) for plane in planes], num_classes=3)
    assert torch.equal(torch.from_numpy(patch["input"]), data[0, 0, 1])
    assert (patch["initial"] == planes[0].numpy()).all() and (patch["refined"] == 0).all()
    assert patch["counts"] == {"false_positive": 2, "true_positive": 2, "other": 1}
    assert patch["step_counts"] == [{"false_positive": 1, "true_positive": 1, "other": 0},
                                    {"false_positive": 1, "true_positive": 1, "other": 1}]
    panels = agent_figures.action_panels(patch)
    assert [panel.title for panel in panels] == [
        "input", "reference", "f(0)", "f(t_max)", "removed: FP 2 / TP 2 / other 1", "step 1: FP 1 / TP 1",
        "step 2: FP 1 / TP 1 / other 1"]
    colours = panels[4].image
    assert colours.shape == (2, 3, 3)
    assert (colours[0, 0] == agent_figures.REMOVAL_COLOURS[agent_figures.FALSE_POSITIVE_REMOVED]).all()
    assert (colours[1, 0] == agent_figures.REMOVAL_COLOURS[agent_figures.TRUE_POSITIVE_REMOVED]).all()
    assert (colours[0, 1] == agent_figures.REMOVAL_COLOURS[agent_figures.UNCHANGED]).all()
    agent_figures.plot_actions(patch, str(tmp_path / "actions.png"))
    assert (tmp_path / "actions.png").stat().st_size > 0


def test_untrained_policy_keeps_the_initial_map():
    network = small_network(2).eval()
    with torch.no_grad():
        x = torch.randn(1, 1, 16, 16)
        network.decoder.deep_supervision = False
        refined = network(x)
        initial = pixel_rl.initial_map(network.backbone(x), HP.proposal_threshold)
    assert torch.equal(refined.argmax(dim=1), initial)


def test_training_episode_reaches_heads_omega_and_backbone():
    torch.manual_seed(0)
    network = small_network(2)
    with torch.no_grad():  # as after a first update: the zero-initialised output layers pass gradients on
        network.actor_critic.policy.out.weight.normal_(std=0.1)
        network.actor_critic.value.out.weight.normal_(std=0.1)
    outputs = network(torch.randn(2, 1, 16, 16))
    assert isinstance(outputs, list)  # deep supervision on: nnU-Net's training outputs unchanged
    reference = torch.randint(0, 3, (2, 16, 16))
    episode = network.training_episode(outputs[0].argmax(dim=1), network.take_features(), reference, 0.95,
                                       torch.Generator().manual_seed(0))
    assert len(episode.mean_rewards) == len(episode.changed_fractions) == HP.t_max
    episode.losses.total.backward()
    for module in (network.actor_critic.policy, network.actor_critic.value, network.actor_critic.returns,
                   network.backbone.encoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module


def test_non_finite_rewards_give_no_losses(monkeypatch):
    values = [torch.zeros(1, 1, 4, 4)]
    returns = [torch.zeros(1, 1, 4, 4)]
    returns[0][0, 0, 1, 2] = float("nan")
    logits, actions = [torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 4, 4, dtype=torch.long)]
    assert a2c_losses(logits, values, actions, returns) is None
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = False
    assert a2c_losses(logits, values, actions, returns, mask) is None  # masked out, still refused
    returns[0][0, 0, 1, 2] = 0.0
    assert a2c_losses(logits, values, actions, returns) is not None


def test_a2c_losses_take_one_mask_per_step_and_a_policy_mask():
    torch.manual_seed(0)
    logits = [torch.randn(1, 2, 4, 4) for _ in range(2)]
    values, returns = [torch.randn(1, 1, 4, 4) for _ in range(2)], [torch.randn(1, 1, 4, 4) for _ in range(2)]
    actions = [torch.randint(0, 2, (1, 4, 4)) for _ in range(2)]
    masks = [torch.rand(1, 1, 4, 4) < 0.5 for _ in range(2)]

    def terms(t):
        log_pi = torch.log_softmax(logits[t], dim=1).gather(1, actions[t][:, None])
        return -log_pi * (returns[t] - values[t]), (returns[t] - values[t]) ** 2
    per_step = a2c_losses(logits, values, actions, returns, masks)
    torch.testing.assert_close(per_step.policy, sum(terms(t)[0][masks[t]].mean() for t in range(2)) / 2)
    torch.testing.assert_close(per_step.value, sum(terms(t)[1][masks[t]].mean() for t in range(2)) / 2)
    policy_only = a2c_losses(logits, values, actions, returns, policy_mask=masks)
    torch.testing.assert_close(policy_only.policy, per_step.policy)
    torch.testing.assert_close(policy_only.value, sum(terms(t)[1].mean() for t in range(2)) / 2)
    with pytest.raises(ValueError, match="1 masks for 2 steps"):
        a2c_losses(logits, values, actions, returns, masks[:1])


def test_sampled_actions_follow_the_policy():
    logits = torch.log(torch.tensor([0.2, 0.8]))[None, :, None, None].expand(1, 2, 100, 100)
    actions = sample_actions(logits, torch.Generator().manual_seed(0), fallback=KEEP)
    assert abs(float((actions == KEEP).float().mean()) - 0.8) < 0.02
    assert set(actions.unique().tolist()) == {SET_TO_BACKGROUND, KEEP}


def test_voxels_with_non_finite_logits_sample_the_fallback_action():
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, :, 2, 3] = float("nan")
    logits[0, 0, 5, 5] = float("inf")
    for fallback in (SET_TO_BACKGROUND, KEEP):
        actions = sample_actions(logits, torch.Generator().manual_seed(0), fallback=fallback)
        assert actions[0, 2, 3] == fallback and actions[0, 5, 5] == fallback
    network = small_network(2)
    with torch.no_grad():
        network.actor_critic.policy.out.bias.fill_(float("nan"))
        outputs = network(torch.randn(1, 1, 16, 16))
        episode = network.training_episode(outputs[0].argmax(dim=1), network.take_features(),
                                           torch.randint(0, 3, (1, 16, 16)), 0.95, torch.Generator().manual_seed(0))
    assert episode.changed_fractions == [0.0] * HP.t_max  # kept, as the greedy steps keep them


@pytest.fixture(scope="module")
def trainer(planned_dataset):
    from nnunet_rl.trainers import nnUNetTrainerPixelRL_3epochs_2iters
    yield from started_trainer(planned_dataset, nnUNetTrainerPixelRL_3epochs_2iters, "2d")


def test_trainer_rl_phase_follows_the_backbone_phase(trainer):
    assert trainer.rl_start_epoch == 1  # floor(0.5 · 3)
    trainer.current_epoch = 0
    assert not trainer.in_rl_phase()
    before = cloned_state(trainer.rl_module)
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    assert all(torch.equal(before[k], v) for k, v in trainer.bare_network.actor_critic.state_dict().items())
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    trainer.train_step(next(trainer.dataloader_train))
    after = trainer.bare_network.actor_critic.state_dict()
    assert not torch.equal(before["policy.out.weight"], after["policy.out.weight"])
    assert len(trainer._episodes) == 1 and trainer._episodes[0].losses is not None


def test_validation_in_the_rl_phase_measures_the_refined_map(trainer):
    trainer.current_epoch = 1
    network = trainer.bare_network
    batch = next(trainer.dataloader_val)
    bias = network.actor_critic.policy.out.bias.detach().clone()
    try:
        with torch.no_grad():
            network.actor_critic.policy.out.bias.copy_(torch.tensor([20.0, -20.0]))  # remove every voxel's label
        trainer.on_validation_epoch_start()
        result = trainer.validation_step(batch)
    finally:
        with torch.no_grad():
            network.actor_critic.policy.out.bias.copy_(bias)
    assert result["tp_hard"].sum() == 0 and result["fp_hard"].sum() == 0  # nnU-Net's pseudo Dice sees the refined map
    (confusion,) = trainer._step_confusions
    assert confusion.shape[0] == HP_TRAINER_STEPS + 1
    assert confusion[0, :, 0].sum() > 0 and confusion[-1, :, :2].sum() == 0  # f(0) found foreground, f(T) has none


def test_the_last_rl_validation_epoch_draws_its_first_patch_into_pixel_rl_actions_png(trainer, monkeypatch):
    from nnunet_rl.trainers.voxel_agents import VoxelAgentsTrainer
    monkeypatch.setattr(VoxelAgentsTrainer, "on_train_end", lambda self: None)  # keep the fixture's dataloaders
    monkeypatch.setattr(trainer, "_figure_patch", None)
    figure = Path(trainer.output_folder) / "pixel_rl_actions.png"
    figure.unlink(missing_ok=True)
    network = trainer.bare_network
    trainer.current_epoch = 0
    trainer.on_validation_epoch_start()
    trainer.validation_step(next(trainer.dataloader_val))
    trainer.on_train_end()
    assert not figure.exists()  # no RL epoch, no figure
    trainer.current_epoch = 1
    first, second = next(trainer.dataloader_val), next(trainer.dataloader_val)
    bias = network.actor_critic.policy.out.bias.detach().clone()
    try:
        with torch.no_grad():
            network.actor_critic.policy.out.bias.copy_(torch.tensor([20.0, -20.0]))  # remove every voxel's label
        trainer.on_validation_epoch_start()
        trainer.validation_step(first)
        trainer.validation_step(second)
    finally:
        with torch.no_grad():
            network.actor_critic.policy.out.bias.copy_(bias)
    patch = trainer._figure_patch
    assert torch.equal(torch.from_numpy(patch["input"]), first["data"][0, 0].float())
    assert len(patch["step_removed"]) == HP_TRAINER_STEPS and (patch["refined"] == 0).all()
    assert sum(patch["counts"].values()) == (patch["initial"] != 0).sum()  # the first step removed all of f(0)
    assert patch["step_counts"][0] == patch["counts"] and not any(sum(c.values()) for c in patch["step_counts"][1:])
    trainer.on_train_end()
    assert figure.stat().st_size > 0


def test_heads_train_with_adam_and_the_planned_network_with_nnunets_sgd(trainer):
    from nnunet_rl.heads_optimizer import SGDWithAdamHeads
    optimizer = trainer.optimizer
    assert isinstance(optimizer, SGDWithAdamHeads)
    heads = {id(p) for p in trainer.bare_network.actor_critic.parameters()}
    in_sgd = {id(p) for group in optimizer.sgd.param_groups for p in group["params"]}
    in_adam = {id(p) for group in optimizer.adam.param_groups for p in group["params"]}
    assert in_adam == heads and not in_sgd & heads
    assert in_sgd | in_adam == {id(p) for p in trainer.network.parameters()}
    assert optimizer.sgd.defaults["momentum"] == 0.99 and optimizer.sgd.defaults["nesterov"]  # nnU-Net's
    trainer.lr_scheduler.step(1)  # the poly rate of epoch 1 in every group; Adam steps at heads_lr times its decay
    scheduled = optimizer.adam.param_groups[0]["lr"]
    assert scheduled == optimizer.sgd.param_groups[0]["lr"] < trainer.initial_lr
    seen = []
    adam_step = optimizer.adam.step
    optimizer.adam.step = lambda: seen.append(optimizer.adam.param_groups[0]["lr"]) or adam_step()
    try:
        trainer.current_epoch = 1
        trainer.on_train_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
    finally:
        del optimizer.adam.step
    assert seen == [pytest.approx(scheduled * HP.heads_lr / trainer.initial_lr)]
    assert optimizer.adam.param_groups[0]["lr"] == scheduled
    assert optimizer.adam.state  # Adam's moments exist after the step


def test_trainer_skips_the_update_on_non_finite_rewards(trainer, monkeypatch):
    def nan_reward(previous, current, reference, num_classes):
        return torch.full(previous[:, None].shape, float("nan"))
    monkeypatch.setattr(pixel_rl, "squared_error_reward", nan_reward)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    before = cloned_state(trainer.rl_module)
    trainer.train_step(next(trainer.dataloader_train))
    assert all(torch.equal(before[k], v) for k, v in trainer.bare_network.actor_critic.state_dict().items())
    trainer.on_train_epoch_end([{"loss": 0.0}])
    assert trainer.logger.local_logger.my_fantastic_logging["pixel_rl/skipped_updates"][-1] == 1


def test_reward_telemetry_averages_the_finite_episodes(trainer):
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    trainer._episodes = [pixel_rl.Episode(None, [float("nan")] * 2, [0.0] * 2),
                         pixel_rl.Episode(pixel_rl.A2CLosses(torch.tensor(0.5), torch.tensor(0.25)), [1.0, 2.0],
                                          [0.1] * 2)]
    trainer.on_train_epoch_end([{"loss": 0.0}])
    assert trainer.logger.local_logger.my_fantastic_logging["pixel_rl/reward"][-1] == 1.5


def test_checkpoint_round_trip_restores_heads_omega_and_sampler(trainer, tmp_path, planned_dataset):
    resumed = resumed_after_an_rl_step(trainer, planned_dataset, tmp_path, fallback=KEEP)
    assert torch.equal(trainer.action_generator.get_state(), resumed.action_generator.get_state())


def test_an_untrained_sampled_episode_keeps_a_label_with_the_episode_probability():
    network = small_network(2)
    keep = torch.softmax(network.actor_critic.policy.out.bias, dim=0)[KEEP]
    assert float(keep.detach()) ** HP.t_max == pytest.approx(HP.initial_episode_keep_probability)


def episode_objective(network, outputs):
    reference = torch.randint(0, 3, (2, 16, 16))
    return network.training_episode(outputs[0].argmax(dim=1), network.take_features(), reference, 0.95,
                                    None).losses.total


def test_ddp_accepts_heads_trained_in_the_loss_and_idle_heads_with_a_zero_gradient(single_rank_process_group):
    from nnunet_rl.trainers.base import RLTrainerBase
    inputs = torch.randn(2, 1, 16, 16)
    ddp_steps(small_network(2), inputs, episode_objective)  # the RL phase: heads used outside forward
    ddp_steps(small_network(2), inputs,
              lambda network, outputs: RLTrainerBase.zero_gradient_term(network.actor_critic))
    with pytest.raises(RuntimeError, match="reduction"):  # the backbone phase without the term
        ddp_steps(small_network(2), inputs, lambda network, outputs: 0.0)


def test_step_study_variants_pin_t_max():
    from nnunet_rl import trainers
    for steps in (1, 4, 10):
        variant = getattr(trainers, f"nnUNetTrainerPixelRL_tmax{steps}")
        assert variant.hyperparameters_from({}, "pixel_rl").t_max == steps
