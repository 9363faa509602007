"""nnUNetTrainerRLDeepSup[_faithful] on a tiny planned dataset: it learns, keeps α valid, resumes exactly."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import make_trainer

from nnunet_rl.deep_supervision_rl import DeepSupervisionWeights
from nnunet_rl.trainers import nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_faithful
from nnunet_rl.trainers.rl_deep_supervision import COMPONENT, WEIGHTS_FILE
from nnunet_rl.trainers.schedules import ShortSchedule

NOISY_OUTPUT = 1


class TinySchedule(ShortSchedule):
    """In-process runs of a few seconds: RL from the first epoch, several look-ahead rounds per epoch."""
    rl_overrides = {COMPONENT: {"warmup_fraction": 0.0, "rl_steps_per_epoch": 4}}
    epochs, iterations, val_iterations = 3, 4, 1


class CleanDeepSup(TinySchedule, nnUNetTrainerRLDeepSup):
    pass


class NoisyOutputDeepSup(TinySchedule, nnUNetTrainerRLDeepSup):
    """Test-only: deep-supervision output 1 is trained on random labels, so its weight can only hurt."""

    def train_step(self, batch: dict) -> dict:
        target = list(batch["target"])
        generator = torch.Generator().manual_seed(self._iteration)
        target[NOISY_OUTPUT] = torch.randint(0, self.label_manager.num_segmentation_heads,
                                             target[NOISY_OUTPUT].shape, generator=generator).to(target[0].dtype)
        return super().train_step({**batch, "target": target})


class FaithfulTwoCandidates(TinySchedule, nnUNetTrainerRLDeepSup_faithful):
    rl_overrides = {COMPONENT: {"warmup_fraction": 0.0, "candidates": 2}}
    epochs, iterations = 2, 2


def trained(dataset: str, trainer_class, configuration: str = "3d_fullres"):
    torch.manual_seed(0)
    trainer = make_trainer(dataset, trainer_class, configuration)
    trainer.run_training()
    return trainer


def stock_alpha(trainer) -> np.ndarray:
    return DeepSupervisionWeights.stock(len(trainer.loss.weight_factors)).alpha()


def test_controllers_lower_the_weight_of_a_useless_output(planned_dataset):
    trainer = trained(planned_dataset, NoisyOutputDeepSup)
    learned = json.load(open(os.path.join(trainer.output_folder, WEIGHTS_FILE)))
    assert learned["alpha"][NOISY_OUTPUT] < stock_alpha(trainer)[NOISY_OUTPUT]
    assert trainer.logger.local_logger.my_fantastic_logging[f"rl_deep_supervision/alpha_{NOISY_OUTPUT}"][-1] == \
        pytest.approx(learned["alpha"][NOISY_OUTPUT])


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_clean_data_keeps_a_valid_distribution_and_loss_decreases(planned_dataset, configuration):
    trainer = trained(planned_dataset, CleanDeepSup, configuration)
    weights = np.array(trainer.loss.weight_factors)
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0) and weights[-1] == 0
    losses = trainer.logger.local_logger.my_fantastic_logging["train_losses"]
    assert losses[-1] < losses[0]
    rewards = trainer.logger.local_logger.my_fantastic_logging["rl_deep_supervision/reward"]
    assert all(0 <= r <= 1 for r in rewards)


def test_resume_restores_controllers_weights_and_baseline(planned_dataset):
    trainer = trained(planned_dataset, CleanDeepSup)
    resumed = make_trainer(planned_dataset, CleanDeepSup)
    resumed.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    torch.testing.assert_close(resumed.controllers.theta, trainer.controllers.theta)
    np.testing.assert_array_equal(resumed.das_weights.beta, trainer.das_weights.beta)
    assert resumed.baseline.value == trainer.baseline.value
    assert resumed.loss.weight_factors == trainer.loss.weight_factors
    torch.testing.assert_close(resumed.controllers.sample(3), trainer.controllers.sample(3))


def test_faithful_mode_trains_candidates_and_continues_from_the_best(planned_dataset):
    trainer = trained(planned_dataset, FaithfulTwoCandidates)
    log = trainer.logger.local_logger.my_fantastic_logging
    assert len(log["train_losses"]) == FaithfulTwoCandidates.epochs and np.all(np.isfinite(log["train_losses"]))
    assert trainer.num_iterations_per_epoch == FaithfulTwoCandidates.iterations
    assert not np.allclose(trainer.das_weights.alpha(), stock_alpha(trainer)[:-1])
    assert trainer.baseline.value is not None
