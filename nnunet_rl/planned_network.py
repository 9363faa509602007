"""Networks built around nnU-Net's planned network (PixelRL, MRL-Seg, the all-slice fusion network)."""
from torch import nn


class AroundPlannedNetwork(nn.Module):
    """A network that contains nnU-Net's planned network and adds to it.

    Subclasses name the planned network (:attr:`planned_network`: where a stock checkpoint's weights belong, see
    ``nnunet-rl pretrained-weights``); :attr:`decoder` is its decoder, where nnU-Net's trainer switches deep
    supervision (``set_deep_supervision_enabled`` sets ``network.decoder.deep_supervision``).
    """

    @property
    def planned_network(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must name its planned network")

    @property
    def decoder(self) -> nn.Module:
        return self.planned_network.decoder
