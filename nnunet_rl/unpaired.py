"""Unpaired two-dataset RL-U2Net (MM-WHS 2017 as distributed: CT and MRI of different patients, each labelled).

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), Sec. "Datasets" and Fig. 6: the CT branch and the MRI
branch each segment their own modality; RL-XAlign (eqs. 1-13) fuses them between encoder stages.

- :class:`UnpairedDatasets`: which dataset (and plans) feeds which branch, read from the plans' rl block
  (``rl_u2net.unpaired``, written by ``nnunet-rl plan-unpaired``).
- :class:`JointLoader`: one batch from each dataset's nnU-Net dataloader, the patches side by side as channels and
  the labels kept apart (:class:`~nnunet_rl.dual_branch_loss.BranchTargets`).
- :class:`UnpairedDualBranchUNet`: the dual-branch network; in eval mode it takes one modality's image, feeds the
  other branch a stored training patch of its own modality and returns the image's own branch (docs/rl_u2net.md).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_rl.augmenters import JoinedAugmenters
from nnunet_rl.dual_branch import FUSION_DIRECTIONS, DualBranchUNet
from nnunet_rl.dual_branch_loss import BranchTargets
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.rl_block import RLU2NetSettings

UNPAIRED_KEY = "unpaired"  # key of the rl block's rl_u2net section


@dataclass(frozen=True)
class UnpairedSide:
    """One branch's dataset: nnU-Net dataset name, plans identifier there, channel names (its dataset.json)."""
    dataset: str
    plans: str
    channels: tuple[str, ...]


@dataclass(frozen=True)
class UnpairedDatasets:
    """The two datasets of unpaired training, by branch (``primary``: the dataset given to ``nnUNetv2_train``)."""
    primary: UnpairedSide
    auxiliary: UnpairedSide

    @classmethod
    def from_section(cls, section: RLU2NetSettings) -> "UnpairedDatasets":
        """From the rl block's ``rl_u2net`` section; an error naming the command that writes it when absent."""
        value = section.unpaired
        if value is None:
            raise NnunetRLError("these plans name no auxiliary dataset (rl block: rl_u2net.unpaired is null); write "
                                "it with: nnunet-rl plan-unpaired PRIMARY_DATASET AUXILIARY_DATASET -c CONFIGURATION")
        try:
            return cls(**{branch: UnpairedSide(value[branch]["dataset"], value[branch]["plans"],
                                               tuple(value[branch]["channels"])) for branch in FUSION_DIRECTIONS})
        except (KeyError, TypeError) as error:
            raise NnunetRLError(f"rl_u2net.unpaired in the plans' rl block is malformed ({error!r}); expected "
                                f"{{'primary': {{'dataset', 'plans', 'channels'}}, 'auxiliary': {{...}}}}: rerun "
                                f"nnunet-rl plan-unpaired") from error

    def as_section_value(self) -> dict:
        return {branch: {"dataset": side.dataset, "plans": side.plans, "channels": list(side.channels)}
                for branch, side in self.sides().items()}

    def sides(self) -> dict[str, UnpairedSide]:
        return {"primary": self.primary, "auxiliary": self.auxiliary}

    def branch_of(self, dataset: str) -> str:
        """The branch whose modality ``dataset`` holds (which branch a model folder of that dataset predicts)."""
        for branch, side in self.sides().items():
            if side.dataset == dataset:
                return branch
        raise NnunetRLError(f"{dataset} is neither the primary ({self.primary.dataset}) nor the auxiliary "
                            f"({self.auxiliary.dataset}) dataset of these unpaired plans")


@contextmanager
def numpy_seed(seed: int):
    """nnU-Net's dataloaders draw from NumPy's global generator: seed it for the block, then restore its state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def reference_patch(loader: nnUNetDataLoader, seed: int) -> tuple[torch.Tensor, dict]:
    """One training patch without augmentation, the same in every run: with NumPy seeded by ``seed``, ``loader``'s
    batch size of its training cases (sorted identifiers) and for each a foreground crop as nnU-Net's dataloader
    draws it (``get_bbox`` with foreground forced); of those, the crop with the most foreground voxels.

    Returns the (1, C, *patch_size) image, preprocessed as for prediction, and where it comes from: ``case``,
    ``bbox`` ([[start, end) per axis of the preprocessed array, which may reach outside it: padded with 0]),
    ``foreground_voxels``, ``candidates`` and ``seed``."""
    cases = sorted(str(case) for case in loader.indices)
    best = None
    with numpy_seed(seed):
        candidates = [cases[i] for i in np.random.choice(len(cases), min(loader.batch_size, len(cases)), replace=False)]
        for case in candidates:
            data, seg, _, properties = loader._data.load_case(case)
            lbs, ubs = loader.get_bbox(data.shape[1:], True, properties["class_locations"])
            bbox = [[int(lb), int(ub)] for lb, ub in zip(lbs, ubs)]
            foreground = int((crop_and_pad_nd(seg, bbox, -1) > 0).sum())
            if best is None or foreground > best[0]:
                best = (foreground, case, bbox, data)
    foreground, case, bbox, data = best
    patch = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
    if loader.patch_size_was_2d:
        patch = patch[:, 0]
    return patch[None], {"case": case, "bbox": bbox, "foreground_voxels": foreground, "candidates": candidates,
                         "seed": seed}


class JointLoader(JoinedAugmenters):
    """Draws one batch from each branch's nnU-Net dataloader (each with its own dataset, fold split and nnU-Net's
    augmentation) and joins them: ``data`` = primary patches then auxiliary patches along the channel axis (sample i
    of the two comes from different patients), ``target`` = each branch's own labels, ``keys`` = each branch's case
    identifiers. nnU-Net's loop calls ``next`` on it like on its own augmenter."""

    def __init__(self, primary, auxiliary):
        self.loaders = {"primary": primary, "auxiliary": auxiliary}

    @property
    def augmenters(self) -> tuple:
        return tuple(self.loaders.values())

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = {branch: next(loader) for branch, loader in self.loaders.items()}
        parts = [torch.as_tensor(batches[b]["data"]) for b in FUSION_DIRECTIONS]
        data = torch.cat(parts, 1)
        if all(part.is_pinned() for part in parts):  # nnU-Net pins batches for CUDA: keep the copy asynchronous
            data = data.pin_memory()
        return {"data": data,
                "target": BranchTargets({b: batches[b]["target"] for b in FUSION_DIRECTIONS}),
                "keys": {b: batches[b]["keys"] for b in FUSION_DIRECTIONS}}


class UnpairedDualBranchUNet(DualBranchUNet):
    """:class:`DualBranchUNet` whose input channels are the primary dataset's channels, then the auxiliary
    dataset's; the same keyword arguments, with ``primary_input_channels`` / ``auxiliary_input_channels`` (counts)
    instead of ``input_channels`` and the channel split, plus ``patch_size`` and ``predicted_branch``.

    Training mode: both datasets' patches side by side (:class:`JointLoader`), both branches' outputs.
    Eval mode (nnU-Net's validation and ``nnUNetv2_predict``): an image of one modality, that of
    ``predicted_branch``; the other branch is fed ``reference_<branch>``, one unaugmented training patch of its own
    modality (:func:`reference_patch`; stored with the weights, so prediction needs nothing but the model folder, and
    predictions depend on it), and the output is the logits of ``predicted_branch`` alone (only its decoder runs).
    In training the other branch only ever saw patches of other patients, so a training patch keeps it in the
    distribution it was trained on; the image itself (the wrong modality for that branch) or zeros would not be.
    """

    def __init__(self, primary_input_channels: int, auxiliary_input_channels: int, num_classes: int,
                 branch_class_name: str, branch_kwargs: dict, branch_kwargs_req_import: Sequence[str] = (), *,
                 patch_size: Sequence[int], predicted_branch: str = "primary", **kwargs):
        total = primary_input_channels + auxiliary_input_channels
        super().__init__(total, num_classes, branch_class_name, branch_kwargs, branch_kwargs_req_import,
                         primary_channels=list(range(primary_input_channels)),
                         auxiliary_channels=list(range(primary_input_channels, total)), **kwargs)
        if predicted_branch not in FUSION_DIRECTIONS:
            raise ValueError(f"predicted_branch must be one of {FUSION_DIRECTIONS}, got {predicted_branch!r}")
        self.predicted_branch = predicted_branch
        for branch, channels in (("primary", primary_input_channels), ("auxiliary", auxiliary_input_channels)):
            self.register_buffer(f"reference_{branch}", torch.full((1, channels, *patch_size), math.nan))

    def reference(self, branch: str) -> torch.Tensor:
        """The stored reference patch of ``branch`` (NaN until one is set)."""
        return getattr(self, f"reference_{branch}")

    def has_references(self) -> bool:
        """Whether both branches' reference patches are set (a checkpoint written by training holds them)."""
        return not any(torch.isnan(self.reference(branch)).any() for branch in FUSION_DIRECTIONS)

    def set_reference(self, branch: str, patch: torch.Tensor) -> None:
        """Store one training patch (1, C, *patch_size) of ``branch``'s modality."""
        self.reference(branch).copy_(patch)

    def forward(self, x: torch.Tensor):
        if self.training:
            return super().forward(x)
        own = self.predicted_branch
        other = FUSION_DIRECTIONS[1 - FUSION_DIRECTIONS.index(own)]
        reference = self.reference(other)
        if x.shape[1] != self.reference(own).shape[1] or x.shape[2:] != reference.shape[2:]:
            raise NnunetRLError(f"the {own} branch predicts inputs of {self.reference(own).shape[1]} channel(s) and "
                                f"the patch size {tuple(reference.shape[2:])}; got {tuple(x.shape[1:])}")
        if torch.isnan(reference).any():
            raise NnunetRLError("this network holds no reference patches (they are stored when training starts); "
                                "predict with a checkpoint written by nnUNetTrainerRLU2Net_unpaired")
        reference = reference.to(x.dtype).expand(x.shape[0], *reference.shape[1:])
        joined = torch.cat([x, reference] if own == "primary" else [reference, x], 1)
        primary_skips, auxiliary_skips, _ = self.encode(joined)  # only the predicted branch is decoded
        if own == "primary":
            return self.primary_branch.decoder(primary_skips)
        return self.auxiliary_branch.decoder(auxiliary_skips)


PLANS_KEYS = ("spacing", "patch_size", "architecture", "batch_size")  # what both datasets must be planned with


def check_same_plans(primary_plans: dict, auxiliary_plans: dict, configuration: str) -> None:
    """The auxiliary dataset must be preprocessed with the primary's plans (spacing, patch, topology, axis order) and
    carry the same rl_u2net settings (the network is rebuilt from either plans file); an error listing every
    difference, or one for differing rl blocks alone, each with the command that fixes it."""
    primary, auxiliary = primary_plans["dataset_name"], auxiliary_plans["dataset_name"]
    rerun = f"nnunet-rl plan-unpaired {primary} {auxiliary} -c {configuration} -p {primary_plans['plans_name']}"
    differences = [key for key in ("transpose_forward", "transpose_backward")
                   if primary_plans.get(key) != auxiliary_plans.get(key)]
    if configuration not in auxiliary_plans["configurations"]:
        differences.append(f"configuration {configuration}")
    else:
        mine, theirs = (plans["configurations"][configuration] for plans in (primary_plans, auxiliary_plans))
        differences += [key for key in PLANS_KEYS if mine.get(key) != theirs.get(key)]
        if not differences and mine.get("rl", {}).get("rl_u2net") != theirs.get("rl", {}).get("rl_u2net"):
            raise NnunetRLError(f"the rl blocks' rl_u2net sections of {primary} and {auxiliary} differ (one plans file "
                                f"edited alone?); edit {primary}'s and copy it over (the preprocessed data stay) "
                                f"with: {rerun}")
    if differences:
        raise NnunetRLError(f"the auxiliary dataset {auxiliary} was preprocessed with other plans than {primary} "
                            f"(differ: {', '.join(differences)}); rerun: {rerun}")


def check_same_labels(primary_json: dict, auxiliary_json: dict, primary: str, auxiliary: str) -> None:
    """Both datasets must have the same labels (one output layer serves both branches' losses and predictions)."""
    if primary_json["labels"] != auxiliary_json["labels"]:
        raise NnunetRLError(f"unpaired training needs the same labels in both datasets; {primary} has "
                            f"{primary_json['labels']}, {auxiliary} has {auxiliary_json['labels']}")
