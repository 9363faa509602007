"""RL-U2Net's ablations as tiny subclasses, nnU-Net style, and their (and the unpaired trainer's) short schedules.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), Table 2 and Fig. 9.

Each variant pins hyperparameters of the ``rl_u2net`` section through ``rl_overrides``; the name says what it
removes or sets. ``nnunet-rl ablation`` trains them side by side (``ABLATIONS`` lists them in Table 2's order, then
ours: w/o PPO, which isolates what the learned rotation adds to the fusion).
"""
from nnunet_rl.trainers.rl_u2net import COMPONENT, nnUNetTrainerRLU2Net
from nnunet_rl.trainers.rl_u2net_unpaired import nnUNetTrainerRLU2Net_unpaired
from nnunet_rl.trainers.schedules import short_schedule_variants


class nnUNetTrainerRLU2Net_noCMA(nnUNetTrainerRLU2Net):
    """w/o CMA: PoseAlign-aligned auxiliary features are fused without cross-modal attention."""
    rl_overrides = {COMPONENT: {"use_cma": False}}


class nnUNetTrainerRLU2Net_noRLXAlign(nnUNetTrainerRLU2Net):
    """w/o RL-XAlign: two independent branches (no fusion, no PPO, no alignment loss), ensembled."""
    rl_overrides = {COMPONENT: {"aligned_stages": []}}


class nnUNetTrainerRLU2Net_noPPO(nnUNetTrainerRLU2Net):
    """w/o PPO: RL-XAlign (CMA, fusion, alignment loss) with PoseAlign fixed at the identity and no agent: no RL phase
    (``rl_fraction`` 0), so θ stays at zero, whose greedy rotation is the identity (index 0)."""
    rl_overrides = {COMPONENT: {"rl_fraction": 0.0}}


class nnUNetTrainerRLU2Net_noAuxLoss(nnUNetTrainerRLU2Net):
    """w/o the alignment loss (λ₁ = 0 in eq. 20)."""
    rl_overrides = {COMPONENT: {"alignment_weight": 0.0}}


class nnUNetTrainerRLU2Net_noAGWD(nnUNetTrainerRLU2Net):
    """w/o AGWD: the two branches' Dice and CE are summed (w = 0 in eq. 19)."""
    rl_overrides = {COMPONENT: {"agwd": False}}


class nnUNetTrainerRLU2Net_lambda0p1(nnUNetTrainerRLU2Net):
    rl_overrides = {COMPONENT: {"fusion_weight": 0.1}}


class nnUNetTrainerRLU2Net_lambda0p2(nnUNetTrainerRLU2Net):
    rl_overrides = {COMPONENT: {"fusion_weight": 0.2}}


class nnUNetTrainerRLU2Net_lambda0p3(nnUNetTrainerRLU2Net):
    """The default λ = 0.3, named for the sweep."""
    rl_overrides = {COMPONENT: {"fusion_weight": 0.3}}


class nnUNetTrainerRLU2Net_lambda0p4(nnUNetTrainerRLU2Net):
    rl_overrides = {COMPONENT: {"fusion_weight": 0.4}}


class nnUNetTrainerRLU2Net_lambda0p5(nnUNetTrainerRLU2Net):
    rl_overrides = {COMPONENT: {"fusion_weight": 0.5}}


ABLATIONS = {"RL-U2Net": nnUNetTrainerRLU2Net,
             "w/o CMA": nnUNetTrainerRLU2Net_noCMA,
             "w/o RL-XAlign": nnUNetTrainerRLU2Net_noRLXAlign,
             "w/o aux loss": nnUNetTrainerRLU2Net_noAuxLoss,
             "w/o AGWD": nnUNetTrainerRLU2Net_noAGWD,
             "w/o PPO (identity rotation)": nnUNetTrainerRLU2Net_noPPO}
LAMBDA_SWEEP = {0.1: nnUNetTrainerRLU2Net_lambda0p1, 0.2: nnUNetTrainerRLU2Net_lambda0p2,
                0.3: nnUNetTrainerRLU2Net_lambda0p3, 0.4: nnUNetTrainerRLU2Net_lambda0p4,
                0.5: nnUNetTrainerRLU2Net_lambda0p5}


# short schedules of every variant above and of nnUNetTrainerRLU2Net_unpaired (tests, demo, `ablation --schedule`)
SHORT_SCHEDULES = short_schedule_variants([*ABLATIONS.values(), *LAMBDA_SWEEP.values(), nnUNetTrainerRLU2Net_unpaired],
                                          __name__)
globals().update(SHORT_SCHEDULES)  # module-level names: nnU-Net finds and pickles trainers by name
