"""The nnU-Net trainers nnunet_rl ships; nnU-Net finds them by these names (see ``nnunet_rl.discovery``).

Class names are part of every saved model (``checkpoint['trainer_name']``): never rename one.
"""
from nnunet_rl.trainers.pam import nnUNetTrainerPAM
from nnunet_rl.trainers.all_slice_fusion import (SHORT_SCHEDULES as _ALL_SLICE_FUSION_SHORT_SCHEDULES,
                                                 nnUNetTrainerAllSliceFusion)
from nnunet_rl.trainers.classifier_guided import (SHORT_SCHEDULES as _CLASSIFIER_GUIDED_SHORT_SCHEDULES,
                                                  nnUNetTrainerClassifierGuided,
                                                  nnUNetTrainerClassifierGuided_imageInput,
                                                  nnUNetTrainerClassifierGuided_noGate)
from nnunet_rl.trainers.mrl_seg import (SHORT_SCHEDULES as _MRL_SEG_SHORT_SCHEDULES, nnUNetTrainerMRLSeg,
                                        nnUNetTrainerMRLSeg_noADP, nnUNetTrainerMRLSeg_noFB,
                                        nnUNetTrainerMRLSeg_noPretrain, nnUNetTrainerMRLSeg_pretrained,
                                        nnUNetTrainerMRLSeg_shuffledReward)
from nnunet_rl.trainers.pixel_rl import (SHORT_SCHEDULES as _PIXEL_RL_SHORT_SCHEDULES,
                                         STEP_STUDY as _PIXEL_RL_STEP_STUDY, nnUNetTrainerPixelRL,
                                         nnUNetTrainerPixelRL_allForeground,
                                         nnUNetTrainerPixelRL_allForeground_shuffledReward, nnUNetTrainerPixelRL_noDC,
                                         nnUNetTrainerPixelRL_noSAM, nnUNetTrainerPixelRL_pretrained,
                                         nnUNetTrainerPixelRL_shuffledReward)
from nnunet_rl.trainers.rl_deep_supervision import (nnUNetTrainerAWSnet, nnUNetTrainerRLDeepSup,
                                                    nnUNetTrainerRLDeepSup_faithful,
                                                    nnUNetTrainerRLDeepSup_randomSearch,
                                                    nnUNetTrainerRLDeepSup_shortHorizon)
from nnunet_rl.trainers.rl_u2net import nnUNetTrainerRLU2Net
from nnunet_rl.trainers.rl_u2net_unpaired import nnUNetTrainerRLU2Net_unpaired
from nnunet_rl.trainers.rl_u2net_variants import (SHORT_SCHEDULES as _RL_U2NET_SHORT_SCHEDULES,
                                                  nnUNetTrainerRLU2Net_lambda0p1, nnUNetTrainerRLU2Net_lambda0p2,
                                                  nnUNetTrainerRLU2Net_lambda0p3, nnUNetTrainerRLU2Net_lambda0p4,
                                                  nnUNetTrainerRLU2Net_lambda0p5, nnUNetTrainerRLU2Net_noAGWD,
                                                  nnUNetTrainerRLU2Net_noAuxLoss, nnUNetTrainerRLU2Net_noCMA,
                                                  nnUNetTrainerRLU2Net_noRLXAlign, nnUNetTrainerRLU2Net_noPPO)
from nnunet_rl.trainers.schedules import SHORT_SCHEDULES as _SHORT_SCHEDULES

globals().update(_SHORT_SCHEDULES)
globals().update(_RL_U2NET_SHORT_SCHEDULES)
globals().update(_PIXEL_RL_SHORT_SCHEDULES)
globals().update(_PIXEL_RL_STEP_STUDY)
globals().update(_MRL_SEG_SHORT_SCHEDULES)
globals().update(_ALL_SLICE_FUSION_SHORT_SCHEDULES)
globals().update(_CLASSIFIER_GUIDED_SHORT_SCHEDULES)

__all__ = [*_SHORT_SCHEDULES, "nnUNetTrainerPAM",
           "nnUNetTrainerRLDeepSup", "nnUNetTrainerRLDeepSup_faithful", "nnUNetTrainerRLDeepSup_randomSearch",
           "nnUNetTrainerAWSnet",
           "nnUNetTrainerRLDeepSup_shortHorizon",
           "nnUNetTrainerRLU2Net", "nnUNetTrainerRLU2Net_noCMA", "nnUNetTrainerRLU2Net_noRLXAlign",
           "nnUNetTrainerRLU2Net_noAuxLoss", "nnUNetTrainerRLU2Net_noAGWD", "nnUNetTrainerRLU2Net_lambda0p1",
           "nnUNetTrainerRLU2Net_lambda0p2", "nnUNetTrainerRLU2Net_lambda0p3", "nnUNetTrainerRLU2Net_lambda0p4",
           "nnUNetTrainerRLU2Net_lambda0p5", *_RL_U2NET_SHORT_SCHEDULES, "nnUNetTrainerRLU2Net_noPPO",
           "nnUNetTrainerRLU2Net_unpaired",
           "nnUNetTrainerPixelRL", "nnUNetTrainerPixelRL_noSAM", "nnUNetTrainerPixelRL_noDC",
           "nnUNetTrainerPixelRL_shuffledReward", "nnUNetTrainerPixelRL_allForeground",
           "nnUNetTrainerPixelRL_allForeground_shuffledReward", "nnUNetTrainerPixelRL_pretrained",
           *_PIXEL_RL_SHORT_SCHEDULES, *_PIXEL_RL_STEP_STUDY,
           "nnUNetTrainerMRLSeg", "nnUNetTrainerMRLSeg_noFB", "nnUNetTrainerMRLSeg_noADP",
           "nnUNetTrainerMRLSeg_noPretrain", "nnUNetTrainerMRLSeg_shuffledReward",
           "nnUNetTrainerMRLSeg_pretrained", *_MRL_SEG_SHORT_SCHEDULES,
           "nnUNetTrainerAllSliceFusion", *_ALL_SLICE_FUSION_SHORT_SCHEDULES,
           "nnUNetTrainerClassifierGuided", "nnUNetTrainerClassifierGuided_noGate",
           "nnUNetTrainerClassifierGuided_imageInput", *_CLASSIFIER_GUIDED_SHORT_SCHEDULES]
