"""Does PixelRL's refinement learn, and improve the planned network's held-out segmentation, at the plans' defaults?

Set-up, fixed before the first run (docs/pixel_rl.md, "Evidence"): ``make-dataset --kind imbalanced --dim 2`` (20
training cases of 64², organ plus lesions of 0.1-2 %, and the generator's held-out cases in imagesTs), planned by
``nnunet-rl plan`` for 2d; nnU-Net's own training (augmentation, patch sampling, SGD with its poly schedule) of fold 0
with every ``pixel_rl`` default of the plans except the schedule (``Schedule``) and, from run 5 on, f(0) (the arms).
The backbone phase (``backbone_fraction`` 0.5) is the first half of the epochs; nnU-Net's loss keeps training the
network in the RL phase. Arms: the learner and its control, whose rewards are permuted across the voxels of each
patch at each step, same seeds.

Outcome: on the held-out cases (never seen in training: the RL reward comes from training batches only), predicted by
nnU-Net's predictor (Gaussian sliding window, mirroring) from the final weights, the mean foreground Dice (organ and
lesion, averaged per case, then over cases) of the planned network's own segmentation (its argmax: "backbone") and
of the refined map after t greedy steps, for t in ``STEPS`` (t = 0: the initial map f(0)), and the ``ceiling`` and
``rewarded_ceiling`` (reported, no threshold). Thresholds:

- learner: Dice(t_max) − Dice(backbone) > 0 in every seed;
- control: Dice(t_max) − Dice(backbone) ≤ 0 in every seed;
- steps: over the learner's seeds, the mean of Dice(t+1) − Dice(t) ≥ 0 for t = 0, 1, 2;
- from run 5 on, whether the agents learn at all: the learner's Dice(t_max) − Dice(0) ≥ ½ (Dice(backbone) − Dice(0))
  in every seed (the refinement recovers at least half of what the planned network's own decision adds to f(0)),
  and the control's below that in every seed.

History (docs/pixel_rl.md, "Evidence"), each run's set-up and thresholds fixed before it ran:

1. commit 275b48e: f(0) the argmax, initial removal probability 0.005 per step, heads on nnU-Net's SGD;
2. commit bb293bf: f(0) the high-recall proposal (``proposal_threshold`` 0.9), removal probability 0.05 per step,
   heads on nnU-Net's SGD, the backbone's argmax measured on its own;
3. commit 189dfac: f(0) the argmax again, removal probability 0.05 per step, heads and ω on the paper's Adam (lr 1e-3,
   poly-decayed);
4. commit 498b51c: run 3's set-up on today's code, thresholds unchanged; it also reports the ``ceiling``, the
   held-out Dice of the best map the actions can reach from f(0) (:func:`best_removal`), so that the room the
   refinement has is measured beside what it did. Expected before running, from a stock-nnU-Net pilot on the same
   data and schedule (docs/pixel_rl.md): a room of at most a few thousandths of Dice, so that the learner is likely to
   fail.

Added after run 4's result, reported only (no threshold): the ``rewarded_ceiling``, the best held-out Dice among the
maps whose removals eq. 12 rewards (:func:`rewarded_removal`).

5. commit 6455d70: the paper's initial state, f(0) every voxel's most probable foreground label
   (``nnUNetTrainerPixelRL_allForeground``, ``proposal_threshold`` 1; control
   ``nnUNetTrainerPixelRL_allForeground_shuffledReward``), so that the agents decide what is background and eq. 12
   rewards every correct removal; 40 epochs of 25 iterations (500 backbone iterations, 500 RL episodes, twice run 4's,
   following the budget estimate in docs/pixel_rl.md); the fourth threshold added. Runs 1-4's arms
   (``nnUNetTrainerPixelRL``, ``nnUNetTrainerPixelRL_shuffledReward``, f(0) the argmax) and schedule (20 epochs) are
   those of their commits. Expected before running: the agents learn to remove most of the background (the fourth
   threshold), and whether they beat the planned network's own argmax is open.
6. commit 728909b's heads (the map enters at their last hidden layer; the dilated layers run once per episode), run
   5's arms, schedule and thresholds otherwise unchanged; fixed while run 5 was running, after its first result
   (learner, seed 0) was printed.
7. a replication of run 5 (its code, arms, schedule and thresholds; the late-entry heads of run 6 reverted) with new
   seeds 3, 4, 5, fixed after runs 5 and 6 had finished: ``--seeds 3 4 5 --arms learner`` first, the control after
   it if time allows. It passes the "learns" threshold only if it does so in every one of the three new seeds.

    python benchmarks/pixel_rl_learning.py --seeds 0 1 2 -o pixel_rl_learning.json

It works in a temporary folder of its own (nnU-Net's folder variables are set for this process only).
"""
import json
import sys
import time

import numpy as np

from nnunet_rl.plans.rl_block import PixelRLSettings
from nnunet_rl.trainers import nnUNetTrainerPixelRL_allForeground, nnUNetTrainerPixelRL_allForeground_shuffledReward
from nnunet_rl.trainers.pixel_rl import COMPONENT
from nnunet_rl.trainers.schedules import ShortSchedule
from phantom_experiments import cpu_predictor, experiment_main, held_out_cases, mean_dice, seeded_arm, trained

ARMS = {"learner": nnUNetTrainerPixelRL_allForeground, "shuffled": nnUNetTrainerPixelRL_allForeground_shuffledReward}
T_MAX = PixelRLSettings().t_max
STEPS = (0, 1, 2, 3, 5, T_MAX)
DATASET_ID = 952
CONFIGURATION = "2d"


class Schedule(ShortSchedule):
    """500 iterations of nnU-Net's loss, then 500 RL episodes."""
    epochs, iterations, val_iterations = 40, 25, 5


def best_removal(initial: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The best map the actions {set to background, keep} can reach from ``initial``: every foreground voxel whose
    label is wrong set to background, every other voxel kept (the room the refinement has: its Dice is the ceiling)."""
    return np.where((initial != 0) & (initial != reference), 0, initial)


def rewarded_removal(initial: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The best map among those whose removals eq. 12 rewards: every foreground voxel of ``initial`` whose reference
    is background set to background (+2 each); a voxel of the wrong foreground label scores 0 whether removed or
    kept, so it is kept."""
    return np.where((initial != 0) & (reference == 0), 0, initial)


def held_out_dice_per_step(trainer, dataset: str) -> dict:
    """Mean foreground Dice on the held-out cases of the planned network's argmax ("backbone") and of the refined map
    after t greedy steps, for t in ``STEPS``; the ``ceiling`` of f(0)."""
    network = trainer.bare_network
    predictor = cpu_predictor(trainer, network)
    labels = trainer.label_manager.foreground_labels
    cases, references = held_out_cases(dataset)
    proposal_threshold = network.proposal_threshold
    result = {}
    for key, steps, threshold in [("backbone", 0, 0.0), *[(steps, steps, proposal_threshold) for steps in STEPS]]:
        network.steps, network.proposal_threshold = steps, threshold
        scores, ceiling, rewarded = [], [], []
        for case, (data, properties) in cases.items():
            segmentation = predictor.predict_single_npy_array(data, properties)
            reference = references[case].reshape(segmentation.shape)
            scores.append(mean_dice(segmentation, reference, labels))
            if key == 0:
                ceiling.append(mean_dice(best_removal(segmentation, reference), reference, labels))
                rewarded.append(mean_dice(rewarded_removal(segmentation, reference), reference, labels))
        result[key] = float(np.mean(scores))
        if key == 0:
            result["ceiling"], result["rewarded_ceiling"] = float(np.mean(ceiling)), float(np.mean(rewarded))
    network.steps, network.proposal_threshold = T_MAX, proposal_threshold
    return result


def run(dataset: str, seeds: list[int], arms: list[str]) -> dict:
    curves = {arm: {} for arm in arms}
    for arm in arms:
        for seed in seeds:
            start = time.perf_counter()
            trainer = trained(dataset, seeded_arm(arm, ARMS, Schedule, COMPONENT, seed), CONFIGURATION,
                              seed)
            curve = held_out_dice_per_step(trainer, dataset)
            curves[arm][seed] = curve
            print(f"{arm}, seed {seed}: held-out Dice per step {json.dumps(curve)} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    gains = {arm: [curves[arm][seed][T_MAX] - curves[arm][seed]["backbone"] for seed in seeds] for arm in arms}
    result = {"configuration": CONFIGURATION, "seeds": seeds, "steps": list(STEPS), "dice_per_step": curves,
              "gain_t_max_over_backbone": gains}
    if "learner" in arms:
        increments = [float(np.mean([curves["learner"][seed][STEPS[i + 1]] - curves["learner"][seed][STEPS[i]]
                                     for seed in seeds])) for i in range(3)]
        result.update(learner_passes=min(gains["learner"]) > 0, mean_increments_first_steps=increments,
                      steps_non_decreasing=min(increments) >= 0)
    if "shuffled" in arms:
        result["control_fails"] = max(gains["shuffled"]) <= 0
    recovered = {arm: [curves[arm][seed][T_MAX] - curves[arm][seed][0]
                       - 0.5 * (curves[arm][seed]["backbone"] - curves[arm][seed][0]) for seed in seeds]
                 for arm in arms}
    result["recovered_over_half"] = recovered
    if "learner" in arms:
        result["learner_learns"] = min(recovered["learner"]) >= 0
    if "shuffled" in arms:
        result["control_does_not_learn"] = max(recovered["shuffled"]) < 0
    return result


if __name__ == "__main__":
    sys.exit(experiment_main(__doc__.split("\n")[0], ARMS, run, DATASET_ID, CONFIGURATION))
