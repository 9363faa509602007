"""RL-U2Net's training loss (paper 000, eq. 20) on nnU-Net's own Dice and CE terms.

L_final = (L_Dice^balanced + L_CE^balanced) + λ₁ Σ_i L_align^(i)

- Dice and CE of each branch are nnU-Net's deep-supervision-weighted terms: two copies of the trainer's own
  ``DeepSupervisionWrapper(DC_and_CE_loss)``, one with the CE weight set to 0 and one with the Dice weight set to 0,
  so ignore labels, batch Dice and the deep-supervision weights behave exactly as in stock nnU-Net.
- AGWD (eqs. 18-19) balances the two branches, separately for Dice and for CE; without AGWD the two are summed.
- L_align (eq. 17) = α·InfoNCE + β·cosine between a branch's features and the aligned features of the other, for
  every RL-XAlign module.

In eval mode the network returns the branches' soft vote, which is scored with the stock Dice + CE.
"""
import copy

import torch
from torch import nn

from nnunet_rl.dual_branch import DualBranchOutput
from nnunet_rl.u2net_losses import AGWD, alignment_loss


def _only(deep_supervision_loss: nn.Module, keep: str) -> nn.Module:
    """A copy of nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss) computing only its Dice or only its CE term."""
    single = copy.deepcopy(deep_supervision_loss)
    setattr(single.loss, "weight_ce" if keep == "dice" else "weight_dice", 0)
    return single


class DualBranchLoss(nn.Module):
    """Eq. 20 for a :class:`DualBranchOutput`; nnU-Net's loss for anything else (the ensemble in validation).

    After each training forward, ``last_dice`` holds each branch's soft Dice (1 − L_Dice, detached; nnU-Net's Dice
    term is the negative soft Dice) and, while ``record_similarity`` is set, ``last_similarity`` each RL-XAlign
    module's S_similarity: the PPO state and reward (eqs. 8-9) are read from there, so the reward costs no extra
    forward pass.
    """

    def __init__(self, deep_supervision_loss: nn.Module, agwd: AGWD | None, alignment_weight: float,
                 infonce_weight: float, cosine_weight: float, infonce_temperature: float):
        super().__init__()
        self.stock = deep_supervision_loss
        self.dice, self.ce = _only(deep_supervision_loss, "dice"), _only(deep_supervision_loss, "ce")
        self.agwd = agwd
        self.alignment_weight, self.infonce_weight, self.cosine_weight = \
            alignment_weight, infonce_weight, cosine_weight
        self.infonce_temperature = infonce_temperature
        self.last_dice: dict[str, torch.Tensor] = {}
        self.last_similarity: dict[str, float] = {}
        self.record_similarity = False
        self.last_alignment_loss = torch.tensor(float("nan"))

    def _combine(self, kind: str, primary: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
        if self.agwd is None:
            return primary + auxiliary
        return self.agwd.balance(kind, primary, auxiliary)

    def _branch_dice(self, output: DualBranchOutput, target) -> dict[str, torch.Tensor]:
        return {"primary": self.dice(output.primary, target), "auxiliary": self.dice(output.auxiliary, target)}

    def measure(self, output: DualBranchOutput, target) -> tuple[dict[str, float], dict[str, float]]:
        """Each branch's soft Dice and each module's S_similarity, without a loss (the PPO baseline state)."""
        dice = {branch: float(-value) for branch, value in self._branch_dice(output, target).items()}
        return dice, {a.key: float(a.similarity()) for a in output.alignments}

    def forward(self, output, target) -> torch.Tensor:
        if not isinstance(output, DualBranchOutput):
            return self.stock(output, target)
        dice = self._branch_dice(output, target)
        ce = {"primary": self.ce(output.primary, target), "auxiliary": self.ce(output.auxiliary, target)}
        self.last_dice = {branch: -value.detach() for branch, value in dice.items()}  # tensors: no sync here
        if self.record_similarity:
            self.last_similarity = {a.key: float(a.similarity()) for a in output.alignments}
        total = self._combine("dice", dice["primary"], dice["auxiliary"]) + \
            self._combine("ce", ce["primary"], ce["auxiliary"])
        if output.alignments and self.alignment_weight > 0:
            align = alignment_loss([a.own for a in output.alignments], [a.aligned for a in output.alignments],
                                   self.infonce_weight, self.cosine_weight, self.infonce_temperature)
            self.last_alignment_loss = align.detach()
            total = total + self.alignment_weight * align
        return total
