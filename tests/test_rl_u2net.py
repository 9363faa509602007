"""RL-U2Net: the dual-branch network from nnU-Net plans, its loss, the trainer's RL loop, state and policy file."""
import json
import os

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from helpers import branch_kwargs, feature_similarity

from nnunet_rl.dual_branch import DualBranchOutput, DualBranchUNet, select_channels, default_aligned_stages
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.mirroring import draw_mirroring
from nnunet_rl.rotations import cube_rotations
from nnunet_rl.trainers import (nnUNetTrainerRLU2Net, nnUNetTrainerRLU2Net_noAGWD, nnUNetTrainerRLU2Net_noAuxLoss,
                                nnUNetTrainerRLU2Net_noCMA, nnUNetTrainerRLU2Net_noPPO,
                                nnUNetTrainerRLU2Net_noRLXAlign, nnUNetTrainerRLU2Net_lambda0p1)
from nnunet_rl.trainers.rl_u2net import COMPONENT, POLICY_FILE
from nnunet_rl.trainers.schedules import ShortSchedule
from nnunet_rl.u2net_losses import AGWD, alignment_loss
from nnunet_rl.trainer_from_plans import trainer_from_plans


def branches(architecture, dim: int, channels: int):
    return architecture(input_channels=channels, num_classes=3, deep_supervision=True,
                        **branch_kwargs(architecture, dim))


def dual_branch(architecture=PlainConvUNet, dim: int = 3, directions=("primary", "auxiliary"), use_cma=True,
                auxiliary_channels=(1, 2)):
    torch.manual_seed(0)
    return DualBranchUNet(3, 3, f"{architecture.__module__}.{architecture.__name__}",
                          branch_kwargs(architecture, dim), primary_channels=[0],
                          auxiliary_channels=list(auxiliary_channels), aligned_stages=[1, 2],
                          fusion_directions=directions, window_size=2, k_sel=2, temperature=0.1, fusion_weight=0.3,
                          use_cma=use_cma, min_greedy_probability=0.0)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("architecture", [PlainConvUNet, ResidualEncoderUNet])
def test_both_branches_keep_the_planned_deep_supervision(dim, architecture):
    network = dual_branch(architecture, dim)
    x = torch.randn(2, 3, *([16] * dim))
    output = network(x)
    assert isinstance(output, DualBranchOutput) and len(output.alignments) == 4
    single = branches(architecture, dim, 1)
    assert [o.shape for o in output.primary] == [o.shape for o in single(x[:, :1])]
    assert [o.shape for o in output.auxiliary] == [o.shape for o in output.primary]
    (sum(o.mean() for o in output.primary + output.auxiliary)).backward()
    assert all(m.cma.query.weight.grad is not None for m in network.xalign.values())
    assert all(m.pose.theta.grad is None and not m.pose.theta.requires_grad for m in network.xalign.values())


@pytest.mark.parametrize("shape, rotation", [((16, 16, 16), 5), ((8, 16, 12), 7)])  # 7 flips axes 0 and 2
def test_module_similarity_is_that_of_the_rotated_stage0_features(shape, rotation):
    """The activity map is turned instead of the features: with one draw that is exactly feature_similarity of the
    turned features where the rotation maps the grid onto itself (permute and flip commute with the channel norm)."""
    network = dual_branch()
    output = network(torch.randn(2, 3, *shape))
    for alignment in output.alignments:
        alignment.action = torch.tensor([rotation])
        features = alignment.finest.features
        other = "auxiliary" if alignment.direction == "primary" else "primary"
        expected = feature_similarity(features[alignment.direction],
                                      alignment.pose(features[other], alignment.action)).mean()
        torch.testing.assert_close(alignment.similarity(), expected, atol=1e-5, rtol=1e-5)
    assert len(output.alignments[0].finest._maps) == 2  # computed once per branch, shared by all modules


def test_eval_output_is_the_soft_vote_of_the_branches():
    network = dual_branch().eval()
    network.set_deep_supervision(False)
    x = torch.randn(1, 3, 16, 16, 16)
    vote = network(x)
    torch.testing.assert_close(vote.softmax(1).sum(1), torch.ones(1, 16, 16, 16))
    network.train()
    branches_out = network(x)
    mean = (branches_out.primary[0].softmax(1) + branches_out.auxiliary[0].softmax(1)) / 2
    torch.testing.assert_close(vote.softmax(1), mean, atol=1e-5, rtol=1e-4)


def test_loss_without_deep_supervision_is_both_branches_dice_and_ce(planned_dataset):
    """nnU-Net's loss is a bare DC_and_CE_loss when deep supervision is off; the branches then give one map each."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_rl.dual_branch_loss import DualBranchLoss
    trainer = trainer_from_plans(planned_dataset, nnUNetTrainerRLU2Net)
    trainer.enable_deep_supervision = False
    stock = nnUNetTrainer._build_loss(trainer)
    network = dual_branch()
    network.set_deep_supervision(False)
    output = network(torch.randn(2, 3, 16, 16, 16))
    assert len(output.primary) == 1
    target = torch.randint(0, 3, (2, 1, 16, 16, 16))
    loss = DualBranchLoss(stock, None, 0.0, 1.0, 1.0, 0.1)
    expected = stock(output.primary[0], target) + stock(output.auxiliary[0], target)
    torch.testing.assert_close(loss(output, target), expected)
    with torch.no_grad():
        measured = loss.measure(output, target)
    assert set(measured.dice) == {"primary", "auxiliary"} and set(measured.similarity) == set(network.xalign)
    assert torch.isfinite(trainer._build_loss()(output, target))


def test_set_actions_choose_rotations_and_none_means_greedy():
    network = dual_branch(directions=("primary",))
    x = torch.randn(1, 3, 16, 16, 16)
    key = DualBranchUNet.module_key("primary", 2)
    network.xalign[key].pose.theta.data[5] = 1.0
    greedy = network(x).alignments[1].aligned
    identity = {k: torch.zeros(1, dtype=torch.long) for k in network.xalign}
    network.set_actions({**identity, key: torch.tensor([5])})
    torch.testing.assert_close(network(x).alignments[1].aligned, greedy)
    network.set_actions(identity)
    assert not torch.allclose(network(x).alignments[1].aligned, greedy)


def test_a_rotation_is_applied_only_where_the_policy_has_settled_on_it():
    """The margin rule: the most probable rotation is applied after the RL phase and at inference only where π on it
    reaches min_greedy_probability; otherwise the identity (co-registered data never get a rotation chosen by noise)."""
    network = dual_branch(directions=("primary",)).eval()
    network.set_deep_supervision(False)
    key = DualBranchUNet.module_key("primary", 2)
    pose = network.xalign[key].pose
    pose.min_greedy_probability = 0.5
    with torch.no_grad():
        pose.theta[5] = 0.2  # π = e²/(e² + 23) ≈ 0.24 on rotation 5
    assert int(pose.greedy_action()) == 5 and int(network.action(key)) == 0
    with torch.no_grad():
        pose.theta[5] = 0.4  # π ≈ 0.70
    assert int(network.action(key)) == 5


def test_channel_groups_are_views_when_consecutive_and_selected_otherwise():
    x = torch.randn(2, 4, 8, 8, 8)
    view = select_channels(x, [1, 2, 3])
    assert view.data_ptr() == x[:, 1].data_ptr() and torch.equal(view, x[:, [1, 2, 3]])
    torch.testing.assert_close(select_channels(x, [0, 2]), x[:, [0, 2]])
    torch.testing.assert_close(select_channels(x, [3, 1]), x[:, [3, 1]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_training_step_and_a_prediction_never_wait_for_the_gpu():
    """No device synchronisation from our code in the forward pass, the losses and the backward pass: actions,
    rotation matrices and sampled voxel indices live on the CPU and reach the GPU by non-blocking copies."""
    network = dual_branch(auxiliary_channels=(2, 1)).cuda()
    x = torch.randn(2, 3, 8, 16, 12, device="cuda")  # anisotropic: off-grid rotations are resampled
    agwd, generator = AGWD(), torch.Generator().manual_seed(0)

    def sampled_actions():
        return {key: module.pose.sample(generator) for key, module in network.xalign.items()}

    sampled_actions()  # reads θ from the GPU once; the CPU copy is reused until θ changes
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        network.set_actions(sampled_actions())
        network.set_mirroring(draw_mirroring(2, (0, 1, 2), 3, generator))  # per-sample conjugated rotations
        output = network(x)
        loss = agwd.balance("dice", output.primary[0].mean(), output.auxiliary[0].mean())
        loss = loss + alignment_loss([a.own for a in output.alignments], [a.aligned for a in output.alignments])
        loss.backward()
        network.set_actions(None)
        network.eval()
        with torch.no_grad():
            network(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_default_aligned_stages_are_at_most_a_quarter_resolution_as_in_the_paper():
    isotropic = [[1, 1, 1]] + [[2, 2, 2]] * 5  # nnU-Net's 6-stage 128³ plans: maps 128³ ... 4³
    assert default_aligned_stages(isotropic) == [2, 3, 4, 5]
    assert default_aligned_stages(isotropic[:4]) == [2, 3]
    assert default_aligned_stages(isotropic + [[2, 2, 2]]) == [3, 4, 5, 6]  # the deepest 4
    anisotropic = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]  # voxels /4, /16, /128, /1024
    assert default_aligned_stages(anisotropic) == [3, 4]
    assert default_aligned_stages([[1, 1], [2, 2], [2, 2], [2, 2]]) == [2, 3]  # 2D: 1/16 of the pixels
    assert default_aligned_stages([[1, 1, 1], [2, 2, 2]]) == [1]  # none that coarse: the deepest
    assert default_aligned_stages([[1, 1, 1]]) == []


def test_single_channel_dataset_is_refused_before_any_work(planned_dataset):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    folder = os.path.join(os.environ["nnUNet_preprocessed"], planned_dataset)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    dataset_json["channel_names"] = {"0": "CT"}
    with pytest.raises(NnunetRLError, match="nnUNetTrainerPAM"):
        nnUNetTrainerRLU2Net(load_json(os.path.join(folder, "nnUNetPlans.json")), "3d_fullres", 0, dataset_json,
                             torch.device("cpu"))


def test_variants_pin_their_hyperparameters(planned_dataset):
    assert not trainer_from_plans(planned_dataset,
                                  nnUNetTrainerRLU2Net_noRLXAlign).rl_hyperparameters(COMPONENT).aligned_stages
    assert trainer_from_plans(planned_dataset,
                              nnUNetTrainerRLU2Net_lambda0p1).rl_hyperparameters(COMPONENT).fusion_weight == 0.1
    trainer = trainer_from_plans(planned_dataset, nnUNetTrainerRLU2Net_noCMA)
    trainer.initialize()
    assert all(m.cma is None for m in trainer.bare_network.xalign.values())


def test_no_ppo_variant_keeps_rl_xalign_at_the_identity_without_an_agent(planned_dataset):
    import nnunet_rl.trainers as trainers
    from nnunet_rl.ablation import ablation_trainers
    trainer = trainer_from_plans(planned_dataset, nnUNetTrainerRLU2Net_noPPO)
    trainer.initialize()
    assert trainer.bare_network.xalign and not trainer.agents and not trainer.buffers and not trainer.in_rl_phase()
    assert all(int(m.pose.greedy_action()) == 0 for m in trainer.bare_network.xalign.values())
    assert trainer.prediction_mirror_axes() is None  # no training transforms built yet: nothing to restrict
    rows = ablation_trainers("quick", sweep=False)
    assert rows["w/o PPO (identity rotation)"] == "nnUNetTrainerRLU2Net_noPPO_3epochs_2iters"
    assert list(ablation_trainers("full", sweep=False, variants=["noPPO"]).values()) == [
        "nnUNetTrainer", "nnUNetTrainerRLU2Net", "nnUNetTrainerRLU2Net_noPPO"]
    with pytest.raises(NnunetRLError, match="unknown ablation variants: PPO; choose from noCMA, noRLXAlign"):
        ablation_trainers("full", sweep=False, variants=["noPPO", "PPO"])
    from nnunet_rl.ablation import VARIANTS
    from nnunet_rl.cli import build_parser
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["ablation"].format_help().split())
    assert f"all of {', '.join(VARIANTS)})" in help_text  # the help (written without importing the trainers)
    assert all(hasattr(trainers, name) for name in ("nnUNetTrainerRLU2Net_noPPO",
                                                    "nnUNetTrainerRLU2Net_noPPO_3epochs_2iters",
                                                    "nnUNetTrainerRLU2Net_noPPO_10epochs_20iters"))


@pytest.mark.parametrize("variant", [nnUNetTrainerRLU2Net_noCMA, nnUNetTrainerRLU2Net_noRLXAlign,
                                     nnUNetTrainerRLU2Net_noAuxLoss, nnUNetTrainerRLU2Net_noAGWD])
def test_ablations_train_a_step_and_resume(planned_dataset, tmp_path, variant):
    """The ablations that the e2e test's `nnunet-rl ablation --variants noPPO` does not train: a training step on a
    batch of nnU-Net's loader, then a checkpoint round trip."""
    trainer = trainer_from_plans(planned_dataset, variant)
    trainer.initialize()
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        loss = trainer.train_step(next(trainer.dataloader_train))["loss"]
    finally:
        trainer.on_train_end()
    assert np.isfinite(loss)
    assert (trainer.loss.agwd is None) == (variant is nnUNetTrainerRLU2Net_noAGWD)
    assert (trainer.loss.alignment_weight == 0) == (variant is nnUNetTrainerRLU2Net_noAuxLoss)
    trainer.save_checkpoint(str(tmp_path / "checkpoint.pth"))
    resumed = trainer_from_plans(planned_dataset, variant)
    resumed.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert (resumed.loss.agwd is None) == (trainer.loss.agwd is None)


class ShortRL(ShortSchedule, nnUNetTrainerRLU2Net):
    """Two epochs of four iterations, RL in the first, a PPO round every four samples."""
    epochs, iterations, val_iterations = 2, 4, 1
    rl_overrides = {COMPONENT: {"rl_fraction": 0.5, "rollout_samples": 4, "ppo_epochs": 2, "policy_lr": 0.01}}


KNOWN_ROTATION = {"mode": "fixed", "index": 5, "inverse_index": 9}  # as make-dataset --rotate-aux fixed records it


@pytest.fixture(scope="module")
def trained_short_rl(planned_dataset):
    torch.manual_seed(0)
    trainer = trainer_from_plans(planned_dataset, ShortRL)
    trainer.dataset_json["nnunet_rl"] = {"aux_rotation": KNOWN_ROTATION}
    trainer.run_training()
    return trainer


def test_ppo_updates_the_policy_in_the_rl_phase_and_freezes_it_after(trained_short_rl):
    log = trained_short_rl.logger.local_logger.my_fantastic_logging
    modules = trained_short_rl.bare_network.xalign
    assert all(not torch.equal(m.pose.theta, torch.zeros_like(m.pose.theta)) for m in modules.values())
    assert np.isfinite(log["rl_u2net/reward"][0]) and np.isnan(log["rl_u2net/reward"][1])
    from nnunet_rl.trainers.rl_u2net import PPO_STATISTICS
    for name in PPO_STATISTICS:  # logged per PPO update, as Stable-Baselines3 logs them; none after the RL phase
        assert np.isfinite(log[f"rl_u2net/{name}"][0]) and np.isnan(log[f"rl_u2net/{name}"][1]), name
    for key in modules:
        probabilities = log[f"rl_u2net/{key}/top_probability"]
        assert probabilities[0] == probabilities[1] > 1 / 24
    assert all(np.isfinite(log[k]).all() for k in ("rl_u2net/agwd_w_dice", "rl_u2net/alignment_loss"))


def test_on_phantoms_with_a_known_rotation_the_needed_rotations_probability_is_logged(trained_short_rl):
    """Per module and epoch, the probability on the rotation its branch needs (the primary branch the inverse of the
    dataset's MRI rotation, the auxiliary branch that rotation): the curve the demo draws."""
    log = trained_short_rl.logger.local_logger.my_fantastic_logging
    policy = json.load(open(os.path.join(trained_short_rl.output_folder, POLICY_FILE)))["modules"]
    needed = {"primary": KNOWN_ROTATION["inverse_index"], "auxiliary": KNOWN_ROTATION["index"]}
    for key, module in policy.items():
        final = next(r["probability"] for r in module["rotations"] if r["index"] == needed[module["receiving_branch"]])
        assert log[f"rl_u2net/{key}/needed_rotation_probability"] == pytest.approx([final, final], abs=1e-6)


def test_policy_file_lists_every_rotation_with_its_matrix(trained_short_rl):
    policy = json.load(open(os.path.join(trained_short_rl.output_folder, POLICY_FILE)))
    rotations = [np.array(m) for m in map(lambda r: r["matrix"], next(iter(policy["modules"].values()))["rotations"])]
    assert len(policy["modules"]) == len(trained_short_rl.bare_network.xalign)
    for module in policy["modules"].values():
        assert sum(r["probability"] for r in module["rotations"]) == pytest.approx(1.0, abs=1e-5)
        assert module["greedy_index"] == module["rotations"][0]["index"]
        assert all(np.array_equal(cube_rotations(3)[r["index"]], r["matrix"]) for r in module["rotations"])
    assert len(rotations) == 24


def test_the_trainer_mirrors_itself_and_predicts_with_the_commuting_axes(trained_short_rl):
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from nnunet_rl.mirroring import commuting_axes
    trainer = trained_short_rl
    assert trainer.training_mirror_axes == (0, 1, 2)  # nnU-Net's axes for a 3D configuration ...
    transforms = trainer.get_training_transforms(trainer.configuration_manager.patch_size, (0.0, 0.0), None,
                                                 (0, 1, 2), False)
    assert not any(isinstance(t, MirrorTransform) for t in transforms.transforms)  # ... not nnU-Net's transform
    applied = [int(m.pose.deterministic_action()) for m in trainer.bare_network.xalign.values()]
    checkpoint = torch.load(os.path.join(trainer.output_folder, "checkpoint_final.pth"), weights_only=False)
    assert checkpoint["inference_allowed_mirroring_axes"] == commuting_axes((0, 1, 2), applied, 3)
    policy = json.load(open(os.path.join(trainer.output_folder, POLICY_FILE)))
    assert policy["test_time_mirror_axes"] == list(commuting_axes((0, 1, 2), applied, 3))
    assert all(m["applied_index"] in (0, m["greedy_index"]) for m in policy["modules"].values())


def test_a_mirrored_batch_keeps_data_and_every_target_scale_together(trained_short_rl):
    trainer = trained_short_rl
    target = torch.randint(0, 3, (8, 1, 8, 8, 8))
    batch = {"data": target.float().repeat(1, 2, 1, 1, 1), "target": [target, target[..., ::2, ::2, ::2]]}
    generator_state = trainer.pose_generator.get_state()  # the shared trainer's state stays as trained
    try:
        mirrored = trainer._mirrored(batch)
        groups = trainer.bare_network.mirroring.groups
    finally:
        trainer.bare_network.set_mirroring(None)
        trainer.pose_generator.set_state(generator_state)
    assert any(group.axes for group in groups)
    assert torch.equal(mirrored["data"][:, :1].long(), mirrored["target"][0])
    for group in groups:
        flipped = [2 + axis for axis in group.axes]
        assert torch.equal(mirrored["target"][1][group.start:group.stop],
                           target[group.start:group.stop, ..., ::2, ::2, ::2].flip(flipped))


def test_resume_restores_the_rl_state_exactly(trained_short_rl, planned_dataset):
    checkpoint = os.path.join(trained_short_rl.output_folder, "checkpoint_final.pth")
    resumed = trainer_from_plans(planned_dataset, ShortRL)
    resumed.load_checkpoint(checkpoint)
    for key, agent in trained_short_rl.agents.items():
        for name, value in agent.critic.state_dict().items():
            torch.testing.assert_close(resumed.agents[key].critic.state_dict()[name], value, rtol=0, atol=0)
        torch.testing.assert_close(resumed.bare_network.xalign[key].pose.theta,
                                   trained_short_rl.bare_network.xalign[key].pose.theta, rtol=0, atol=0)
        assert len(resumed.buffers[key]) == len(trained_short_rl.buffers[key])
        assert resumed.agents[key].policy_optimizer.state_dict()["state"].keys() == \
            agent.policy_optimizer.state_dict()["state"].keys()
    assert torch.equal(resumed.pose_generator.get_state(), trained_short_rl.pose_generator.get_state())
    torch.testing.assert_close(resumed.loss.agwd.running["dice"], trained_short_rl.loss.agwd.running["dice"])


def test_plan_writes_rl_u2net_plans_with_its_own_planner(planned_dataset):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_rl.plans.planner import RL_U2NET_PLANS, plan_rl
    [plans_file] = plan_rl(planned_dataset, ["3d_fullres"], rl_u2net=True)
    assert plans_file.name == f"{RL_U2NET_PLANS}.json"
    ours, stock = load_json(str(plans_file)), load_json(str(plans_file.parent / "nnUNetPlans.json"))
    configuration, stock_configuration = ours["configurations"]["3d_fullres"], stock["configurations"]["3d_fullres"]
    assert configuration["rl"]["dataset"]["auxiliary_channels"] == ["MRI"]
    assert np.prod(configuration["patch_size"]) * configuration["batch_size"] <= \
        np.prod(stock_configuration["patch_size"]) * stock_configuration["batch_size"]
    assert (plans_file.parent / f"{RL_U2NET_PLANS}_3d_fullres").is_dir()
    assert ours["experiment_planner_used"] == "nnUNetPlannerRLU2Net"


def test_planner_fits_the_dual_branch_estimate_not_one_unet_to_the_memory_target(planned_dataset):
    """On a large volume nnU-Net's own search shrinks the patch until the DualBranchUNet estimate fits."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunet_rl.plans.planner import dual_branch_estimate, nnUNetPlannerRLU2Net
    plans = {}
    for planner_class in (ExperimentPlanner, nnUNetPlannerRLU2Net):
        planner = planner_class(planned_dataset)
        plans[planner_class] = planner.get_plans_for_configuration((1.0, 1.0, 1.0), (256, 256, 256), "x", 1e12, {})
    ours, stock = plans[nnUNetPlannerRLU2Net], plans[ExperimentPlanner]
    assert np.prod(ours["patch_size"]) < np.prod(stock["patch_size"])

    def dual_estimate(plan):
        architecture = plan["architecture"]
        return dual_branch_estimate(
            plan["patch_size"], 2, 3, architecture["network_class_name"], architecture["arch_kwargs"],
            architecture["_kw_requires_import"])

    reference, reference_batch = planner.UNet_reference_val_3d, planner.UNet_reference_val_corresp_bs_3d
    assert dual_estimate(ours) / reference_batch * 2 <= reference < dual_estimate(stock) / reference_batch * 2


def test_rl_u2net_trains_on_2d_configurations(planned_dataset):
    trainer = trainer_from_plans(planned_dataset, ShortRL, "2d")
    trainer.run_training()
    policy = json.load(open(os.path.join(trainer.output_folder, POLICY_FILE)))
    assert all(len(m["rotations"]) == 4 for m in policy["modules"].values())
    assert np.isfinite(trainer.logger.local_logger.my_fantastic_logging["train_losses"]).all()
