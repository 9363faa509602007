"""DAS's controllers follow their reward at the plans' defaults under nnU-Net's own training; shuffled rewards do not
get there (random search, whose frozen controllers cannot move π, is run by the benchmark; its frozen θ is checked in
tests/test_rl_deep_supervision_trainer.py). ``benchmarks/das_learning.py`` (set-up and threshold, fixed before the
first run, in its docstring) on the 2d configuration of the session's dataset; docs/rl_deep_supervision.md has the
3d_fullres run and the clean-labels arm, which shows that this reward lowers output 1 on clean labels too: the test
shows that REINFORCE learns from the look-ahead's reward, not that the reward detects a useless output."""
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from das_learning import THRESHOLD, probability_of_lowering_output_1  # noqa: E402

SEEDS = (0, 1, 2)
ARMS = ("learner", "shuffled")


@pytest.fixture(scope="module")
def outcomes(planned_dataset) -> dict:
    return {arm: [probability_of_lowering_output_1(planned_dataset, arm, seed, "2d")[0] for seed in SEEDS]
            for arm in ARMS}


def test_controllers_follow_the_reward_at_the_plans_defaults(outcomes):
    assert min(outcomes["learner"]) >= THRESHOLD, outcomes


def test_shuffled_rewards_do_not(outcomes):
    assert max(outcomes["shuffled"]) < THRESHOLD, outcomes
