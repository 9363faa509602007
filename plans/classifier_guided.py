"""Refinement configurations ``<stage 1>_refine`` (``nnunet-rl plan DATASET -c 2d_refine``): a second stage chained to
a first with nnU-Net's own cascade machinery, for ``nnUNetTrainerClassifierGuided``.

Z. Chen, X. Chen, Y. Liu, E. Z. Chen, T. Chen, S. Sun, "Enhancing Cardiac MRI Segmentation via Classifier-Guided
Two-Stage Network and All-Slice Information Fusion Transformer", arXiv:2309.00800 (2023), §2.1, Fig. 2: the Ref
stage refines what the Seg stage predicted.

``X_refine`` is what nnU-Net's ``3d_cascade_fullres`` is to ``3d_lowres``: it inherits the architecture, patch and
preprocessed data of X (of ``2d`` when X is ``2d_allslice``, whose patch of stacks is for the fusion network) and
names X as its ``previous_stage``; X names it among its ``next_stage``\\ s, so that training X (``nnUNetv2_train`` or
``--val``) writes each validation case's segmentation to ``predicted_next_stage/X_refine`` and
``nnUNetv2_predict -c X_refine -prev_stage_predictions`` feeds X's predictions. X may be trained with any trainer:
``previous_stage_trainer`` in the refinement configuration names it (nnU-Net would look for X's predictions under
the refinement's own trainer).
"""
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.all_slice_fusion import ALL_SLICE_CONFIGURATION, PARENT_CONFIGURATION

REFINE_SUFFIX = "_refine"
PREVIOUS_STAGE_TRAINER_KEY = "previous_stage_trainer"
# the first stage's trainer when the user names none: stock nnU-Net's, but the fusion network for stacks of slices
DEFAULT_PREVIOUS_STAGE_TRAINERS = {ALL_SLICE_CONFIGURATION: "nnUNetTrainerAllSliceFusion"}
STOCK_TRAINER = "nnUNetTrainer"


def default_previous_stage_trainer(first_stage: str) -> str:
    return DEFAULT_PREVIOUS_STAGE_TRAINERS.get(first_stage, STOCK_TRAINER)


def previous_stage_trainer(configuration: dict) -> str:
    """The first stage's trainer a refinement configuration (its plans entry) names."""
    return configuration.get(PREVIOUS_STAGE_TRAINER_KEY) or \
        default_previous_stage_trainer(configuration["previous_stage"])


def is_refine_configuration(configuration: str) -> bool:
    return configuration.endswith(REFINE_SUFFIX)


def first_stage_of(refine_configuration_name: str) -> str:
    """``2d`` for ``2d_refine``."""
    if not is_refine_configuration(refine_configuration_name):
        raise NnunetRLError(f"{refine_configuration_name} is not a refinement configuration (<stage 1>{REFINE_SUFFIX})")
    return refine_configuration_name[:-len(REFINE_SUFFIX)]


def architecture_source(first_stage: str) -> str:
    """The configuration whose architecture, patch and data the refinement of ``first_stage`` inherits."""
    return PARENT_CONFIGURATION if first_stage == ALL_SLICE_CONFIGURATION else first_stage


def refine_configuration(plans: dict, first_stage: str, first_stage_trainer: str) -> dict:
    """The ``<first_stage>_refine`` entry of ``plans["configurations"]``."""
    if first_stage not in plans["configurations"]:
        raise NnunetRLError(f"the plans {plans['plans_name']} have no {first_stage} configuration to refine (they have "
                            f"{sorted(plans['configurations'])}); plan it first")
    return {"inherits_from": architecture_source(first_stage), "previous_stage": first_stage,
            "next_stage": None, PREVIOUS_STAGE_TRAINER_KEY: first_stage_trainer}


def chain_next_stages(plans: dict) -> None:
    """Make every configuration's ``next_stage`` the configurations naming it as ``previous_stage`` (nnU-Net's own
    3d_lowres -> 3d_cascade_fullres included), written explicitly where inheritance would say otherwise; repeated
    until stable, as a change to a parent changes what its children inherit."""
    configurations = plans["configurations"]
    changed = True
    while changed:
        changed = False
        for name in configurations:
            resolved = PlansManager(plans).get_configuration  # afresh: it caches, and the plans change
            wanted = [other for other in configurations if resolved(other).previous_stage_name == name]
            if (resolved(name).next_stage_names or []) != wanted:
                configurations[name]["next_stage"] = wanted or None
                changed = True


def add_refine_configuration(plans: dict, refine_configuration_name: str, first_stage_trainer: str | None) -> None:
    """Write ``refine_configuration_name`` (``<first stage>_refine``) into ``plans`` and chain it to its first stage.
    ``first_stage_trainer`` None keeps the one the plans name already (a new entry: ``nnUNetTrainerAllSliceFusion``
    for ``2d_allslice_refine``, else ``nnUNetTrainer``)."""
    first_stage = first_stage_of(refine_configuration_name)
    existing = plans["configurations"].get(refine_configuration_name, {})
    trainer = first_stage_trainer or existing.get(PREVIOUS_STAGE_TRAINER_KEY) or \
        default_previous_stage_trainer(first_stage)
    plans["configurations"][refine_configuration_name] = refine_configuration(plans, first_stage, trainer)
    chain_next_stages(plans)
