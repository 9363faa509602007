"""The ``2d_allslice`` configuration ``nnunet-rl plan -c 2d_allslice`` adds to nnU-Net's plans: the 2d configuration
with a patch of whole stacks, for ``nnUNetTrainerAllSliceFusion``.

Z. Chen, X. Chen, Y. Liu, E. Z. Chen, T. Chen, S. Sun, "Enhancing Cardiac MRI Segmentation via Classifier-Guided
Two-Stage Network and All-Slice Information Fusion Transformer", arXiv:2309.00800 (2023), §2.2: all slices of a
stack are segmented together.

The configuration inherits everything from ``2d`` (nnU-Net's ``inherits_from``, as its cascade configurations do):
the same preprocessed data (whole volumes resampled in-plane only), normalisation, in-plane spacing and 2D
architecture. It overrides the patch, ``[Z, *2d patch]``, so that nnU-Net's 3D data loader crops stacks of Z slices
and its predictor slides a Z-slice window over each case, and the batch size, counted in stacks.
"""
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.errors import NnunetRLError

ALL_SLICE_CONFIGURATION = "2d_allslice"
PARENT_CONFIGURATION = "2d"
MAX_SLICES = 24  # cine short-axis stacks have 8-20 slices; longer stacks are chunked (docs/all_slice_fusion.md)
STACKS_PER_BATCH = 2  # when two stacks hold no more slices than the 2d configuration's batch, else one


def longest_stack(plans: dict, fingerprint: dict) -> int:
    """The most slices of any training case: its extent, after nnU-Net's cropping, along the axis that the plans'
    ``transpose_forward`` puts first (the one the 2d configuration does not resample)."""
    slice_axis = plans["transpose_forward"][0]
    return max(shape[slice_axis] for shape in fingerprint["shapes_after_crop"])


def all_slice_configuration(plans: dict, fingerprint: dict) -> dict:
    """The ``2d_allslice`` entry of ``plans["configurations"]`` for a dataset with this nnU-Net fingerprint."""
    if PARENT_CONFIGURATION not in plans["configurations"]:
        raise NnunetRLError(f"the plans {plans['plans_name']} have no {PARENT_CONFIGURATION} configuration, which "
                            f"{ALL_SLICE_CONFIGURATION} inherits from (they have {sorted(plans['configurations'])})")
    parent = PlansManager(plans).get_configuration(PARENT_CONFIGURATION)
    slices = min(longest_stack(plans, fingerprint), MAX_SLICES)
    stacks = STACKS_PER_BATCH if STACKS_PER_BATCH * slices <= parent.batch_size else 1
    return {"inherits_from": PARENT_CONFIGURATION, "patch_size": [slices, *parent.patch_size], "batch_size": stacks}

