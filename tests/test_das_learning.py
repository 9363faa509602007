"""Evidence that DAS's controllers learn from their reward at the plans' defaults under nnU-Net's own training, beside
two controls that must not: ``benchmarks/das_learning.py`` (set-up and threshold, fixed before the first run, in its
docstring) on the 2d configuration of the session's dataset; docs/rl_deep_supervision.md has the 3d_fullres run."""
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from das_learning import ARMS, THRESHOLD, probability_of_lowering_output_1  # noqa: E402

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def outcomes(planned_dataset) -> dict:
    return {arm: [probability_of_lowering_output_1(planned_dataset, arm, seed, "2d") for seed in SEEDS]
            for arm in ARMS}


def test_controllers_learn_to_lower_the_weight_of_a_useless_output(outcomes):
    assert min(outcomes["learner"]) >= THRESHOLD, outcomes


@pytest.mark.parametrize("control", ARMS[1:])
def test_the_controls_do_not(outcomes, control):
    assert max(outcomes[control]) < THRESHOLD, outcomes
