"""nnUNetTrainerRLDeepSup[_faithful, _shortHorizon] and AWSnet on a tiny planned dataset: reward cases held out of
training and apart from validation, α valid, exact resume, datasets with an ignore label, regions and empty classes."""
import copy
import json
import os

import numpy as np
import pytest
import torch


from nnunet_rl.rl_deep_supervision import DeepSupervisionWeights
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.pam import PixelAttentionGate
from nnunet_rl.trainers import (nnUNetTrainerAWSnet, nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_faithful,
                                nnUNetTrainerRLDeepSup_randomSearch, nnUNetTrainerRLDeepSup_shortHorizon)
from nnunet_rl.trainers.reward_cases import REWARD_CASES_FILE, carve_reward_cases
from nnunet_rl.trainers.rl_deep_supervision import (COMPONENT, WEIGHTS_FILE, hard_foreground_dice,
                                                    soft_foreground_dice)
from nnunet_rl.trainers.schedules import ShortSchedule
from nnunet_rl.trainer_from_plans import trainer_from_plans



class TinySchedule(ShortSchedule):
    """In-process runs of a few seconds: RL from the first epoch, several look-ahead rounds per epoch."""
    rl_overrides = {COMPONENT: {"warmup_fraction": 0.0, "rl_steps_per_epoch": 4}}
    epochs, iterations, val_iterations = 3, 4, 1


class CleanDeepSup(TinySchedule, nnUNetTrainerRLDeepSup):
    pass


class RandomSearchTiny(TinySchedule, nnUNetTrainerRLDeepSup_randomSearch):
    pass


class FaithfulTwoCandidates(TinySchedule, nnUNetTrainerRLDeepSup_faithful):
    rl_overrides = {COMPONENT: {"warmup_fraction": 0.0, "candidates": 2}}
    epochs, iterations = 2, 2


class ShortHorizonTiny(TinySchedule, nnUNetTrainerRLDeepSup_shortHorizon):
    """Trials of 2 steps in epochs of 3: the best copy's 2 steps and 1 more make the epoch."""
    rl_overrides = {COMPONENT: {"warmup_fraction": 0.0, "candidates": 3, "trial_steps": 2,
                                "trial_reward_batches": 2}}
    epochs, iterations = 2, 3


class ShortHorizonThreeCandidates(ShortHorizonTiny):
    """Records the serial number of every batch it trains on."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.trained_on: list[int] = []  # per train step: the serial number of its batch
        self._loader = self.dataloader_train
        self.dataloader_train = ({**batch, "serial": serial} for serial, batch in enumerate(self._loader))

    def on_train_end(self) -> None:
        self.dataloader_train = self._loader  # for nnU-Net to shut its workers down
        super().on_train_end()

    def train_step(self, batch: dict) -> dict:
        self.trained_on.append(batch["serial"])
        return super().train_step(batch)


def trained(dataset: str, trainer_class, configuration: str = "3d_fullres"):
    torch.manual_seed(0)
    trainer = trainer_from_plans(dataset, trainer_class, configuration)
    trainer.run_training()
    return trainer


def stock_alpha(trainer) -> np.ndarray:
    return DeepSupervisionWeights.stock(len(trainer.loss.weight_factors)).alpha()


@pytest.fixture(scope="module")
def training(planned_dataset):
    """``training(trainer_class)``: one finished run of the class on 3d_fullres for the module, trained when a test
    first asks for it and read by every test that asks again (the recording classes below serve several tests)."""
    runs = {}

    def run(trainer_class):
        if trainer_class not in runs:
            runs[trainer_class] = trained(planned_dataset, trainer_class)
        return runs[trainer_class]
    return run


@pytest.fixture(scope="module")
def clean_trained(training):
    return training(LookAheadRecordsBatches)


def test_learned_weights_are_written_and_logged(clean_trained):
    trainer = clean_trained
    learned = json.load(open(os.path.join(trainer.output_folder, WEIGHTS_FILE)))
    assert learned["alpha"] == pytest.approx(list(trainer.loss.weight_factors))
    log = trainer.logger.local_logger.my_fantastic_logging
    assert [log[f"rl_deep_supervision/alpha_{i}"][-1] for i in range(len(learned["alpha"]))] == \
        pytest.approx(learned["alpha"])


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_clean_data_keeps_a_valid_distribution_and_loss_decreases(planned_dataset, request, configuration):
    trainer = request.getfixturevalue("clean_trained") if configuration == "3d_fullres" else \
        trained(planned_dataset, CleanDeepSup, configuration)
    weights = np.array(trainer.loss.weight_factors)
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0) and weights[-1] == 0
    losses = trainer.logger.local_logger.my_fantastic_logging["train_losses"]
    assert losses[-1] < losses[0]
    rewards = trainer.logger.local_logger.my_fantastic_logging["rl_deep_supervision/reward"]
    assert all(0 <= r <= 1 for r in rewards)


def test_random_search_keeps_the_best_candidate_with_frozen_controllers(planned_dataset):
    torch.manual_seed(0)
    initial = trainer_from_plans(planned_dataset, RandomSearchTiny)
    initial.initialize()
    trainer = trained(planned_dataset, RandomSearchTiny)
    torch.testing.assert_close(trainer.controllers.theta, initial.controllers.theta, rtol=0, atol=0)
    assert not np.allclose(trainer.das_weights.alpha(), stock_alpha(trainer)[:-1])


def test_resume_restores_controllers_weights_and_baseline(planned_dataset, clean_trained):
    trainer = clean_trained
    resumed = trainer_from_plans(planned_dataset, CleanDeepSup)
    resumed.load_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))
    torch.testing.assert_close(resumed.controllers.theta, trainer.controllers.theta)
    np.testing.assert_array_equal(resumed.das_weights.beta, trainer.das_weights.beta)
    assert resumed.baseline.value == trainer.baseline.value
    assert resumed.loss.weight_factors == trainer.loss.weight_factors
    # the same θ (above) and generator state: the same next sampled actions, without drawing from the shared trainer
    assert torch.equal(resumed.controllers.generator.get_state(), trainer.controllers.generator.get_state())


def test_faithful_mode_trains_candidates_and_continues_from_the_best(training):
    trainer = training(FaithfulRecordsBatches)
    log = trainer.logger.local_logger.my_fantastic_logging
    assert len(log["train_losses"]) == FaithfulTwoCandidates.epochs and np.all(np.isfinite(log["train_losses"]))
    assert trainer.num_iterations_per_epoch == FaithfulTwoCandidates.iterations
    assert not np.allclose(trainer.das_weights.alpha(), stock_alpha(trainer)[:-1])
    assert trainer.baseline.value is not None


def test_a_candidate_trains_from_the_start_state_without_changing_it(planned_dataset):
    """Regression: torch's optimizer adopted the start state's momentum tensors and updated them in place, so each
    faithful candidate started where the previous one's momentum had left off (later candidates scored higher)."""
    trainer = trainer_from_plans(planned_dataset, FaithfulTwoCandidates)
    trainer.on_train_start()
    trainer.train_step(next(trainer.dataloader_train))
    start = trainer._training_state()
    untouched = copy.deepcopy(start)
    for _ in range(2):
        trainer._load_training_state(start)
        trainer.train_step(next(trainer.dataloader_train))
    for saved, original in zip(start["optimizer"]["state"].values(), untouched["optimizer"]["state"].values()):
        torch.testing.assert_close(saved["momentum_buffer"], original["momentum_buffer"], rtol=0, atol=0)
    for name, weights in start["network"].items():
        torch.testing.assert_close(weights, untouched["network"][name], rtol=0, atol=0)
    trainer.on_train_end()


def test_identical_short_horizon_candidates_score_alike(planned_dataset):
    """End to end: K copies of one weighting, trained from the same start on the same batches, score the same."""
    trainer = trainer_from_plans(planned_dataset, ShortHorizonThreeCandidates)
    trainer.on_train_start()
    for _ in range(20):  # past an all-background start, where every candidate would score alike anyway
        trainer.train_step(next(trainer.dataloader_train))
    trainer._scheduled_iterations = trainer.num_iterations_per_epoch  # as on_train_epoch_start sets it
    scores = trainer.train_candidates(np.repeat(trainer.das_weights.beta[None], 3, axis=0))
    assert 0 < scores[0] < 1 and scores[0] == scores[1] == scores[2], scores
    trainer.on_train_end()


def test_short_horizon_trials_share_their_batches_and_keep_the_epoch_length(training):
    trainer = training(ShortHorizonRecordsBatches)
    per_epoch = 3 * 2 + 1  # three candidates of two steps, then the epoch's one remaining step
    assert len(trainer.trained_on) == ShortHorizonThreeCandidates.epochs * per_epoch
    for epoch in range(ShortHorizonThreeCandidates.epochs):
        steps = trainer.trained_on[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert steps[0:2] == steps[2:4] == steps[4:6]  # every candidate trains on the same two batches
        assert steps[6] not in steps[:6]
    log = trainer.logger.local_logger.my_fantastic_logging
    assert len(log["train_losses"]) == ShortHorizonThreeCandidates.epochs and np.all(np.isfinite(log["train_losses"]))
    assert trainer.num_iterations_per_epoch == ShortHorizonThreeCandidates.iterations
    assert not np.allclose(trainer.das_weights.alpha(), stock_alpha(trainer)[:-1])


class RecordsBatches:
    """Test-only: every batch drawn from the training, validation and reward loaders is recorded with its case
    identifiers and whether an RL round was running."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self.in_round, self.drawn = False, []
        self._loaders = self.dataloader_train, self.dataloader_val, self.dataloader_reward
        self.dataloader_train, self.dataloader_val, self.dataloader_reward = (
            self._recording(loader, name) for loader, name in zip(self._loaders, ("train", "val", "reward")))

    def _recording(self, loader, name: str):
        while True:
            batch = next(loader)
            self.drawn.append((name, self.in_round, set(batch["keys"])))
            yield batch

    def rl_round(self, score) -> None:
        self.in_round = True
        try:
            super().rl_round(score)
        finally:
            self.in_round = False

    def on_train_end(self) -> None:
        self.dataloader_train, self.dataloader_val, self.dataloader_reward = self._loaders
        super().on_train_end()


class LookAheadRecordsBatches(RecordsBatches, CleanDeepSup):
    pass


class FaithfulRecordsBatches(RecordsBatches, FaithfulTwoCandidates):
    pass


class ShortHorizonRecordsBatches(RecordsBatches, ShortHorizonThreeCandidates):
    pass


@pytest.mark.parametrize("trainer_class", [LookAheadRecordsBatches, FaithfulRecordsBatches,
                                           ShortHorizonRecordsBatches])
def test_the_rl_never_loads_a_validation_case(training, trainer_class):
    """The reward comes from cases carved out of the fold's training cases, written to the fold folder; nnU-Net trains
    on none of them, and no batch of the fold's validation cases is drawn while an RL round runs."""
    trainer = training(trainer_class)
    split = json.load(open(os.path.join(trainer.output_folder, REWARD_CASES_FILE)))
    folds = json.load(open(os.path.join(trainer.preprocessed_dataset_folder_base, "splits_final.json")))
    assert sorted(split["training"] + split["reward"]) == sorted(folds[0]["train"])
    assert split["validation"] == folds[0]["val"] and len(split["reward"]) >= 2
    assert not set(split["reward"]) & set(split["validation"])
    drawn = {name: set().union(*[keys for n, _, keys in trainer.drawn if n == name]) for name in ("train", "reward")}
    assert drawn["reward"] and drawn["reward"] <= set(split["reward"])
    assert not drawn["train"] & set(split["reward"])
    assert not [keys for name, in_round, keys in trainer.drawn if name == "val" and in_round]
    assert any(name == "reward" and in_round for name, in_round, _ in trainer.drawn)


def test_reward_cases_are_a_fixed_seeded_tenth_of_at_least_two():
    cases = [f"case_{i:03d}" for i in range(40)]
    reward = carve_reward_cases(cases, 0.1, 2)
    assert len(reward) == 4 and set(reward) <= set(cases)
    assert carve_reward_cases(list(reversed(cases)), 0.1, 2) == reward
    assert len(carve_reward_cases(cases[:5], 0.1, 2)) == 2
    with pytest.raises(NnunetRLError, match="none would be left"):
        carve_reward_cases(cases[:2], 0.1, 2)


def test_awsnet_is_pam_and_das_in_one_trainer(planned_dataset):
    trainer = trained(planned_dataset, AWSnetTiny)
    assert sum(isinstance(m, PixelAttentionGate) for m in trainer.network.modules()) == \
        len(trainer.network.decoder.stages)
    learned = json.load(open(os.path.join(trainer.output_folder, WEIGHTS_FILE)))
    assert sum(learned["alpha"]) == pytest.approx(1.0) and learned["alpha"][-1] == 0
    assert trainer.logger.local_logger.my_fantastic_logging["rl_deep_supervision/reward"]
    # what nnUNetv2_predict builds from the class and loads the checkpoint's weights into
    for_prediction = nnUNetTrainerAWSnet.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, enable_deep_supervision=False)
    for_prediction.load_state_dict(trainer.network.state_dict())


class AWSnetTiny(TinySchedule, nnUNetTrainerAWSnet):
    pass


def loss_of(trainer_class, planned_dataset: str, labels: dict, **dataset_keys):
    """The deep-supervision loss ``trainer_class`` builds for the planned dataset with other labels."""
    trainer = trainer_from_plans(planned_dataset, trainer_class)
    trainer.dataset_json = {**trainer.dataset_json, "labels": labels, **dataset_keys}
    trainer.label_manager = trainer.plans_manager.get_label_manager(trainer.dataset_json)
    trainer.initialize()
    return trainer


LABELS = {"background": 0, "a": 1, "b": 2}


def test_the_look_ahead_masks_an_ignore_label(planned_dataset):
    trainer = loss_of(CleanDeepSup, planned_dataset, {**LABELS, "ignore": 3})
    dice = trainer.look_ahead_dice(synthetic_batch(trainer, labels=4), synthetic_batch(trainer, labels=4),
                                   candidate_betas(trainer))
    assert dice.shape == (3,) and np.all(np.isfinite(dice)) and np.all((0 <= dice) & (dice <= 1))
    target = synthetic_batch(trainer, labels=4)["target"][0]
    output = torch.randn(target.shape[0], 3, *target.shape[2:])
    changed = torch.where(target == 3, torch.randn_like(output), output)  # other logits where the label is ignored
    torch.testing.assert_close(soft_foreground_dice(trainer.loss.loss, changed, target),
                               soft_foreground_dice(trainer.loss.loss, output, target))


def test_the_look_ahead_scores_region_targets_with_an_ignore_channel(planned_dataset):
    trainer = loss_of(CleanDeepSup, planned_dataset, {"background": 0, "whole": [1, 2], "b": 2, "ignore": 3},
                      regions_class_order=[1, 2])
    assert trainer.label_manager.has_regions and trainer.label_manager.has_ignore_label
    dice = trainer.look_ahead_dice(synthetic_batch(trainer, labels=2, channels=3),
                                   synthetic_batch(trainer, labels=2, channels=3), candidate_betas(trainer))
    assert np.all(np.isfinite(dice)) and np.all((0 <= dice) & (dice <= 1))


def test_an_all_empty_reward_batch_scores_one_not_nan():
    zero = torch.zeros(3, dtype=torch.float64)
    assert hard_foreground_dice(zero, zero, zero) == 1.0
    assert hard_foreground_dice(torch.tensor([2.0, 0, 0]), torch.tensor([0.0, 0, 2]), torch.tensor([2.0, 0, 0])) == \
        pytest.approx((4 / 6 + 1 + 0) / 3)


def candidate_betas(trainer) -> np.ndarray:
    return trainer.das_weights.candidates(trainer.controllers, 3)[1]


class PredictsBackground(torch.nn.Module):
    """Logits of a network that finds nothing, at every deep-supervision output (shapes as the targets')."""

    def __init__(self, classes: int, target_shapes: list[tuple]):
        super().__init__()
        self.classes, self.target_shapes = classes, target_shapes

    def forward(self, data: torch.Tensor) -> list[torch.Tensor]:
        outputs = [torch.zeros(shape[0], self.classes, *shape[2:]) for shape in self.target_shapes]
        for logits in outputs:
            logits[:, 0] = 10
        return outputs


def test_the_faithful_reward_of_a_batch_without_foreground_is_one(planned_dataset):
    """Nothing to find and nothing found: every class is empty, where a plain mean Dice is NaN."""
    trainer = trainer_from_plans(planned_dataset, FaithfulTwoCandidates)
    trainer.initialize()
    batch = synthetic_batch(trainer, labels=1)
    trainer.network = PredictsBackground(trainer.label_manager.num_segmentation_heads,
                                         [t.shape for t in batch["target"]])
    assert trainer._reward_dice([batch]) == 1.0


def synthetic_batch(trainer, labels: int, channels: int = 1) -> dict:
    """Random data and deep-supervision targets with label values below ``labels`` (``channels`` > 1: one-hot
    region targets of that many channels)."""
    patch = trainer.configuration_manager.patch_size
    generator = torch.Generator().manual_seed(labels * 10 + channels)
    data = torch.randn(2, trainer.num_input_channels, *patch, generator=generator)
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        shape = (2, channels, *np.round(np.multiply(patch, scale)).astype(int))
        targets.append(torch.randint(0, labels, shape, generator=generator).float())
    return {"data": data, "target": targets, "keys": ["synthetic"] * 2}


def test_a_configuration_without_deep_supervision_is_refused(planned_dataset):
    trainer = trainer_from_plans(planned_dataset, nnUNetTrainerRLDeepSup)
    trainer.enable_deep_supervision = False  # nnU-Net's loss then has no DeepSupervisionWrapper
    with pytest.raises(NnunetRLError, match="trains without deep supervision"):
        trainer.initialize()
