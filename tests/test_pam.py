"""AWSnet's PAM on nnU-Net's planned U-Nets: gate arithmetic, shapes, deep supervision, rebuilt from plans."""
import os

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


from helpers import ddp_steps, unet_kwargs
from nnunet_rl.pam import GatedDecoderStage, PixelAttentionGate, add_pixel_attention
from nnunet_rl.trainers import nnUNetTrainerPAM
from nnunet_rl.trainer_from_plans import trainer_from_plans


def instance_norm_gate(channels: int, dim: int) -> PixelAttentionGate:
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    return PixelAttentionGate(channels, conv, norm, {"eps": 1e-5, "affine": True})


def test_gate_is_the_additive_attention_gate_of_the_paper():
    """d' = d ⊙ σ(N(ψ·ReLU(N(W_d d) + N(W_u u)))), each input with its own projection, normalised before σ."""
    torch.manual_seed(0)
    gate = instance_norm_gate(4, 3).eval()
    skip, upsampled = torch.randn(2, 4, 5, 6, 7), torch.randn(2, 4, 5, 6, 7)

    def norm(x):  # affine weights start at 1 and 0
        return torch.nn.functional.instance_norm(x, eps=1e-5)

    def conv(layer, x):
        return torch.nn.functional.conv3d(x, layer.weight, layer.bias)

    joint = torch.relu(norm(conv(gate.project_skip[0], skip)) + norm(conv(gate.project_upsampled[0], upsampled)))
    expected = skip * torch.sigmoid(norm(conv(gate.project[0], joint)))
    torch.testing.assert_close(gate(skip, upsampled), expected)
    assert gate.inter_channels == 2


def test_gate_mask_depends_on_both_inputs_and_is_normalised_before_the_sigmoid():
    torch.manual_seed(0)
    gate = instance_norm_gate(2, 2).eval()
    skip = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        mask = gate.mask(skip, torch.randn(1, 2, 8, 8))
        other = gate.mask(skip, torch.randn(1, 2, 8, 8))
        scaled = gate.mask(skip, 1000 * torch.randn(1, 2, 8, 8))
    assert not torch.allclose(mask, other)
    logits = torch.logit(scaled.double())  # instance-normalised logits: mean 0, variance var/(var + eps) <= 1
    assert abs(logits.mean().item()) < 1e-3 and 0.5 < logits.std(unbiased=False).item() <= 1 + 1e-4


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
    assert all(s.gate.project[0].weight.grad is not None and s.gate.project_skip[0].weight.grad is not None
               for s in gated.decoder.stages)
    assert all(isinstance(s.gate.project[1], type(gated.encoder.norm_op(1))) for s in gated.decoder.stages)


def test_ddp_trains_the_gates_inside_the_wrapped_forward(single_rank_process_group):
    """nnU-Net's DDP wrapper (no find_unused_parameters) needs a gradient for every parameter: the gates run in the
    network's forward, so nothing outside it is needed."""
    kwargs = {**unet_kwargs(2), "n_conv_per_stage": 1, "n_conv_per_stage_decoder": 1}
    gated = PlainConvUNet(**kwargs)
    add_pixel_attention(gated.decoder)
    ddp_steps(gated, torch.randn(2, 2, 16, 16), lambda network, outputs: 0.0)


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
    trainer = trainer_from_plans(planned_dataset, nnUNetTrainerPAM, configuration)
    trainer.initialize()
    patch = trainer.configuration_manager.patch_size
    data = torch.randn(2, 2, *patch)
    target = torch.randint(0, 8, (2, 1, *patch)).float()
    scales = trainer._get_deep_supervision_scales()
    targets = [torch.nn.functional.interpolate(target, scale_factor=s, mode="nearest") for s in scales]
    losses = [trainer.train_step({"data": data, "target": targets})["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]
