"""``nnUNetTrainerClassifierGuided``: the classifier-guided refinement stage (Z. Chen, X. Chen, Y. Liu, E. Z. Chen,
T. Chen, S. Sun, "Enhancing Cardiac MRI Segmentation via Classifier-Guided Two-Stage Network and All-Slice Information
Fusion Transformer", arXiv:2309.00800 (2023), §2.1 and §2.3, Fig. 2: the Ref stage).

It trains a ``<X>_refine`` configuration (``nnunet-rl plan DATASET -c 2d_refine``), a cascade stage the nnU-Net way:
nnU-Net's data loader hands it X's cross-validated predictions (``predicted_next_stage``) as one-hot channels after
the image, with nnU-Net's cascade augmentation of them, and ``nnUNetv2_predict -prev_stage_predictions`` does the same
at prediction. The network (:class:`~nnunet_rl.classifier_guided.ClassifierGuidedNetwork`) sees only those channels
(the paper's Ref stage does not look at the image), and nnU-Net's loss is gated by the class-presence head
(:class:`~nnunet_rl.classifier_guided.PresenceGatedLoss`).

Variants: ``_noGate`` (trained the same; the output is not gated), ``_imageInput`` (the head and U-Net see the image,
not the first stage: the paper's "Seg (AS + MT)", which it reports as worse).
"""
from pathlib import Path

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_rl.classifier_guided import ClassifierGuidedNetwork, PresenceGatedLoss, presence_labels
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.classifier_guided import previous_stage_trainer
from nnunet_rl.trainers.base import AtomicCheckpointTrainer
from nnunet_rl.trainers.schedules import short_schedule_variants
from nnunet_rl.voxel_actor_critic import full_resolution


def previous_stage_predictions(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                               configuration_name: str) -> Path:
    """Where nnU-Net's training of the first stage (its trainer named in the refinement configuration) writes the
    cross-validated predictions this configuration trains on."""
    trainer = previous_stage_trainer(configuration_manager.configuration)
    model = f"{trainer}__{plans_manager.plans_name}__{configuration_manager.previous_stage_name}"
    return Path(str(nnUNet_results)) / plans_manager.dataset_name / model / "predicted_next_stage" / configuration_name


class nnUNetTrainerClassifierGuided(AtomicCheckpointTrainer):
    """nnU-Net's trainer of a cascade stage, with the presence head's network and loss. Refused, with an
    :class:`~nnunet_rl.errors.NnunetRLError`, on a configuration without a previous stage, on region-based labels,
    and when the first stage has not predicted every training case."""
    image_input = False
    gate_output = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.is_cascaded:
            raise NnunetRLError(f"{type(self).__name__} refines a first stage's segmentation: train a refinement "
                                f"configuration (nnunet-rl plan DATASET -c {configuration}_refine, then "
                                f"nnUNetv2_train DATASET {configuration}_refine FOLD -tr {type(self).__name__}), "
                                f"not {configuration}")
        if self.label_manager.has_regions:
            raise NnunetRLError(f"{type(self).__name__} predicts the presence of classes; region-based labels are "
                                f"not supported")
        self.folder_with_segs_from_previous_stage = str(previous_stage_predictions(
            self.plans_manager, self.configuration_manager, configuration))

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """The planned network on the first stage's one-hot channels (the last ``num_output_channels`` − 1 of
        nnU-Net's cascade input), or on the image channels (the others) for ``_imageInput``."""
        num_foreground = num_output_channels - 1
        num_image_channels = num_input_channels - num_foreground
        channels = slice(0, num_image_channels) if cls.image_input else slice(num_image_channels, num_input_channels)
        planned = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager,
                                                           channels.stop - channels.start, num_output_channels,
                                                           enable_deep_supervision)
        return ClassifierGuidedNetwork(planned, channels, num_foreground, cls.gate_output)

    def _do_i_compile(self) -> bool:
        """Not compiled: the loss reads the head's logits that the network keeps from its forward."""
        return False

    @property
    def guided_network(self) -> ClassifierGuidedNetwork:
        return self.network.module if self.is_ddp else self.network

    def _build_loss(self) -> nn.Module:
        """nnU-Net's loss, with the dataset's ignore label (or one above every label when it has none) marking the
        voxels the head gates out, inside :class:`PresenceGatedLoss`."""
        segmentation_loss = super()._build_loss()
        gate_label = self.label_manager.ignore_label
        if gate_label is None:
            gate_label = max(self.label_manager.all_labels) + 1
            dice_and_ce = segmentation_loss.loss if isinstance(segmentation_loss, DeepSupervisionWrapper) \
                else segmentation_loss
            dice_and_ce.ignore_label = gate_label
            dice_and_ce.ce.ignore_index = gate_label
        return PresenceGatedLoss(segmentation_loss, lambda: self.guided_network.presence_logits,
                                 self.label_manager.foreground_labels, gate_label)

    def on_train_start(self) -> None:
        self.require_previous_stage_predictions()
        super().on_train_start()

    def require_previous_stage_predictions(self) -> None:
        """Refuse to start when the first stage's prediction of a case of this fold is missing (nnU-Net would fail
        on the first batch that needs it)."""
        training, validation = self.do_split()
        folder = Path(self.folder_with_segs_from_previous_stage)
        missing = [case for case in [*training, *validation] if not any(folder.glob(f"{case}.*"))]
        if missing:
            first_stage = self.configuration_manager.previous_stage_name
            trainer = previous_stage_trainer(self.configuration_manager.configuration)
            raise NnunetRLError(
                f"{folder} lacks the first stage's prediction of {len(missing)} case(s) of fold {self.fold} "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}). Train the first stage on every "
                f"fold after planning {self.configuration_name} (nnUNetv2_train {self.plans_manager.dataset_name} "
                f"{first_stage} FOLD -tr {trainer}; add --val for folds trained before): each fold writes its "
                f"validation cases there")

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's, plus how many (sample, class) presence calls of the head were right."""
        result = super().validation_step(batch)
        labels = presence_labels(full_resolution(batch["target"]).to(self.device), self.label_manager.foreground_labels)
        predicted = (self.guided_network.presence_logits > 0).float()
        return {**result, "presence_correct": (predicted == labels).sum().item(), "presence_calls": labels.numel()}

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        correct = np.sum([output["presence_correct"] for output in val_outputs])
        calls = np.sum([output["presence_calls"] for output in val_outputs])
        self.print_to_log_file(f"presence head accuracy on validation patches: {correct / max(calls, 1):.4f}")


class nnUNetTrainerClassifierGuided_noGate(nnUNetTrainerClassifierGuided):
    """Trained as :class:`nnUNetTrainerClassifierGuided` (head, gated loss); its output is not gated."""
    gate_output = False


class nnUNetTrainerClassifierGuided_imageInput(nnUNetTrainerClassifierGuided):
    """The U-Net and its head see the image instead of the first stage's segmentation (the paper's "Seg (AS + MT)",
    Table 2: the classifier on image features, reported to hurt)."""
    image_input = True


SHORT_SCHEDULES = short_schedule_variants((nnUNetTrainerClassifierGuided, nnUNetTrainerClassifierGuided_noGate,
                                           nnUNetTrainerClassifierGuided_imageInput), __name__)
globals().update(SHORT_SCHEDULES)
