"""The all-slice fusion network (nnunet_rl.all_slice_fusion) around the 2D networks nnU-Net plans (default planner
and ResEnc M) for the session's planned dataset; the 2d_allslice configuration (nnunet_rl.plans.all_slice_fusion)
and nnUNetTrainerAllSliceFusion's deep supervision and augmentation."""
import os
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
    nnUNetPlannerResEncM
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.all_slice_fusion import (AllSliceFusionNetwork, AllSliceFusionTransformer,
                                        build_all_slice_fusion_network)
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.all_slice_fusion import (ALL_SLICE_CONFIGURATION, MAX_SLICES, all_slice_configuration,
                                              longest_stack)
from nnunet_rl.trainers.all_slice_fusion import nnUNetTrainerAllSliceFusion

RESENC_PLANS = "nnUNetResEncUNetMPlans"
CHANNELS, CLASSES = 1, 4
TOLERANCE = 1e-5


def with_all_slice_configuration(plans_file: Path) -> dict:
    """The plans in ``plans_file`` with the 2d_allslice configuration ``nnunet-rl plan -c 2d_allslice`` would add
    (in memory: the session's plans files stay as other test modules expect them)."""
    plans = load_json(str(plans_file))
    fingerprint = load_json(str(plans_file.parent / "dataset_fingerprint.json"))
    plans["configurations"][ALL_SLICE_CONFIGURATION] = all_slice_configuration(plans, fingerprint)
    return plans


@pytest.fixture(scope="module")
def plans(planned_dataset) -> dict[str, PlansManager]:
    """The planned dataset's nnU-Net plans, and its plans by nnU-Net's ResEnc M planner, by 2D architecture, each
    with a 2d_allslice configuration."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / planned_dataset
    if not (folder / f"{RESENC_PLANS}.json").is_file():
        nnUNetPlannerResEncM(planned_dataset).plan_experiment()
    return {"PlainConvUNet": PlansManager(with_all_slice_configuration(folder / "nnUNetPlans.json")),
            "ResidualEncoderUNet": PlansManager(with_all_slice_configuration(folder / f"{RESENC_PLANS}.json"))}


def network(plans, architecture: str, deep_supervision: bool, **hyperparameters) -> AllSliceFusionNetwork:
    torch.manual_seed(0)
    manager = plans[architecture]
    return build_all_slice_fusion_network(manager, manager.get_configuration(ALL_SLICE_CONFIGURATION), CHANNELS,
                                          CLASSES, deep_supervision, **hyperparameters)


def stack(plans, num_slices: int, stacks: int = 1) -> torch.Tensor:
    patch = plans["PlainConvUNet"].get_configuration("2d").patch_size
    return torch.randn(stacks, CHANNELS, num_slices, *patch, generator=torch.Generator().manual_seed(num_slices))


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_output_shapes_for_any_number_of_slices(plans, architecture, deep_supervision):
    model = network(plans, architecture, deep_supervision)
    assert type(model.planned_network).__name__ == architecture
    assert model.decoder.deep_supervision == deep_supervision
    with torch.no_grad():
        for num_slices in (1, 3, 7):
            x = stack(plans, num_slices, stacks=2)
            output = model(x)
            planned = model.planned_network(x[:, :, 0])  # the planned network's outputs for one slice of each stack
            if not deep_supervision:
                output, planned = [output], [planned]
            assert [o.shape for o in output] == [(2, CLASSES, num_slices, *p.shape[2:]) for p in planned]
            assert output[0].shape[3:] == x.shape[3:]
            assert all(torch.isfinite(o).all() for o in output)


def test_the_2d_networks_are_the_planned_ones(plans):
    manager = plans["PlainConvUNet"]
    assert manager.get_configuration("2d").network_arch_init_kwargs["features_per_stage"][-1] == \
        network(plans, "PlainConvUNet", False).fusion.width
    with pytest.raises(NnunetRLError, match="wraps a 2D U-Net, not the 3D one.*use the 2d_allslice configuration"):
        build_all_slice_fusion_network(manager, manager.get_configuration("3d_fullres"), CHANNELS, CLASSES)
    with pytest.raises(NnunetRLError, match="not the single slices .* patch \\[32, 32\\].*-c 2d_allslice"):
        nnUNetTrainerAllSliceFusion.build_network_architecture(manager, manager.get_configuration("2d"), CHANNELS,
                                                               CLASSES)
    with pytest.raises(NnunetRLError, match="do not split into 3 attention heads"):
        network(plans, "PlainConvUNet", False, heads=3)


@pytest.mark.parametrize("architecture", ["PlainConvUNet", "ResidualEncoderUNet"])
def test_permuting_the_slices_permutes_the_output(plans, architecture):
    model = network(plans, architecture, True).eval()
    x, order = stack(plans, 5), torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        for output, permuted in zip(model(x), model(x[:, :, order])):
            torch.testing.assert_close(permuted, output[:, :, order], atol=TOLERANCE, rtol=TOLERANCE)


def test_slices_see_each_other_through_the_transformer_only(plans):
    model = network(plans, "PlainConvUNet", False).eval()
    x = stack(plans, 4)
    changed = x.clone()
    changed[:, :, 0] += 1.0
    with torch.no_grad():
        output, output_changed = model(x), model(changed)
        alone, alone_changed = (model.planned_network(v[:, :, 2]) for v in (x, changed))
    assert (output[:, :, 2] - output_changed[:, :, 2]).abs().max() > 1e-3  # slice 0 moved slice 2's output
    assert torch.equal(alone, alone_changed)  # which slice 2 on its own through the planned network does not see


def test_gradients_reach_both_transformers(plans):
    model = network(plans, "PlainConvUNet", True)
    sum(o.square().mean() for o in model(stack(plans, 3, stacks=2))).backward()
    for transformer in (model.fusion.inter_slice, model.fusion.intra_slice):
        gradients = [p.grad for p in transformer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in gradients)
        assert any(g.abs().sum() > 0 for g in gradients)


def test_memory_estimate_adds_the_transformers_to_the_planned_slices(plans):
    model = network(plans, "PlainConvUNet", False)
    patch = plans["PlainConvUNet"].get_configuration("2d").patch_size
    per_slice = model.planned_network.compute_conv_feature_map_size(patch)
    estimates = [model.compute_conv_feature_map_size((num_slices, *patch)) for num_slices in (1, 4, 8)]
    assert all(estimate > num_slices * per_slice for estimate, num_slices in zip(estimates, (1, 4, 8)))
    assert estimates[0] < estimates[1] < estimates[2]
    shallow = AllSliceFusionNetwork(model.planned_network, AllSliceFusionTransformer(model.fusion.width, layers=1))
    assert shallow.compute_conv_feature_map_size((4, *patch)) < estimates[1]


def test_the_2d_allslice_configuration_is_the_2d_one_on_stacks(plans):
    """The session's 32-slice cases are longer than MAX_SLICES: the patch holds MAX_SLICES of them (nnU-Net's loader
    crops chunks, its predictor slides over them); one such stack exceeds the 2d batch's slices, so one per batch."""
    manager = plans["PlainConvUNet"]
    entry = manager.plans["configurations"][ALL_SLICE_CONFIGURATION]
    assert set(entry) == {"inherits_from", "patch_size", "batch_size"} and entry["inherits_from"] == "2d"
    stacks, slices = manager.get_configuration(ALL_SLICE_CONFIGURATION), manager.get_configuration("2d")
    assert longest_stack(manager.plans, {"shapes_after_crop": [[32, 32, 32], [30, 32, 32]]}) == 32 > MAX_SLICES
    assert stacks.patch_size == [MAX_SLICES, *slices.patch_size] and stacks.batch_size == 1
    for key in ("data_identifier", "spacing", "normalization_schemes", "architecture"):
        assert stacks.configuration[key] == slices.configuration[key], key
    short = {"shapes_after_crop": [[9, 32, 32], [7, 32, 32]]}
    many_slices = {**manager.plans, "configurations": {"2d": {**slices.configuration, "batch_size": 20}}}
    assert all_slice_configuration(many_slices, short) == {"inherits_from": "2d", "patch_size": [9, 32, 32],
                                                           "batch_size": 2}
    with pytest.raises(NnunetRLError, match="no 2d configuration"):
        all_slice_configuration({**manager.plans, "configurations": {}}, short)


@pytest.fixture(scope="module")
def trainers(plans, planned_dataset) -> dict[str, nnUNetTrainer]:
    """nnUNetTrainerAllSliceFusion on 2d_allslice and stock nnUNetTrainer on 2d, constructed as nnUNetv2_train does."""
    dataset_json = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset / "dataset.json"))
    plans_dict = {**plans["PlainConvUNet"].plans, "continue_training": False}
    return {"ours": nnUNetTrainerAllSliceFusion(dict(plans_dict), ALL_SLICE_CONFIGURATION, 0, dataset_json,
                                                torch.device("cpu")),
            "2d": nnUNetTrainer(dict(plans_dict), "2d", 0, dataset_json, torch.device("cpu"))}


def test_deep_supervision_keeps_every_slice(trainers):
    assert trainers["ours"]._get_deep_supervision_scales() == \
        [[1.0, *scale] for scale in trainers["2d"]._get_deep_supervision_scales()]
    assert trainers["ours"]._get_deep_supervision_scales()[1] == [1.0, 0.5, 0.5]


def test_augmentation_is_the_2d_one_on_every_slice(trainers):
    ours, stock = trainers["ours"], trainers["2d"]
    rotation, dummy_2d, initial_patch, mirror_axes = ours.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    rotation_2d, _, initial_patch_2d, mirror_axes_2d = \
        stock.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert rotation == rotation_2d and dummy_2d
    assert list(initial_patch) == [ours.configuration_manager.patch_size[0], *initial_patch_2d]
    assert mirror_axes == ours.inference_allowed_mirroring_axes == (1, 2) and mirror_axes_2d == (0, 1)
    assert ours.configuration_manager.patch_size == [MAX_SLICES, 32, 32]  # the stack configuration is back
