"""``nnUNetTrainerAllSliceFusion``: all slices of a stack segmented together, an all-slice fusion transformer at the
bottleneck of nnU-Net's planned 2D U-Net (Z. Chen, X. Chen, Y. Liu, E. Z. Chen, T. Chen, S. Sun, "Enhancing Cardiac
MRI Segmentation via Classifier-Guided Two-Stage Network and All-Slice Information Fusion Transformer",
arXiv:2309.00800 (2023), §2.2, Fig. 3: the first stage).

It trains and predicts the ``2d_allslice`` configuration (``nnunet-rl plan DATASET -c 2d_allslice``): the 2d
configuration's data and architecture with patches of [Z, Y, X], so nnU-Net's own 3D data loader feeds it stacks and
its own predictor slides a Z-slice, Gaussian-weighted window over each case. The trainer only builds the network and
keeps deep supervision and augmentation in-plane.
"""
from contextlib import contextmanager

import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunet_rl.all_slice_fusion import build_all_slice_fusion_network
from nnunet_rl.trainers.base import AtomicCheckpointTrainer
from nnunet_rl.trainers.schedules import short_schedule_variants


@contextmanager
def in_plane_configuration(trainer: nnUNetTrainer):
    """The trainer's configuration with the slice axis dropped from its patch, for nnU-Net methods that decide by
    the patch's dimension (2D: in-plane rotation and mirroring)."""
    stacks = trainer.configuration_manager
    trainer.configuration_manager = ConfigurationManager({**stacks.configuration,
                                                          "patch_size": list(stacks.patch_size[1:])})
    try:
        yield
    finally:
        trainer.configuration_manager = stacks


class nnUNetTrainerAllSliceFusion(AtomicCheckpointTrainer):
    """nnU-Net's trainer on stacks: the :class:`~nnunet_rl.all_slice_fusion.AllSliceFusionNetwork` (planned 2D U-Net
    per slice, inter- then intra-slice attention on the bottleneck), in-plane deep supervision and augmentation.

    Any configuration but a ``2d_allslice``-style one (2D architecture, patch of stacks) is refused with an
    :class:`~nnunet_rl.errors.NnunetRLError` when the network is built.
    """

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager,
                                   configuration_manager: ConfigurationManager,
                                   num_input_channels: int,
                                   num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        return build_all_slice_fusion_network(plans_manager, configuration_manager, num_input_channels,
                                              num_output_channels, enable_deep_supervision)

    def _set_batch_size_and_oversample(self):
        """nnU-Net's split of the planned batch over DDP workers, except that a batch of fewer stacks than workers
        (nnU-Net refuses it; ``2d_allslice`` plans one stack when two do not fit the 2d batch) becomes one stack per
        worker: the global batch is then the number of workers, foreground-oversampled by nnU-Net's rule (the last
        of its samples are oversampled: worker r when r ≥ round(workers · (1 − oversample_foreground_percent)))."""
        workers = dist.get_world_size() if self.is_ddp else 1
        if self.configuration_manager.batch_size < workers:
            random_samples = round(workers * (1 - self.oversample_foreground_percent))
            self.batch_size = 1
            self.oversample_foreground_percent = float(dist.get_rank() >= random_samples)
            self.print_to_log_file(f"DDP: one stack per worker ({workers} workers, "
                                   f"{self.configuration_manager.batch_size} planned), oversampled: "
                                   f"{self.oversample_foreground_percent == 1.0}")
            return
        super()._set_batch_size_and_oversample()

    def _get_deep_supervision_scales(self):
        """nnU-Net's scales from the planned 2D strides, with the slice axis kept whole (scale 1): every decoder
        output has all Z slices."""
        scales = super()._get_deep_supervision_scales()
        return None if scales is None else [[1.0, *scale] for scale in scales]

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """The 2d configuration's rotation range, initial in-plane patch and mirror axes, applied slice by slice
        (nnU-Net's dummy-2D augmentation) to the whole stack; the slice axis is neither rotated, scaled nor
        mirrored (mirroring it would be a no-op for a network without position encoding, and double the test-time
        mirroring)."""
        with in_plane_configuration(self):
            in_plane = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, _, initial_in_plane, in_plane_axes = in_plane
        mirror_axes = tuple(axis + 1 for axis in in_plane_axes)
        self.inference_allowed_mirroring_axes = mirror_axes
        self.print_to_log_file(f"{self.configuration_name}: the 2d settings above applied to every slice of a stack "
                               f"(do_dummy_2d_data_aug: True), mirror axes {mirror_axes}")
        return rotation, True, [self.configuration_manager.patch_size[0], *initial_in_plane], mirror_axes


SHORT_SCHEDULES = short_schedule_variants((nnUNetTrainerAllSliceFusion,), __name__)
globals().update(SHORT_SCHEDULES)
