"""Short-schedule variants, the nnU-Net way (``nnUNetTrainer_5epochs``), for tests, the demo and benchmarks.

nnU-Net's own ``_Nepochs`` variants keep 250 iterations per epoch: minutes per epoch on a CPU. These also
shorten the epoch and write ``checkpoint_latest.pth`` after every epoch so an interrupted run resumes
with ``--c`` from where it stopped. Name: ``<trainer>_<epochs>epochs_<iterations>iters``.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_rl.trainers.pam import nnUNetTrainerPAM
from nnunet_rl.trainers.rl_deep_supervision import (nnUNetTrainerAWSnet, nnUNetTrainerRLDeepSup,
                                                    nnUNetTrainerRLDeepSup_faithful,
                                                    nnUNetTrainerRLDeepSup_randomSearch,
                                                    nnUNetTrainerRLDeepSup_shortHorizon)


class ShortSchedule:
    """Mixin (first base) setting epochs, iterations per epoch and validation iterations from class attributes."""
    epochs: int
    iterations: int
    val_iterations: int = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = self.epochs
        self.num_iterations_per_epoch = self.iterations
        self.num_val_iterations_per_epoch = self.val_iterations
        self.save_every = 1


class Smoke(ShortSchedule):
    """Seconds per epoch on a CPU: tests and ``nnunet-rl demo --quick``."""
    epochs, iterations = 3, 2
    suffix = "_3epochs_2iters"


class Demo(ShortSchedule):
    """A few minutes per trainer on a CPU: ``nnunet-rl demo``."""
    epochs, iterations, val_iterations = 10, 20, 5
    suffix = "_10epochs_20iters"


class Study(ShortSchedule):
    """An hour or so per trainer on a CPU for a small real dataset: ``benchmarks/hippocampus_study.py``."""
    epochs, iterations, val_iterations = 30, 50, 10
    suffix = "_30epochs_50iters"


def short_schedule_variants(variants, module: str) -> dict[str, type]:
    """``<variant>_3epochs_2iters``, ``<variant>_10epochs_20iters`` and ``<variant>_30epochs_50iters`` for every
    variant, generated so that the list cannot drift from the variants; ``module`` is the module whose globals receive
    them (nnU-Net finds and pickles trainers by module-level name)."""
    return {f"{variant.__name__}{schedule.suffix}": type(f"{variant.__name__}{schedule.suffix}", (schedule, variant),
                                                         {"__module__": module})
            for variant in dict.fromkeys(variants) for schedule in (Smoke, Demo, Study)}


SHORT_SCHEDULES = short_schedule_variants(
    (nnUNetTrainer, nnUNetTrainerPAM, nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_faithful,
     nnUNetTrainerRLDeepSup_randomSearch, nnUNetTrainerRLDeepSup_shortHorizon, nnUNetTrainerAWSnet), __name__)
globals().update(SHORT_SCHEDULES)
