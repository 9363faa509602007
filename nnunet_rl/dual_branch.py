"""RL-U2Net's dual-branch U-Net, built from nnU-Net's planned topology.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), Fig. 6 and eqs. 7, 14-16.

Each branch is the planned network (PlainConvUNet or a ResEnc U-Net, with the plans' stages, features, kernels,
strides, norm and deep supervision) fed by one channel group: the primary channels or the auxiliary ones. After
the chosen encoder stages an :class:`~nnunet_rl.rl_xalign.RLXAlign` module fuses the other branch's aligned
features into a branch (eq. 7); the fused map is both the next stage's input and the skip to the decoder, as the
paper's RL-XAlign sits between encoder stages. By default both directions are fused (each branch takes the other
as its auxiliary, the paper's Fig. 9 reports both).

In training mode the network returns a :class:`DualBranchOutput` (both branches' deep-supervision outputs and, per
RL-XAlign module, the features the alignment loss and the PPO state need); in eval mode it returns the soft vote of
the two branches (eqs. 14-16) as log-probabilities, which nnU-Net's predictor and validation treat as logits.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunet_rl.devices import copy_to_device
from nnunet_rl.mirroring import Mirroring
from nnunet_rl.rl_xalign import RLXAlign, activity_correlation, activity_map
from nnunet_rl.u2net_losses import soft_vote

FUSION_DIRECTIONS = ("primary", "auxiliary")  # "primary": the primary branch takes in the auxiliary one; and back


class AlignmentSite(NamedTuple):
    """Where an RL-XAlign module sits: the branch that receives the other's features, after which encoder stage."""
    direction: str
    stage: int


class FinestActivity:
    """Both branches' stage-0 activity maps (:func:`~nnunet_rl.rl_xalign.activity_map`, no gradient), computed on
    first use and shared by every module: S_similarity needs them only on rollout iterations, and then once per
    branch, not once per module."""

    def __init__(self, primary: torch.Tensor, auxiliary: torch.Tensor):
        self.features = {"primary": primary, "auxiliary": auxiliary}
        self._maps: dict[str, torch.Tensor] = {}

    def __getitem__(self, branch: str) -> torch.Tensor:
        if branch not in self._maps:
            with torch.no_grad():
                self._maps[branch] = activity_map(self.features[branch])
        return self._maps[branch]


@dataclass
class Alignment:
    """What one RL-XAlign module did in a forward pass.

    ``own``/``aligned``: the receiving branch's features and the aligned features of the other branch at the module's
    stage (the alignment loss compares them). ``finest``: both branches' stage-0 activity maps, on which
    :meth:`similarity` measures how well the module's rotation aligns the modalities.
    """
    key: str
    direction: str  # the receiving branch
    own: torch.Tensor
    aligned: torch.Tensor
    pose: nn.Module
    action: torch.Tensor
    finest: FinestActivity
    mirroring: Mirroring | None = None

    def similarity(self) -> torch.Tensor:
        """S_similarity of eqs. 8-9, averaged over the batch: the receiving branch's stage-0 activity map against the
        other branch's turned by this module's rotation (the same rotation in normalised coordinates).

        The activity map, not the features, is turned, at 1/C of the cost. Where the rotation maps the grid onto
        itself (always on cubes) it commutes with the channel norm, so this is exactly
        the correlation of the activity maps of the turned features; where the map is resampled, the
        activity map is interpolated instead of the features. With K_sel > 1 draws it correlates with the mean of the
        turned activity maps (turning every channel would give the activity of the mean of the turned features; the two
        agree when the draws do).

        Measured at stage 0 because feature maps of deeper stages are not rotation-covariant, so a similarity
        measured there would not reward the right rotation (docs/rl_u2net.md, "Why S_similarity is measured at
        stage 0").
        """
        other = FUSION_DIRECTIONS[1 - FUSION_DIRECTIONS.index(self.direction)]
        with torch.no_grad():
            return activity_correlation(self.finest[self.direction],
                                        self.pose(self.finest[other], self.action, self.mirroring)).mean()


@dataclass
class DualBranchOutput:
    """Training-mode output: deep-supervision outputs of both branches (full resolution first) and alignments."""
    primary: list[torch.Tensor]
    auxiliary: list[torch.Tensor]
    alignments: list[Alignment]


def default_aligned_stages(strides: Sequence[Sequence[int]]) -> list[int]:
    """The stages to align for the planned encoder strides (one per stage, per axis).

    The paper aligns after each of its 4 Swin stages, whose maps are 1/4 to 1/32 of the input per axis (the patch
    embedding takes the first 4×). Here: the deepest 4 stages whose maps hold at most 1/4^dim of the patch's voxels,
    as the paper's first aligned map does (with anisotropic strides the voxel count, not one axis, decides); the
    deepest stage when no stage is that coarse; never the full-resolution stage 0. On nnU-Net's 6-stage 128³ plans
    these are stages 2-5, as in the paper; finer stages cost attention over many more voxels (docs/rl_u2net.md).
    """
    dim = len(strides[0])
    reduction, coarse = 1, []
    for stage, stride in enumerate(strides):
        reduction *= math.prod(stride)
        if stage > 0 and reduction >= 4 ** dim:
            coarse.append(stage)
    if not coarse and len(strides) > 1:
        coarse = [len(strides) - 1]
    return coarse[-4:]


def _encoder_stage(encoder: nn.Module, stage: int, x: torch.Tensor) -> torch.Tensor:
    """One stage of a dynamic-network-architectures encoder (the ResEnc stem belongs to stage 0)."""
    if stage == 0 and getattr(encoder, "stem", None) is not None:
        x = encoder.stem(x)
    return encoder.stages[stage](x)


def select_channels(x: torch.Tensor, channels: list[int]) -> torch.Tensor:
    """x[:, channels]: a view where the channels are consecutive (the default split), else an index_select whose
    indices reach the device without waiting for it (indexing a CUDA tensor by a Python list would)."""
    first, last = channels[0], channels[-1]
    if channels == list(range(first, last + 1)):
        return x[:, first:last + 1]
    return x.index_select(1, copy_to_device(torch.tensor(channels), x.device))


def _as_list(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (list, tuple)) else [output]


class DualBranchUNet(nn.Module):
    """Two planned U-Nets on two channel groups, joined by RL-XAlign modules between encoder stages.

    Built like dynamic-network-architectures' networks, from keyword arguments that mirror the plans:
    ``input_channels``, ``num_classes`` and ``deep_supervision`` as for ``PlainConvUNet``; ``branch_class_name``,
    ``branch_kwargs`` and ``branch_kwargs_req_import`` are the plans' ``network_class_name``, ``arch_kwargs`` and
    ``_kw_requires_import``, from which each branch is built by nnU-Net's ``get_network_from_plans``;
    ``primary_channels``/``auxiliary_channels`` split the input (default: channel 0 and the rest); the remaining
    keywords are the rl block's ``rl_u2net`` keys of the same names (``RLU2NetSettings.network_kwargs()``), with
    ``aligned_stages=None`` meaning :func:`default_aligned_stages`.

    ``set_actions`` chooses the PoseAlign rotations of the next forward pass per module (``{key: LongTensor}``);
    ``None`` (the default, and always in eval mode) uses each module's deterministic rule, the most probable
    rotation where π on it reaches ``min_greedy_probability`` and the identity otherwise, so predictions are
    reproducible and never rest on a rotation chosen by noise. ``set_mirroring`` tells a training forward which
    samples of the batch were mirrored, so that each module turns them by the conjugated rotation
    (:class:`~nnunet_rl.mirroring.Mirroring`).
    """

    def __init__(self, input_channels: int, num_classes: int, branch_class_name: str, branch_kwargs: dict,
                 branch_kwargs_req_import: Sequence[str] = (), *, primary_channels: Sequence[int] | None = None,
                 auxiliary_channels: Sequence[int] | None = None, aligned_stages: Sequence[int] | None = None,
                 fusion_directions: Sequence[str] = FUSION_DIRECTIONS, window_size: int, k_sel: int,
                 temperature: float, fusion_weight: float, use_cma: bool = True, min_greedy_probability: float,
                 deep_supervision: bool = True, allow_init: bool = True):
        super().__init__()
        unknown = sorted(set(fusion_directions) - set(FUSION_DIRECTIONS))
        if unknown:
            raise ValueError(f"unknown fusion directions {unknown}; choose from {FUSION_DIRECTIONS}")
        self.primary_channels = [0] if primary_channels is None else list(primary_channels)
        self.auxiliary_channels = [c for c in range(input_channels) if c not in self.primary_channels] \
            if auxiliary_channels is None else list(auxiliary_channels)
        if not self.primary_channels or not self.auxiliary_channels:
            raise ValueError(f"a dual-branch network needs primary and auxiliary channels, got "
                             f"{self.primary_channels} and {self.auxiliary_channels} of {input_channels}")

        def branch(channels: list[int]) -> nn.Module:
            return get_network_from_plans(branch_class_name, branch_kwargs, branch_kwargs_req_import, len(channels),
                                          num_classes, allow_init=allow_init, deep_supervision=deep_supervision)

        self.primary_branch, self.auxiliary_branch = branch(self.primary_channels), branch(self.auxiliary_channels)
        encoder = self.primary_branch.encoder
        features = encoder.output_channels
        self.num_stages = len(features)
        if aligned_stages is None:
            aligned_stages = default_aligned_stages(encoder.strides)
        bad = [s for s in aligned_stages if not 0 <= s < self.num_stages]
        if bad:
            raise ValueError(f"aligned stages {bad} are outside the planned encoder's stages 0..{self.num_stages - 1}")
        self.aligned_stages = sorted(aligned_stages)
        dim = convert_conv_op_to_dim(encoder.conv_op)
        self.sites = {self.module_key(direction, stage): AlignmentSite(direction, stage)
                      for stage in self.aligned_stages for direction in fusion_directions}
        self.xalign = nn.ModuleDict({
            key: RLXAlign(features[site.stage], dim, window_size=window_size, k_sel=k_sel, temperature=temperature,
                          fusion_weight=fusion_weight, use_cma=use_cma, min_greedy_probability=min_greedy_probability)
            for key, site in self.sites.items()})
        for module in self.xalign.values():  # θ is trained by PPO only, never by the segmentation loss (nor DDP)
            module.pose.theta.requires_grad_(False)
        self.actions: dict[str, torch.Tensor] | None = None
        self.mirroring: Mirroring | None = None

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> int:
        """Feature-map elements stored by a training forward, dynamic-network-architectures' memory estimate that
        nnU-Net's planner fits to its VRAM target: both branches, and every RL-XAlign module on its stage's map."""
        total = self.primary_branch.compute_conv_feature_map_size(input_size) + \
            self.auxiliary_branch.compute_conv_feature_map_size(input_size)
        size = list(input_size)
        for stage, stride in enumerate(self.primary_branch.encoder.strides):
            size = [n // s for n, s in zip(size, stride)]
            total += sum(self.xalign[key].compute_conv_feature_map_size(size)
                         for key, site in self.sites.items() if site.stage == stage)
        return total

    @staticmethod
    def module_key(direction: str, stage: int) -> str:
        return f"{direction}_stage{stage}"

    def set_actions(self, actions: dict[str, torch.Tensor] | None) -> None:
        self.actions = actions

    def set_mirroring(self, mirroring: Mirroring | None) -> None:
        """The flips of the next training forward's samples (None: none); eval mode ignores it."""
        self.mirroring = mirroring

    def action(self, key: str) -> torch.Tensor:
        if self.training and self.actions is not None:
            return self.actions[key]
        return self.xalign[key].pose.deterministic_action()

    def set_deep_supervision(self, enabled: bool) -> None:
        self.primary_branch.decoder.deep_supervision = enabled
        self.auxiliary_branch.decoder.deep_supervision = enabled

    def _align(self, direction: str, stage: int, own: torch.Tensor, other: torch.Tensor,
               finest: FinestActivity, alignments: list[Alignment]) -> torch.Tensor:
        key = self.module_key(direction, stage)
        if key not in self.xalign:
            return own
        module, action = self.xalign[key], self.action(key)
        mirroring = self.mirroring if self.training else None
        fused, aligned = module(own, other, action, mirroring)
        alignments.append(Alignment(key, direction, own, aligned, module.pose, action, finest, mirroring))
        return fused

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Alignment]]:
        """Both encoders with RL-XAlign between them: each branch's skips (fused where aligned) and the alignments."""
        primary = select_channels(x, self.primary_channels)
        auxiliary = select_channels(x, self.auxiliary_channels)
        primary_skips, auxiliary_skips, alignments = [], [], []
        for stage in range(self.num_stages):
            primary = _encoder_stage(self.primary_branch.encoder, stage, primary)
            auxiliary = _encoder_stage(self.auxiliary_branch.encoder, stage, auxiliary)
            if stage == 0:
                finest = FinestActivity(primary, auxiliary)
            if stage in self.aligned_stages:
                primary, auxiliary = (
                    self._align("primary", stage, primary, auxiliary, finest, alignments),
                    self._align("auxiliary", stage, auxiliary, primary, finest, alignments))
            primary_skips.append(primary)
            auxiliary_skips.append(auxiliary)
        return primary_skips, auxiliary_skips, alignments

    def branch_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor] | torch.Tensor,
                                                       list[torch.Tensor] | torch.Tensor, list[Alignment]]:
        """Both branches' decoder outputs (deep-supervision lists or full-resolution maps) and the alignments."""
        primary_skips, auxiliary_skips, alignments = self.encode(x)
        return self.primary_branch.decoder(primary_skips), self.auxiliary_branch.decoder(auxiliary_skips), alignments

    def forward(self, x: torch.Tensor):
        primary_out, auxiliary_out, alignments = self.branch_outputs(x)
        if self.training:
            return DualBranchOutput(_as_list(primary_out), _as_list(auxiliary_out), alignments)
        if isinstance(primary_out, (list, tuple)):
            return [soft_vote(a, b) for a, b in zip(primary_out, auxiliary_out)]
        return soft_vote(primary_out, auxiliary_out)
