"""Does MRL-Seg's masking improve on its own pre-trained Segmentation-Net, at the plans' defaults (issue 15)?

Set-up, fixed before the first run (docs/mrl_seg.md, "Evidence"): ``make-dataset --kind imbalanced --dim 2`` (20
training cases of 64², organ plus lesions of 0.1-2 %, and the generator's held-out cases in imagesTs), planned by
``nnunet-rl plan`` for 2d; nnU-Net's own training (augmentation, patch sampling, SGD with its poly schedule) of fold 0
with every ``mrl_seg`` default of the plans except the schedule: 20 epochs of 25 iterations (5 validation
iterations), so the pre-training phase (``segmentation_fraction`` 0.5) is 250 iterations of nnU-Net's loss and the RL
phase 250 episodes, in which nnU-Net's loss keeps training the Segmentation-Net on the masked input s(T). Arms: the
learner (``nnUNetTrainerMRLSeg``) and the control ``nnUNetTrainerMRLSeg_shuffledReward`` (each step's rewards permuted
across the voxels of each patch), seeds 0, 1, 2 (torch, numpy, random and the action sampler).

Outcome: on the held-out cases (never seen in training: the RL reward comes from training batches only), predicted by
nnU-Net's predictor (Gaussian sliding window, mirroring), the mean foreground Dice (organ and lesion, averaged per
case, then over cases) of

- ``pretrained``: the Segmentation-Net as the pre-training phase left it (its weights copied at the start of the
  first RL epoch), on the unmasked input: "its own pre-trained Segmentation-Net";
- ``final_unmasked``: the final Segmentation-Net on the unmasked input (context: what the RL phase's extra training
  of the Segmentation-Net gives without masks);
- t = 1 … steps: the final network after t greedy masking steps (t = steps: what ``nnUNetv2_predict`` returns);

and, on the training episodes (telemetry), the masked fraction per step in the first and the last RL epoch.
Thresholds:

- learner: Dice(steps) − Dice(pretrained) > 0 in every seed;
- control: Dice(steps) − Dice(pretrained) ≤ 0 in every seed;
- reported without a threshold: Dice(steps) − Dice(final_unmasked) (the masks' own contribution), the masked
  fractions.

History: run 1, this version.

    python benchmarks/mrl_seg_learning.py --seeds 0 1 2 -o mrl_seg_learning.json

It works in a temporary folder of its own (nnU-Net's folder variables are set for this process only).
"""
import copy
import sys
import time

import numpy as np

from nnunet_rl.plans.rl_block import PAPER_DEFAULTS
from nnunet_rl.trainers import nnUNetTrainerMRLSeg, nnUNetTrainerMRLSeg_shuffledReward
from nnunet_rl.trainers.mrl_seg import COMPONENT
from nnunet_rl.trainers.schedules import ShortSchedule
from phantom_experiments import cpu_predictor, experiment_main, held_out_cases, mean_dice, seeded_arm, trained

ARMS = {"learner": nnUNetTrainerMRLSeg, "shuffled": nnUNetTrainerMRLSeg_shuffledReward}
STEPS = PAPER_DEFAULTS[COMPONENT]["steps"]
DATASET_ID = 953
CONFIGURATION = "2d"


class PretrainedSnapshot(ShortSchedule):
    """250 iterations of nnU-Net's loss, then 250 RL episodes; keeps the network's weights as they are when the first
    RL epoch starts (the pre-trained Segmentation-Net)."""
    epochs, iterations, val_iterations = 20, 25, 5
    pretrained: dict | None = None

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.rl_start_epoch:
            self.pretrained = copy.deepcopy(self.bare_network.state_dict())
        super().on_train_epoch_start()


def held_out_dice(trainer, dataset: str) -> dict:
    """Mean foreground Dice on the held-out cases: the pre-trained and the final Segmentation-Net unmasked, and the
    final network after t greedy masking steps."""
    network = trainer.bare_network
    labels = trainer.label_manager.foreground_labels
    cases, references = held_out_cases(dataset)
    final = copy.deepcopy(network.state_dict())  # the predictor loads its parameters into the network
    result = {}
    for key, steps, parameters in [("pretrained", 0, trainer.pretrained), ("final_unmasked", 0, final),
                                   *[(t, t, final) for t in range(1, STEPS + 1)]]:
        network.steps = steps
        predictor = cpu_predictor(trainer, network, parameters)
        result[key] = float(np.mean([mean_dice(predictor.predict_single_npy_array(data, properties),
                                               references[case], labels)
                                     for case, (data, properties) in cases.items()]))
    network.load_state_dict(final)
    network.steps = STEPS
    return result


def masked_fractions(trainer) -> dict:
    """The training episodes' masked fraction per step, first and last RL epoch (telemetry)."""
    log = trainer.logger.local_logger.my_fantastic_logging
    series = [log[f"{COMPONENT}/masked_fraction_step{t}"] for t in range(1, STEPS + 1)]
    finite = [[v for v in s if v == v] for s in series]
    return {"first_rl_epoch": [s[0] for s in finite], "last_rl_epoch": [s[-1] for s in finite]}


def run(dataset: str, seeds: list[int], arms: list[str]) -> dict:
    dice, masked = {arm: {} for arm in arms}, {arm: {} for arm in arms}
    for arm in arms:
        for seed in seeds:
            start = time.perf_counter()
            trainer = trained(dataset, seeded_arm(arm, ARMS, PretrainedSnapshot, COMPONENT, seed), CONFIGURATION,
                              seed)
            dice[arm][seed] = held_out_dice(trainer, dataset)
            masked[arm][seed] = masked_fractions(trainer)
            print(f"{arm}, seed {seed}: held-out Dice {dice[arm][seed]}, masked fractions {masked[arm][seed]} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    gains = {arm: [dice[arm][seed][STEPS] - dice[arm][seed]["pretrained"] for seed in seeds] for arm in arms}
    result = {"configuration": CONFIGURATION, "seeds": seeds, "steps": STEPS, "held_out_dice": dice,
              "masked_fractions": masked, "gain_over_pretrained": gains,
              "gain_over_final_unmasked": {arm: [dice[arm][seed][STEPS] - dice[arm][seed]["final_unmasked"]
                                                 for seed in seeds] for arm in arms}}
    if "learner" in arms:
        result["learner_passes"] = min(gains["learner"]) > 0
    if "shuffled" in arms:
        result["control_fails"] = max(gains["shuffled"]) <= 0
    return result


if __name__ == "__main__":
    sys.exit(experiment_main(__doc__.split("\n")[0], ARMS, run, DATASET_ID, CONFIGURATION))
