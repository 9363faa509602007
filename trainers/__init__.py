"""The nnU-Net trainers nnunet_rl ships; nnU-Net finds them by these names (see ``nnunet_rl.discovery``).

Class names are part of every saved model (``checkpoint['trainer_name']``): never rename one.
"""
from nnunet_rl.trainers.pam import nnUNetTrainerPAM
from nnunet_rl.trainers.schedules import (nnUNetTrainer_3epochs_2iters, nnUNetTrainer_10epochs_20iters,
                                          nnUNetTrainerPAM_3epochs_2iters, nnUNetTrainerPAM_10epochs_20iters)

__all__ = ["nnUNetTrainerPAM", "nnUNetTrainer_3epochs_2iters", "nnUNetTrainer_10epochs_20iters",
           "nnUNetTrainerPAM_3epochs_2iters", "nnUNetTrainerPAM_10epochs_20iters"]
