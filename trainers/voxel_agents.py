"""What the trainers of per-voxel agents share (``nnUNetTrainerPixelRL``, ``nnUNetTrainerMRLSeg``).

Both add an A2C-trained module (PixelDRL-MG's heads and ω; MRL-Seg's Reinforcement-Net and w) to nnU-Net's planned
network and train it inside nnU-Net's ``train_step``. :class:`VoxelAgentsTrainer` holds what they do alike; each
trainer names its rl block section (``component``) and the module its agents learn in (:attr:`rl_module`).
"""
import numpy as np
from torch import nn

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.heads_optimizer import SGDWithAdamHeads
from nnunet_rl.trainers.base import RLTrainerBase

HEADS_OPTIMIZERS = ("adam", "sgd")


def finite_mean(values) -> float:
    """The mean of the finite ``values`` (NaN when none is): an epoch's telemetry over its episodes, of which those
    skipped for non-finite rewards would otherwise turn the epoch's mean into NaN."""
    values = np.asarray(list(values), dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


class VoxelAgentsTrainer(RLTrainerBase):
    """Base of the per-voxel agents' trainers: the agents' optimiser."""
    component: str  # the rl block's section, with the keys ``heads_optimizer`` and ``heads_lr``

    @property
    def rl_module(self) -> nn.Module:
        """The module the A2C losses train (the agents' networks and ω)."""
        raise NotImplementedError

    def configure_optimizers(self):
        """nnU-Net's SGD and poly schedule; with ``heads_optimizer`` "adam" (both papers train their agents with
        Adam), :attr:`rl_module` leaves the SGD for an Adam at ``heads_lr`` (poly-decayed like the rest), inside one
        optimiser nnU-Net's ``train_step`` drives (:class:`~nnunet_rl.heads_optimizer.SGDWithAdamHeads`)."""
        optimizer, lr_scheduler = super().configure_optimizers()
        hp = self.rl_hyperparameters(self.component)
        if hp["heads_optimizer"] not in HEADS_OPTIMIZERS:
            raise NnunetRLError(f"{self.component} heads_optimizer must be 'adam' or 'sgd', not "
                                f"{hp['heads_optimizer']!r}")
        if hp["heads_optimizer"] == "sgd":
            return optimizer, lr_scheduler
        heads = list(self.rl_module.parameters())
        ids = {id(p) for p in heads}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer = SGDWithAdamHeads(optimizer, heads, hp["heads_lr"] / self.initial_lr)
        return optimizer, type(lr_scheduler)(optimizer, self.initial_lr, self.num_epochs)
