"""``nnUNetTrainerPAM``: the planned U-Net with AWSnet's pixel-wise attention on every skip connection."""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_rl.pam import add_pixel_attention
from nnunet_rl.trainers.base import RLTrainerBase


class nnUNetTrainerPAM(RLTrainerBase):
    """nnU-Net's planned network (PlainConvUNet or a ResEnc U-Net) with a PAM gate on each skip (AWSnet, Wang et
    al.)."""

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        network = RLTrainerBase.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                           num_output_channels, enable_deep_supervision)
        add_pixel_attention(network.decoder)
        return network
