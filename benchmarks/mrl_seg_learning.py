"""Does MRL-Seg's masking improve on its own pre-trained Segmentation-Net, at the plans' defaults?

Set-up, fixed before the first run (docs/mrl_seg.md, "Evidence"): ``make-dataset --kind imbalanced --dim 2`` (20
training cases of 64², organ plus lesions of 0.1-2 %, and the generator's held-out cases in imagesTs), planned by
``nnunet-rl plan`` for 2d; nnU-Net's own training (augmentation, patch sampling, SGD with its poly schedule) of fold 0
with every ``mrl_seg`` default of the plans except the schedule: 20 epochs of 25 iterations (5 validation
iterations), so the pre-training phase (``segmentation_fraction`` 0.5) is 250 iterations of nnU-Net's loss and the RL
phase 250 episodes, in which nnU-Net's loss keeps training the Segmentation-Net on the masked input s(T). Arms: the
learner (``nnUNetTrainerMRLSeg``) and the control ``nnUNetTrainerMRLSeg_shuffledReward`` (each step's rewards permuted
across the voxels of each patch), seeds 0, 1, 2 (torch, numpy, random and the action sampler).

Arms since run 2 also: ``stock``, nnU-Net's ``nnUNetTrainer`` on the same schedule and seeds (500 iterations of
nnU-Net's loss), the matched arm without any RL.

Outcome: on the held-out cases (never seen in training: the RL reward comes from training batches only), predicted by
nnU-Net's predictor (Gaussian sliding window, mirroring), the mean foreground Dice (organ and lesion, averaged per
case, then over cases) of

- ``pretrained``: the Segmentation-Net as the pre-training phase left it (its weights copied at the start of the
  first RL epoch), on the unmasked input: "its own pre-trained Segmentation-Net";
- ``final_unmasked``: the final Segmentation-Net on the unmasked input (context: what the RL phase's extra training
  of the Segmentation-Net gives without masks);
- t = 1 … steps: the final network after t greedy masking steps (t = steps: what ``nnUNetv2_predict`` returns);
- ``stock`` (run 2 on): the stock arm's segmentation;

and, reported only: on the training episodes (telemetry) the masked fraction per step in the first and the last RL
epoch; since run 2, on the held-out images (whole 64² images, one window, no mirroring) the greedy masks' balance
per step: N_F/N_B of the retained voxels (eq. 3's optimum is √β = 0.5 at the default β; the unmasked images have
about 0.3) and the fractions of the foreground and of the background masked.

Thresholds, run 1 (the component's learning criterion as specified):

- learner: Dice(steps) − Dice(pretrained) > 0 in every seed;
- control: Dice(steps) − Dice(pretrained) ≤ 0 in every seed.

Run 1's comparison also credits the RL with the 250 iterations of nnU-Net's loss the Segmentation-Net gets in the RL
phase (seen while run 1 ran, when one of its results, learner seed 0, had been printed); run 2
adds thresholds against the matched arm:

- learner: Dice(steps) − Dice(stock) > 0 in every seed;
- control: Dice(steps) − Dice(stock) ≤ 0 in every seed.

Run 3 adds, fixed before it ran: a learner's pass of run 2's threshold counts as the masking's only if its greedy
policy masks something on the held-out images (``held_out_balance``: foreground or background masked after the last
step > 0) in every seed; otherwise its difference to stock is nnU-Net's training alone.

History: run 1 (commit 91b0832): learner and control, run-1 thresholds; run 2 (commit fd693fa): the stock arm, the
run-2 thresholds and the held-out balance added, the run-1 thresholds still reported; run 3, this version: the
Segmentation-Net trains on the greedy policy's masks (what prediction feeds it) instead of the sampled s(T) (the
heads as in run 2: commit 728909b's heads, first named here, were reverted before run 3 started, after PixelRL's run 6
with them failed); arms, schedule, seeds and thresholds as in run 2, plus the one above. Expected before running:
close to stock, since the greedy policy masked nothing in run 2 and the Segmentation-Net now trains on what it masks.

    python benchmarks/mrl_seg_learning.py --seeds 0 1 2 -o mrl_seg_learning.json

It works in a temporary folder of its own (nnU-Net's folder variables are set for this process only).
"""
import copy
import sys
import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_rl.plans.rl_block import MRLSegSettings
from nnunet_rl.trainers import nnUNetTrainerMRLSeg, nnUNetTrainerMRLSeg_shuffledReward
from nnunet_rl.trainers.base import RLTrainerBase
from nnunet_rl.trainers.mrl_seg import COMPONENT
from nnunet_rl.trainers.schedules import ShortSchedule
from phantom_experiments import cpu_predictor, experiment_main, held_out_cases, mean_dice, seeded_arm, trained

ARMS = {"learner": nnUNetTrainerMRLSeg, "shuffled": nnUNetTrainerMRLSeg_shuffledReward, "stock": nnUNetTrainer}
RL_ARMS = ("learner", "shuffled")
STEPS = MRLSegSettings().steps
DATASET_ID = 953
CONFIGURATION = "2d"


class Schedule(ShortSchedule):
    """20 epochs of 25 iterations: for MRL-Seg 250 iterations of nnU-Net's loss, then 250 RL episodes."""
    epochs, iterations, val_iterations = 20, 25, 5


class PretrainedSnapshot(Schedule):
    """Keeps the network's weights as they are when the first RL epoch starts (the pre-trained Segmentation-Net)."""
    pretrained: dict | None = None

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == self.rl_start_epoch:
            self.pretrained = copy.deepcopy(self.bare_network.state_dict())
        super().on_train_epoch_start()


def held_out_dice(trainer, dataset: str) -> dict:
    """Mean foreground Dice on the held-out cases: the pre-trained and the final Segmentation-Net unmasked, and the
    final network after t greedy masking steps; for the stock arm its segmentation."""
    network = trainer.bare_network if isinstance(trainer, RLTrainerBase) else trainer.network  # stock: not compiled
    labels = trainer.label_manager.foreground_labels
    cases, references = held_out_cases(dataset)
    final = copy.deepcopy(network.state_dict())  # the predictor loads its parameters into the network
    if not isinstance(trainer, nnUNetTrainerMRLSeg):
        evaluations = [("stock", None, final)]
    else:
        evaluations = [("pretrained", 0, trainer.pretrained), ("final_unmasked", 0, final),
                       *[(t, t, final) for t in range(1, STEPS + 1)]]
    result = {}
    for key, steps, parameters in evaluations:
        if steps is not None:
            network.steps = steps
        predictor = cpu_predictor(trainer, network, parameters)
        result[key] = float(np.mean([mean_dice(predictor.predict_single_npy_array(data, properties),
                                               references[case], labels)
                                     for case, (data, properties) in cases.items()]))
    network.load_state_dict(final)
    if isinstance(trainer, nnUNetTrainerMRLSeg):
        network.steps = STEPS
    return result


def held_out_balance(trainer, dataset: str) -> dict:
    """Per greedy step t = 0 … steps, summed over the held-out images (preprocessed as nnU-Net does, whole image in
    one window, padded to the patch size): N_F/N_B of the retained voxels and the fractions of the foreground and of
    the background masked."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    network = trainer.bare_network.eval()
    preprocessor = trainer.configuration_manager.preprocessor_class(verbose=False)
    cases, references = held_out_cases(dataset)
    counts = np.zeros((STEPS + 1, 4))  # retained foreground, retained background, foreground, background
    for case, (data, properties) in cases.items():
        reference = references[case].reshape(1, *data.shape[1:]).astype(np.int16)
        image, reference, _ = preprocessor.run_case_npy(data, reference, properties,
                                                         trainer.plans_manager, trainer.configuration_manager,
                                                         trainer.dataset_json)
        padded, slicer = pad_nd_image(image[:, 0], trainer.configuration_manager.patch_size, "constant",
                                      {"value": 0}, True)
        with torch.no_grad():
            masks = network.greedy_masks(torch.from_numpy(padded)[None].float())
        foreground, background = reference[0, 0] > 0, reference[0, 0] == 0
        for t, mask in enumerate(masks):
            retained = ~mask[0, 0].numpy()[tuple(slicer[1:])]
            counts[t] += [(retained & foreground).sum(), (retained & background).sum(), foreground.sum(),
                          background.sum()]
    return {"retained_foreground_to_background": (counts[:, 0] / counts[:, 1]).tolist(),
            "foreground_masked": (1 - counts[:, 0] / counts[:, 2]).tolist(),
            "background_masked": (1 - counts[:, 1] / counts[:, 3]).tolist()}


def masked_fractions(trainer) -> dict:
    """The training episodes' masked fraction per step, first and last RL epoch (telemetry)."""
    log = trainer.logger.local_logger.my_fantastic_logging
    series = [log[f"{COMPONENT}/masked_fraction_step{t}"] for t in range(1, STEPS + 1)]
    finite = [[v for v in s if v == v] for s in series]
    return {"first_rl_epoch": [s[0] for s in finite], "last_rl_epoch": [s[-1] for s in finite]}


def run(dataset: str, seeds: list[int], arms: list[str]) -> dict:
    dice, masked, balance = {arm: {} for arm in arms}, {}, {}
    for arm in arms:
        for seed in seeds:
            start = time.perf_counter()
            schedule = PretrainedSnapshot if arm in RL_ARMS else Schedule
            trainer = trained(dataset, seeded_arm(arm, ARMS, schedule, COMPONENT, seed), CONFIGURATION, seed)
            dice[arm][seed] = held_out_dice(trainer, dataset)
            if arm in RL_ARMS:
                masked.setdefault(arm, {})[seed] = masked_fractions(trainer)
                balance.setdefault(arm, {})[seed] = held_out_balance(trainer, dataset)
            print(f"{arm}, seed {seed}: held-out Dice {dice[arm][seed]}, "
                  f"masked fractions {masked.get(arm, {}).get(seed)}, "
                  f"held-out balance {balance.get(arm, {}).get(seed)} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    rl_arms = [arm for arm in arms if arm in RL_ARMS]
    result = {"configuration": CONFIGURATION, "seeds": seeds, "steps": STEPS, "held_out_dice": dice,
              "masked_fractions": masked, "held_out_balance": balance,
              "gain_over_pretrained": {arm: [dice[arm][seed][STEPS] - dice[arm][seed]["pretrained"] for seed in seeds]
                                       for arm in rl_arms},
              "gain_over_final_unmasked": {arm: [dice[arm][seed][STEPS] - dice[arm][seed]["final_unmasked"]
                                                 for seed in seeds] for arm in rl_arms}}
    if "stock" in arms:
        result["gain_over_stock"] = {arm: [dice[arm][seed][STEPS] - dice["stock"][seed]["stock"] for seed in seeds]
                                     for arm in rl_arms}
    for gains, name in ((result["gain_over_pretrained"], "run1"), (result.get("gain_over_stock", {}), "run2")):
        if "learner" in gains:
            result[f"{name}_learner_passes"] = min(gains["learner"]) > 0
        if "shuffled" in gains:
            result[f"{name}_control_fails"] = max(gains["shuffled"]) <= 0
    if "run2_learner_passes" in result:
        masks_something = [max(balance["learner"][seed]["foreground_masked"][-1],
                               balance["learner"][seed]["background_masked"][-1]) > 0 for seed in seeds]
        result["run3_learner_passes"] = result["run2_learner_passes"] and all(masks_something)
    return result


if __name__ == "__main__":
    sys.exit(experiment_main(__doc__.split("\n")[0], ARMS, run, DATASET_ID, CONFIGURATION))
