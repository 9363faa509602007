"""AWSnet's PAM on nnU-Net's planned U-Nets: gate arithmetic, shapes, deep supervision, rebuilt from plans."""
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from conftest import make_trainer

from nnunet_rl.pam import GatedDecoderStage, PixelAttentionGate, add_pixel_attention
from nnunet_rl.trainers import nnUNetTrainerPAM


def unet_kwargs(dim: int) -> dict:
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    return dict(input_channels=2, n_stages=3, features_per_stage=[8, 16, 32], conv_op=conv, kernel_sizes=3,
                strides=[1, 2, 2], num_classes=3, conv_bias=True, norm_op=norm,
                norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                nonlin_kwargs={"inplace": True}, deep_supervision=True)


def test_gate_multiplies_the_skip_by_a_sigmoid_mask():
    gate = PixelAttentionGate(4, torch.nn.Conv3d).eval()
    torch.nn.init.zeros_(gate.project.weight)
    torch.nn.init.constant_(gate.project.bias, 2.0)
    skip, upsampled = torch.randn(1, 4, 5, 6, 7), torch.randn(1, 4, 5, 6, 7)
    torch.testing.assert_close(gate(skip, upsampled), skip * torch.sigmoid(torch.tensor(2.0)))


def test_gate_mask_depends_on_encoder_plus_decoder_features():
    gate = PixelAttentionGate(2, torch.nn.Conv2d).eval()
    skip = torch.ones(1, 2, 4, 4)
    suppressed = gate(skip, -10 * torch.ones(1, 2, 4, 4))
    passed = gate(skip, 10 * torch.ones(1, 2, 4, 4))
    assert not torch.allclose(suppressed, passed)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("architecture", [PlainConvUNet, ResidualEncoderUNet])
def test_pam_keeps_shapes_and_deep_supervision(dim, architecture):
    kwargs = unet_kwargs(dim)
    kwargs["n_blocks_per_stage" if architecture is ResidualEncoderUNet else "n_conv_per_stage"] = 1
    kwargs["n_conv_per_stage_decoder"] = 1
    torch.manual_seed(0)
    stock = architecture(**kwargs)
    gated = architecture(**kwargs)
    add_pixel_attention(gated.decoder)
    x = torch.randn(2, 2, *([16] * dim))
    stock_out, gated_out = stock(x), gated(x)
    assert [o.shape for o in gated_out] == [o.shape for o in stock_out]
    assert all(isinstance(s, GatedDecoderStage) for s in gated.decoder.stages)
    patch = [16] * dim
    assert gated.compute_conv_feature_map_size(patch) > stock.compute_conv_feature_map_size(patch)
    sum(o.mean() for o in gated_out).backward()
    assert all(s.gate.project.weight.grad is not None for s in gated.decoder.stages)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_trainer_builds_the_planned_network_with_pam(planned_dataset, configuration):
    folder = os.path.join(os.environ["nnUNet_preprocessed"], planned_dataset)
    plans = PlansManager(load_json(os.path.join(folder, "nnUNetPlans.json")))
    configuration_manager = plans.get_configuration(configuration)
    network = nnUNetTrainerPAM.build_network_architecture(plans, configuration_manager, 2, 8, False)
    n_skips = len(configuration_manager.network_arch_init_kwargs["features_per_stage"]) - 1
    assert sum(isinstance(m, PixelAttentionGate) for m in network.modules()) == n_skips
    x = torch.randn(1, 2, *configuration_manager.patch_size)
    assert network(x).shape == (1, 8, *configuration_manager.patch_size)


@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_nnunet_train_step_fits_a_fixed_batch(planned_dataset, configuration):
    """nnU-Net's own train_step (deep supervision, loss, optimiser) runs on the PAM network and its loss falls."""
    torch.manual_seed(0)
    trainer = make_trainer(planned_dataset, nnUNetTrainerPAM, configuration)
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 2, *patch)
    target = torch.randint(0, 8, (2, 1, *patch)).float()
    scales = trainer._get_deep_supervision_scales()
    targets = [torch.nn.functional.interpolate(target, scale_factor=s, mode="nearest") for s in scales]
    losses = [trainer.train_step({"data": data, "target": targets})["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]
