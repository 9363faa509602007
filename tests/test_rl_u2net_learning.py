"""Evidence that RL-U2Net's PoseAlign learns: on phantoms whose MRI channel is turned by a known cube rotation, the
policy of the deepest module that fuses MRI into the CT branch converges to the rotation that undoes it.

The case is built to have one right answer: the patch is the whole 32³ volume and nothing moves the channels
relative to each other — no mirroring or rotation augmentation (they conjugate the inter-modal rotation) and no
foreground oversampling (it shifts the patch, and a rotation about a shifted centre is a different map). The RL phase
is compressed into 24 epochs of 8 iterations, so the learning rates are larger than the paper's (a test-only
variant; the method, reward and update are the trainer's).
"""
import json
import os

import numpy as np
import pytest
import torch


from nnunet_rl.trainers import nnUNetTrainerRLU2Net
from nnunet_rl.trainers.rl_u2net import COMPONENT
from nnunet_rl.trainers.schedules import ShortSchedule
from nnunet_rl.trainer_from_plans import trainer_from_plans

pytestmark = pytest.mark.e2e
DATASET_ID = 952
DEEPEST_PRIMARY_MODULE = "primary_stage3"  # 32³ plans: 4 stages, RL-XAlign after stages 2-3


class RotationLearner(ShortSchedule, nnUNetTrainerRLU2Net):
    epochs, iterations, val_iterations = 24, 8, 1
    rl_overrides = {COMPONENT: {"rl_fraction": 1.0, "rollout_samples": 8, "policy_lr": 0.005, "value_lr": 0.01}}

    def get_dataloaders(self):
        self.oversample_foreground_percent = 0.0
        return super().get_dataloaders()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        _, dummy_2d, _, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return (0.0, 0.0), dummy_2d, self.configuration_manager.patch_size, None


@pytest.fixture(scope="module")
def rotated_dataset(planned_dataset) -> str:
    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.plans.planner import plan_rl
    folder = make_dataset("multimodal", DATASET_ID, cases=6, size=32, rotate_aux="fixed")
    plan_rl(folder.name, ["3d_fullres"])
    return folder.name


def test_pose_align_learns_the_rotation_that_undoes_the_known_one(rotated_dataset):
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = trainer_from_plans(rotated_dataset, RotationLearner)
    trainer.run_training()
    dataset_json = json.load(open(os.path.join(os.environ["nnUNet_raw"], rotated_dataset, "dataset.json")))
    undo = dataset_json["nnunet_rl"]["aux_rotation"]["inverse_index"]

    policy = json.load(open(os.path.join(trainer.output_folder, "rl_policy.json")))["modules"]
    assert max(m["encoder_stage"] for m in policy.values()) == policy[DEEPEST_PRIMARY_MODULE]["encoder_stage"]
    probabilities = {r["index"]: r["probability"] for r in policy[DEEPEST_PRIMARY_MODULE]["rotations"]}
    assert probabilities[undo] >= 0.5, probabilities
    assert policy[DEEPEST_PRIMARY_MODULE]["greedy_index"] == undo

    rewards = trainer.logger.local_logger.my_fantastic_logging["rl_u2net/reward"]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3])
