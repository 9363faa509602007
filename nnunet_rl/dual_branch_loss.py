"""RL-U2Net's training loss on nnU-Net's own Dice and CE terms.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion
for Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), eq. 20:

L_final = (L_Dice^balanced + L_CE^balanced) + λ₁ Σ_i L_align^(i)

- Dice and CE of each branch are nnU-Net's own terms: two copies of the trainer's loss
  (``DeepSupervisionWrapper(DC_and_CE_loss)``, or the bare ``DC_and_CE_loss`` when deep supervision is off), one with
  the CE weight set to 0 and one with the Dice weight set to 0, so ignore labels, batch Dice and the
  deep-supervision weights behave exactly as in stock nnU-Net.
- AGWD (eqs. 18-19) balances the two branches, separately for Dice and for CE; without AGWD the two are summed.
- Paired data: one label map supervises both branches; unpaired data (:class:`BranchTargets`): each branch its own.
- L_align (eq. 17) = α·InfoNCE + β·cosine between a branch's features and the aligned features of the other, for
  every RL-XAlign module.

In eval mode the network returns the branches' soft vote, which is scored with the stock Dice + CE.
"""
import copy
from typing import NamedTuple

import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch import nn

from nnunet_rl.distributed import mean_across_ranks
from nnunet_rl.dual_branch import DualBranchOutput
from nnunet_rl.u2net_losses import AGWD, alignment_loss


def _only(stock_loss: nn.Module, keep: str) -> nn.Module:
    """A copy of nnU-Net's loss (``DC_and_CE_loss``, deep-supervision wrapped or not) computing only its Dice or only
    its CE term."""
    single = copy.deepcopy(stock_loss)
    terms = single.loss if isinstance(single, DeepSupervisionWrapper) else single
    setattr(terms, "weight_ce" if keep == "dice" else "weight_dice", 0)
    return single


class BranchTargets(dict):
    """Each branch's own target ({branch: tensor or deep-supervision list}): unpaired training, where the two
    branches see patches of different patients. ``to`` moves every target, as nnU-Net's ``train_step`` moves one;
    ``map`` applies a function to every target tensor."""

    def map(self, function) -> "BranchTargets":
        return BranchTargets({branch: [function(t) for t in target] if isinstance(target, list) else function(target)
                              for branch, target in self.items()})

    def to(self, *args, **kwargs) -> "BranchTargets":
        return self.map(lambda t: t.to(*args, **kwargs))


def branch_target(target, branch: str):
    """The target of ``branch``: its own in :class:`BranchTargets`, else the one label map both branches share."""
    return target[branch] if isinstance(target, BranchTargets) else target


class Measurement(NamedTuple):
    """What the PPO state and reward (eqs. 8-9) read from one forward pass: each branch's soft Dice (1 − L_Dice) and
    each RL-XAlign module's S_similarity."""
    dice: dict[str, float]
    similarity: dict[str, float]

    def mean_across_ranks(self) -> "Measurement":
        """The mean over DDP ranks of every value (one all-reduce), so that all ranks fill identical buffers."""
        keys = [(field, key) for field in self._fields for key in getattr(self, field)]
        values = mean_across_ranks(torch.tensor([getattr(self, field)[key] for field, key in keys],
                                                dtype=torch.float64)).tolist()
        averaged: dict[str, dict[str, float]] = {field: {} for field in self._fields}
        for (field, key), value in zip(keys, values):
            averaged[field][key] = value
        return Measurement(**averaged)


class DualBranchLoss(nn.Module):
    """Eq. 20 for a :class:`DualBranchOutput`; nnU-Net's loss for anything else (the ensemble in validation).

    After each training forward, ``last_dice`` holds each branch's soft Dice (1 − L_Dice, detached; nnU-Net's Dice
    term is the negative soft Dice) and, while ``record_similarity`` is set, ``last_similarity`` each RL-XAlign
    module's S_similarity: the PPO state and reward (eqs. 8-9) are read from there, so the reward costs no extra
    forward pass.
    """

    def __init__(self, stock_loss: nn.Module, agwd: AGWD | None, alignment_weight: float,
                 infonce_weight: float, cosine_weight: float, infonce_temperature: float):
        super().__init__()
        self.stock = stock_loss
        self.deep_supervision = isinstance(stock_loss, DeepSupervisionWrapper)
        self.dice, self.ce = _only(stock_loss, "dice"), _only(stock_loss, "ce")
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

    def _branches(self, output: DualBranchOutput) -> dict[str, list[torch.Tensor] | torch.Tensor]:
        """Each branch's outputs as nnU-Net's loss takes them: the list of scales, or the one full-resolution map."""
        if self.deep_supervision:
            return {"primary": output.primary, "auxiliary": output.auxiliary}
        return {"primary": output.primary[0], "auxiliary": output.auxiliary[0]}

    def _branch_dice(self, output: DualBranchOutput, target) -> dict[str, torch.Tensor]:
        return {branch: self.dice(prediction, branch_target(target, branch))
                for branch, prediction in self._branches(output).items()}

    def measure(self, output: DualBranchOutput, target) -> Measurement:
        """Each branch's soft Dice and each module's S_similarity, without a loss (the PPO baseline state)."""
        dice = {branch: float(-value) for branch, value in self._branch_dice(output, target).items()}
        return Measurement(dice, {a.key: float(a.similarity()) for a in output.alignments})

    def last_measurement(self) -> Measurement:
        """The soft Dice and S_similarity recorded by the last training forward (``record_similarity`` set)."""
        return Measurement({branch: float(value) for branch, value in self.last_dice.items()}, self.last_similarity)

    def forward(self, output, target) -> torch.Tensor:
        if not isinstance(output, DualBranchOutput):
            return self.stock(output, target)
        dice = self._branch_dice(output, target)
        ce = {branch: self.ce(prediction, branch_target(target, branch))
              for branch, prediction in self._branches(output).items()}
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
