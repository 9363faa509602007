"""nnU-Net's SGD for the planned network and Adam for reinforcement-learning heads, as the one optimiser nnU-Net drives.

PixelDRL-MG trains its heads with Adam (lr 1e-3; Y. Liu et al., "Pixel level deep reinforcement learning for accurate
and robust medical image segmentation", Scientific Reports 2025, "Implementation details"), MRL-Seg its networks with
Adam (F. Yang et al., IEEE JBHI 28(2), 2024, DOI 10.1109/jbhi.2023.3336726, §IV.B); both trainers set this up in
``nnunet_rl.trainers.voxel_agents``. nnU-Net's ``train_step`` knows one optimiser: it zeroes, unscales (mixed
precision), clips (norm 12 over all parameters) and steps ``self.optimizer``, and its ``PolyLRScheduler`` writes the
poly learning rate into every parameter group. :class:`SGDWithAdamHeads` is that one optimiser: its parameter groups
are those of nnU-Net's SGD and of an Adam over the heads, so every one of those steps reaches both, and the heads'
Adam runs at ``lr_scale`` times the scheduled rate (the poly decay applies to both).
"""
import torch


class SGDWithAdamHeads(torch.optim.Optimizer):
    """``sgd`` (nnU-Net's, without the heads) and Adam over ``heads``; the state dict holds both."""

    def __init__(self, sgd: torch.optim.SGD, heads: list[torch.nn.Parameter], lr_scale: float):
        self.sgd = sgd
        self.adam = torch.optim.Adam(heads, lr=sgd.defaults["lr"] * lr_scale)
        self.lr_scale = lr_scale
        super().__init__([*sgd.param_groups, *self.adam.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SGDWithAdamHeads does not take a closure (nnU-Net's train_step passes none)")
        self.sgd.step()
        scheduled = [group["lr"] for group in self.adam.param_groups]
        for group in self.adam.param_groups:
            group["lr"] *= self.lr_scale
        self.adam.step()
        for group, lr in zip(self.adam.param_groups, scheduled):
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.sgd.load_state_dict(state_dict["sgd"])
        self.adam.load_state_dict(state_dict["adam"])
        self.param_groups = [*self.sgd.param_groups, *self.adam.param_groups]
