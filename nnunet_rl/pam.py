"""AWSnet's pixel-wise attention module (PAM) on the skip connections of nnU-Net's planned U-Net.

Wang, Yang, Miao, Li, Yao, Zhou, Xue, Zhou, Zhuang, Ni, "AWSnet: An auto-weighted supervision attention network for
myocardial scar and edema segmentation in multi-sequence cardiac magnetic resonance images", Medical Image Analysis
77 (2022) 102362, doi:10.1016/j.media.2022.102362, Sec. 3.2.2. The encoder feature map d (the skip) and the upsampled
decoder map u of the same stage are each projected by their own 1×1 convolution and normalisation (the formula's two
biases), added, rectified, projected to one channel, normalised and squashed by a sigmoid into a per-pixel mask α
that multiplies the skip (an additive attention gate, as the authors' ``Attention_block``)::

    α = σ(N_ψ(ψ · ReLU(N_d(W_d·d + b_d) + N_u(W_u·u + b_u)) + b_ψ)),    d' = α ⊙ d

The intermediate width is half the skip's channels, as in the authors' code. The norms are the plan's ``norm_op``
(instance norm by default) rather than the code's BatchNorm, which is fragile at nnU-Net's batch size of 2. The
decoder of ``dynamic_network_architectures`` concatenates ``[u, d]`` and feeds the result to its stage, so the gate
is inserted by wrapping each decoder stage: the network, its deep supervision and nnU-Net's VRAM estimate
(``compute_conv_feature_map_size``) are otherwise the planned ones.
"""
import re

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn


class PixelAttentionGate(nn.Module):
    """α = σ(N(ψ·ReLU(N(W_d·d) + N(W_u·u)))): one attention value per pixel, multiplied into the skip d."""

    def __init__(self, channels: int, conv_op: type[nn.Module], norm_op: type[nn.Module], norm_op_kwargs: dict):
        super().__init__()
        self.inter_channels = max(1, channels // 2)
        self.project_skip = nn.Sequential(conv_op(channels, self.inter_channels, kernel_size=1, bias=True),
                                          norm_op(self.inter_channels, **norm_op_kwargs))
        self.project_upsampled = nn.Sequential(conv_op(channels, self.inter_channels, kernel_size=1, bias=True),
                                               norm_op(self.inter_channels, **norm_op_kwargs))
        self.nonlin = nn.ReLU(inplace=True)
        self.project = nn.Sequential(conv_op(self.inter_channels, 1, kernel_size=1, bias=True),
                                     norm_op(1, **norm_op_kwargs))

    def mask(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """α, shape (B, 1, *spatial)."""
        joint = self.nonlin(self.project_skip(skip) + self.project_upsampled(upsampled))
        return torch.sigmoid(self.project(joint))

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        return skip * self.mask(skip, upsampled)

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Feature-map voxels this gate stores: two projections and their norms, their sum, the mask, the gated skip."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return self.inter_channels * voxels * 5 + voxels * 2 + self.project_skip[0].in_channels * voxels


class GatedDecoderStage(nn.Module):
    """A decoder stage whose input ``[u, d]`` has its skip half ``d`` gated by a :class:`PixelAttentionGate`."""

    def __init__(self, stage: nn.Module, gate: PixelAttentionGate, skip_channels: int):
        super().__init__()
        self.gate = gate
        self.stage = stage
        self.skip_channels = skip_channels

    def forward(self, upsampled_and_skip: torch.Tensor) -> torch.Tensor:
        upsampled, skip = torch.split(upsampled_and_skip, self.skip_channels, dim=1)
        return self.stage(torch.cat((upsampled, self.gate(skip, upsampled)), dim=1))

    def compute_conv_feature_map_size(self, input_size) -> int:
        return self.gate.compute_conv_feature_map_size(input_size) + \
            self.stage.compute_conv_feature_map_size(input_size)


def add_pixel_attention(decoder: UNetDecoder) -> UNetDecoder:
    """Put a PAM on every skip connection of ``decoder`` (in place), normalised by the encoder's planned norm op."""
    encoder = decoder.encoder
    skip_channels = encoder.output_channels[-2::-1]  # the skip of decoder stage s is encoder stage -(s+2)
    decoder.stages = nn.ModuleList(
        GatedDecoderStage(stage, PixelAttentionGate(channels, encoder.conv_op, encoder.norm_op,
                                                    encoder.norm_op_kwargs or {}), channels)
        for stage, channels in zip(decoder.stages, skip_channels))
    return decoder


GATED_STAGE_KEY = re.compile(r"^(decoder\.stages\.\d+)\.(stage|gate)\.")


def stock_name(key: str) -> str | None:
    """The planned (ungated) network's name of the state-dict entry ``key`` of a network with PAM; None for a gate's,
    which the planned network does not have."""
    match = GATED_STAGE_KEY.match(key)
    if match is None:
        return key
    return None if match.group(2) == "gate" else f"{match.group(1)}.{key[match.end():]}"
