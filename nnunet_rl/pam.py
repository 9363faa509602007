"""AWSnet's pixel-wise attention module (PAM) on the skip connections of nnU-Net's planned U-Net.

Wang et al., "AWSnet", Sec. 3.2.2 (paper 003): the encoder feature map d and the upsampled decoder
feature map u of the same stage are added, projected by BN-ReLU-1x1 convolution, and a sigmoid turns
the projection into an attention mask α that multiplies the skip::

    α = σ(W · ψ(BN(d + u)) + b),    d' = α ⊙ d

The paper's formula is garbled in our copy; we follow the text and produce one mask channel per pixel
(a pixel-wise, not channel-wise, attention, as in the Attention Gate it derives from). The decoder of
``dynamic_network_architectures`` concatenates ``[u, d]`` and feeds the result to its stage, so the gate is
inserted by wrapping each decoder stage: the network, its deep supervision and nnU-Net's VRAM estimate
(``compute_conv_feature_map_size``) are otherwise the planned ones.
"""
import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import nn


class PixelAttentionGate(nn.Module):
    """α = σ(1x1conv(ReLU(BN(d + u)))): one attention value per pixel, multiplied into the skip d."""

    def __init__(self, channels: int, conv_op: type[nn.Module]):
        super().__init__()
        self.norm = get_matching_batchnorm(conv_op)(channels)
        self.nonlin = nn.ReLU(inplace=True)
        self.project = conv_op(channels, 1, kernel_size=1, bias=True)

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.project(self.nonlin(self.norm(skip + upsampled))))
        return skip * mask

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Feature-map voxels this gate stores: BN output, the mask and the gated skip."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return self.norm.num_features * voxels * 2 + voxels


class GatedDecoderStage(nn.Module):
    """A decoder stage whose input ``[u, d]`` has its skip half ``d`` gated by a :class:`PixelAttentionGate`."""

    def __init__(self, stage: nn.Module, skip_channels: int, conv_op: type[nn.Module]):
        super().__init__()
        self.gate = PixelAttentionGate(skip_channels, conv_op)
        self.stage = stage
        self.skip_channels = skip_channels

    def forward(self, upsampled_and_skip: torch.Tensor) -> torch.Tensor:
        upsampled, skip = torch.split(upsampled_and_skip, self.skip_channels, dim=1)
        return self.stage(torch.cat((upsampled, self.gate(skip, upsampled)), dim=1))

    def compute_conv_feature_map_size(self, input_size) -> int:
        return self.gate.compute_conv_feature_map_size(input_size) + \
            self.stage.compute_conv_feature_map_size(input_size)


def add_pixel_attention(decoder: UNetDecoder) -> UNetDecoder:
    """Put a PAM on every skip connection of ``decoder`` (in place); returns the decoder."""
    skip_channels = decoder.encoder.output_channels[-2::-1]  # the skip of decoder stage s is encoder stage -(s+2)
    decoder.stages = nn.ModuleList(
        GatedDecoderStage(stage, channels, decoder.encoder.conv_op)
        for stage, channels in zip(decoder.stages, skip_channels))
    return decoder
