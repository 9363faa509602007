"""The classifier-guided refinement stage: nnU-Net's planned U-Net on the first stage's segmentation, with a
class-presence head on its bottleneck that gates the segmentation loss in training and the output in prediction.

Z. Chen, X. Chen, Y. Liu, E. Z. Chen, T. Chen, S. Sun, "Enhancing Cardiac MRI Segmentation via Classifier-Guided
Two-Stage Network and All-Slice Information Fusion Transformer", arXiv:2309.00800 (2023), §2.3 (Ref stage, eq. 1):

    L = Σ_i ½[sign(p_i − 0.5) + 1]·CE_seg,i + λ·CE_class,i,  λ = 0.1,

p_i the head's probability that foreground class i is in the slice (patch). In prediction class i is output only
where p_i > 0.5.

- :class:`PresenceHead`: the paper's classification MLP, on the bottleneck's maximum over the patch.
- :class:`ClassifierGuidedNetwork`: the planned network on a slice of the input channels (the first stage's one-hot
  segmentation, or the image for the paper's worse variant), the head beside its decoder; in eval mode (prediction,
  nnU-Net's validation) it returns :func:`gated_logits`.
- :class:`PresenceGatedLoss`: nnU-Net's loss (Dice + CE, deep supervision) on targets in which the voxels of the
  classes the head calls absent carry nnU-Net's ignore label (:func:`gated_target`), plus λ times the head's binary
  cross-entropy. ½[sign(p_i − 0.5) + 1] is 1 or 0 per patch and class: the ignore label is exactly "this class's
  voxels do not count", for nnU-Net's CE and its Dice term alike, at every deep-supervision scale.
"""
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nnunet_rl.planned_network import AroundPlannedNetwork

PRESENCE_LOSS_WEIGHT = 0.1  # λ, the paper's
GATE_MARGIN = 1000.0  # a gated class's logit is this far below the voxel's lowest (finite, safe in float16 sums)


def presence_labels(target: torch.Tensor, foreground_labels: Sequence[int]) -> torch.Tensor:
    """(B, 1, *spatial) labels -> (B, F) float, 1 where foreground class i occurs in the sample."""
    flat = target.flatten(1)
    return torch.stack([(flat == label).any(dim=1) for label in foreground_labels], dim=1).float()


def gated_target(target: torch.Tensor, present: torch.Tensor, foreground_labels: Sequence[int],
                 gate_label: int) -> torch.Tensor:
    """``target`` (B, 1, *spatial) with the voxels of every class the head calls absent (``present`` (B, F) False)
    set to ``gate_label`` (nnU-Net's ignore label)."""
    gated = target
    for index, label in enumerate(foreground_labels):
        absent = ~present[:, index].view(-1, *[1] * (target.ndim - 1))
        gated = torch.where(absent & (target == label), torch.full_like(target, gate_label), gated)
    return gated


def gated_logits(logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, C, *spatial) in which foreground class i cannot win where the head calls it absent (p_i ≤ 0.5):
    its logit becomes :data:`GATE_MARGIN` below the voxel's lowest. nnU-Net's predictor averages logits over mirrored
    passes and overlapping windows (Gaussian-weighted): a pass or window that gates class i outweighs any ungated one
    unless its weight at the voxel is below about 1/100 of theirs, so a class is output only where the head called
    it present in (practically) every pass and window covering the voxel."""
    absent = (presence_logits <= 0).view(*presence_logits.shape, *[1] * (logits.ndim - 2))
    floor = logits.min(dim=1, keepdim=True).values - GATE_MARGIN
    foreground = torch.where(absent, floor, logits[:, 1:])
    return torch.cat([logits[:, :1], foreground], dim=1)


class PresenceHead(nn.Module):
    """Per foreground class, the logit of "present in this slice / patch": the bottleneck's maximum over the patch,
    a hidden layer as wide as the bottleneck, ReLU, a linear layer (the paper's MLP; it gives neither the width nor
    the pooling). Maximum, not average: the planned network instance-normalises every stage, so each channel's mean
    over a patch is nearly the same for every patch, whether a class is in it or not."""

    def __init__(self, bottleneck_channels: int, num_foreground_classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(bottleneck_channels, bottleneck_channels), nn.ReLU(inplace=True),
                                 nn.Linear(bottleneck_channels, num_foreground_classes))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.mlp(bottleneck.flatten(2).amax(dim=2))


class ClassifierGuidedNetwork(AroundPlannedNetwork):
    """The planned network on ``input_channels`` of nnU-Net's input, with a :class:`PresenceHead` on its bottleneck.

    ``forward`` returns what the planned network returns (logits, or deep supervision's list), gated by the head
    (:func:`gated_logits`) in eval mode when ``gate_output``; the head's logits of the last forward are in
    :attr:`presence_logits` (the loss reads them).
    """

    def __init__(self, planned_network: nn.Module, input_channels: slice, num_foreground_classes: int,
                 gate_output: bool = True):
        super().__init__()
        self.backbone = planned_network
        self.input_channels = input_channels
        self.presence_head = PresenceHead(planned_network.encoder.output_channels[-1], num_foreground_classes)
        self.gate_output = gate_output
        self.presence_logits: torch.Tensor | None = None

    @property
    def planned_network(self) -> nn.Module:
        return self.backbone

    def forward(self, x: torch.Tensor):
        skips = self.backbone.encoder(x[:, self.input_channels])
        self.presence_logits = self.presence_head(skips[-1])
        output = self.backbone.decoder(skips)
        if self.training or not self.gate_output:
            return output
        if isinstance(output, torch.Tensor):
            return gated_logits(output, self.presence_logits)
        return [gated_logits(scale, self.presence_logits) for scale in output]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """nnU-Net's memory estimate: the planned network's (the head's activations are a vector per sample)."""
        return self.backbone.compute_conv_feature_map_size(input_size)


class PresenceGatedLoss(nn.Module):
    """Eq. 1: ``segmentation_loss`` (nnU-Net's, built with ``gate_label`` as its ignore label) on the targets gated
    by the head's last prediction, plus ``weight`` times the head's binary cross-entropy against the presence of
    each foreground class in the full-resolution target. ``presence_logits`` returns the head's logits of the
    forward whose output the loss receives."""

    def __init__(self, segmentation_loss: nn.Module, presence_logits: Callable[[], torch.Tensor],
                 foreground_labels: Sequence[int], gate_label: int, weight: float = PRESENCE_LOSS_WEIGHT):
        super().__init__()
        self.segmentation_loss = segmentation_loss
        self.presence_logits = presence_logits
        self.foreground_labels = list(foreground_labels)
        self.gate_label = gate_label
        self.weight = weight

    def forward(self, output, target) -> torch.Tensor:
        logits = self.presence_logits()
        targets = [target] if isinstance(target, torch.Tensor) else list(target)
        present = (logits > 0).detach()
        gated = [gated_target(scale, present, self.foreground_labels, self.gate_label) for scale in targets]
        segmentation = self.segmentation_loss(output, gated[0] if isinstance(target, torch.Tensor) else gated)
        labels = presence_labels(targets[0], self.foreground_labels)
        return segmentation + self.weight * F.binary_cross_entropy_with_logits(logits.float(), labels)
