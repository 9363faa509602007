"""The all-slice fusion transformer at the bottleneck of nnU-Net's planned 2D U-Net: all slices of a stack segmented
together, each slice seeing the others through attention.

Z. Chen, X. Chen, Y. Liu, E. Z. Chen, T. Chen, S. Sun, "Enhancing Cardiac MRI Segmentation via Classifier-Guided
Two-Stage Network and All-Slice Information Fusion Transformer", arXiv:2309.00800 (2023),
DOI 10.48550/arXiv.2309.00800, §2.2 and Fig. 3.

The slices of a stack are concatenated along the batch dimension and run through the planned 2D encoder; two
consecutive transformers take the bottleneck features, first inter-slice attention (a token per slice, for every
in-plane position), then intra-slice attention (a token per in-plane position, for every slice); the planned 2D
decoder, with its skip connections, segments every slice. Neither transformer has a position encoding, so a stack
of any number of slices goes through the same weights, and permuting the slices permutes the output.

The paper gives no depth, head count or MLP width for its transformers; the defaults here are ours (see
``docs/all_slice_fusion.md``). Its selective-kernel convolutions are not taken: the CNN is nnU-Net's planned one.
"""
from math import prod
from typing import Sequence

import torch
from torch import nn

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.planned_network import AroundPlannedNetwork

DEFAULT_LAYERS = 2  # per transformer
DEFAULT_HEADS = 8
DEFAULT_MLP_RATIO = 4
# Elements a pre-norm encoder layer keeps per token, in units of its width: the two norms, q, k, v, the attention
# output and its projection, the two residual sums and the MLP's output (plus 2 x the MLP width: hidden, activation).
STORED_WIDTHS_PER_TOKEN = 9


def transformer_encoder(width: int, layers: int, heads: int, mlp_ratio: int, dropout: float) -> nn.TransformerEncoder:
    """``layers`` pre-norm transformer encoder layers (residual attention and MLP, GELU) on tokens of ``width``
    features; no position encoding and no final norm, so the output stays on the residual stream of its input."""
    if width % heads:
        raise NnunetRLError(f"the bottleneck's {width} features do not split into {heads} attention heads; "
                            f"choose a head count that divides {width}")
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=mlp_ratio * width, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _layer_activations(tokens: int, width: int, mlp_width: int, heads: int, sequences: int, length: int) -> int:
    """Elements one encoder layer keeps for ``sequences`` sequences of ``length`` tokens: per token
    STORED_WIDTHS_PER_TOKEN widths and two MLP widths, and one length x length attention map per head."""
    return tokens * (STORED_WIDTHS_PER_TOKEN * width + 2 * mlp_width) + heads * sequences * length ** 2


class AllSliceFusionTransformer(nn.Module):
    """Inter-slice then intra-slice attention on bottleneck features of the slices of stacks (§2.2, Fig. 3).

    Input and output (B·Z, F, y, x): B stacks of Z slices each, the slices of a stack consecutive in the batch.
    """

    def __init__(self, width: int, layers: int = DEFAULT_LAYERS, heads: int = DEFAULT_HEADS,
                 mlp_ratio: int = DEFAULT_MLP_RATIO, dropout: float = 0.0):
        super().__init__()
        self.width, self.layers, self.heads, self.mlp_ratio = width, layers, heads, mlp_ratio
        self.inter_slice = transformer_encoder(width, layers, heads, mlp_ratio, dropout)
        self.intra_slice = transformer_encoder(width, layers, heads, mlp_ratio, dropout)

    def forward(self, features: torch.Tensor, num_slices: int) -> torch.Tensor:
        stacked, width, *in_plane = features.shape
        stacks, positions = stacked // num_slices, prod(in_plane)
        tokens = features.view(stacks, num_slices, width, positions).permute(0, 3, 1, 2)  # (B, P, Z, F)
        tokens = self.inter_slice(tokens.reshape(stacks * positions, num_slices, width))
        tokens = tokens.view(stacks, positions, num_slices, width).transpose(1, 2)  # (B, Z, P, F)
        tokens = self.intra_slice(tokens.reshape(stacked, positions, width))
        return tokens.transpose(1, 2).reshape(features.shape)

    def compute_activation_size(self, num_slices: int, in_plane: Sequence[int]) -> int:
        """Elements of the activations of one stack of ``num_slices`` slices with bottleneck size ``in_plane``."""
        positions = prod(in_plane)
        tokens, mlp_width = num_slices * positions, self.mlp_ratio * self.width
        inter = _layer_activations(tokens, self.width, mlp_width, self.heads, positions, num_slices)
        intra = _layer_activations(tokens, self.width, mlp_width, self.heads, num_slices, positions)
        return self.layers * (inter + intra)


class AllSliceFusionNetwork(AroundPlannedNetwork):
    """nnU-Net's planned 2D U-Net with an :class:`AllSliceFusionTransformer` on its bottleneck skip.

    Input (B, C, Z, Y, X), B stacks of Z slices; output (B, K, Z, Y, X), or with deep supervision on a list of such,
    finest first, each at its decoder stage's in-plane resolution. Every slice goes through the planned encoder and
    decoder as a 2D image; only the transformer mixes slices.
    """

    def __init__(self, planned_network: nn.Module, fusion: AllSliceFusionTransformer):
        super().__init__()
        if planned_network.encoder.output_channels[-1] != fusion.width:
            raise NnunetRLError(f"the fusion transformer takes {fusion.width} features, the planned network's "
                                f"bottleneck has {planned_network.encoder.output_channels[-1]}")
        self.backbone = planned_network
        self.fusion = fusion

    @property
    def planned_network(self) -> nn.Module:
        """The planned 2D network run on every slice."""
        return self.backbone

    def forward(self, x: torch.Tensor):
        stacks, channels, num_slices, *in_plane = x.shape
        skips = self.backbone.encoder(x.transpose(1, 2).reshape(stacks * num_slices, channels, *in_plane))
        skips[-1] = self.fusion(skips[-1], num_slices)
        output = self.backbone.decoder(skips)
        if isinstance(output, torch.Tensor):
            return self._unfold(output, num_slices)
        return [self._unfold(scale, num_slices) for scale in output]

    @staticmethod
    def _unfold(slices: torch.Tensor, num_slices: int) -> torch.Tensor:
        """(B·Z, K, y, x) -> (B, K, Z, y, x)."""
        return slices.view(-1, num_slices, *slices.shape[1:]).transpose(1, 2)

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """nnU-Net's memory estimate for one stack of ``input_size`` = (Z, Y, X): the planned network's for each of
        the Z slices plus the transformers' activations."""
        num_slices, *in_plane = input_size
        bottleneck = list(in_plane)
        for stride in self.backbone.encoder.strides:
            bottleneck = [size // step for size, step in zip(bottleneck, stride)]
        return (num_slices * self.backbone.compute_conv_feature_map_size(in_plane)
                + self.fusion.compute_activation_size(num_slices, bottleneck))


def require_stack_configuration(configuration_manager) -> None:
    """Refuse a configuration that is not ``2d_allslice``-style: the network needs a 2D architecture (2D strides) and
    patches of stacks (Z, Y, X); nnU-Net's 2d configuration would hand it one slice at a time."""
    strides = [list(stride) for stride in configuration_manager.pool_op_kernel_sizes]
    patch_size = list(configuration_manager.patch_size)
    if len(strides[0]) != 2:
        problem = f"wraps a 2D U-Net, not the {len(strides[0])}D one of a configuration with strides {strides}"
    elif len(patch_size) != 3:
        problem = f"takes stacks of slices, not the single slices of a configuration with patch {patch_size}"
    else:
        return
    raise NnunetRLError(f"the all-slice fusion network {problem}: use the 2d_allslice configuration "
                        f"(nnunet-rl plan DATASET -c 2d_allslice, then nnUNetv2_train DATASET 2d_allslice FOLD ...)")


def build_all_slice_fusion_network(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True,
                                   layers: int = DEFAULT_LAYERS, heads: int = DEFAULT_HEADS,
                                   mlp_ratio: int = DEFAULT_MLP_RATIO, dropout: float = 0.0) -> AllSliceFusionNetwork:
    """The :class:`AllSliceFusionNetwork` around the 2D network nnU-Net's trainer builds for these plans and a
    ``2d_allslice`` configuration (``nnUNetTrainer.build_network_architecture``), the transformer as wide as its
    bottleneck."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    require_stack_configuration(configuration_manager)
    planned = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
    fusion = AllSliceFusionTransformer(planned.encoder.output_channels[-1], layers, heads, mlp_ratio, dropout)
    return AllSliceFusionNetwork(planned, fusion)
