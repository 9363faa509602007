"""Do DAS's controllers learn at the plans' defaults under nnU-Net's own training? The learner beside three controls.

Set-up, fixed before the first run (docs/rl_deep_supervision.md, "Evidence"): a 6-case 32³ synthetic dataset planned
by ``nnunet-rl plan``, nnU-Net's own training (augmentation, patch sampling) of the look-ahead trainer with every
``rl_deep_supervision`` default of the plans except the schedule: RL from the first epoch, one round per iteration,
40 rounds in all (a default run has 250). Deep-supervision output 1 is trained on random labels, so its weight can
only hurt. Arms: the learner; the same with each round's scores shuffled across its candidates; random search
(``nnUNetTrainerRLDeepSup_randomSearch``: frozen controllers, so its π cannot move: the control that shows the
measurement itself, not a competitor). Outcome: π(Δβ = −0.15) of output 1's controller. Threshold: ≥ 0.6 for the
learner in every seed, < 0.6 for each control in every seed (the uniform start is 1/3).

Added after the first runs, threshold fixed before its first run: a fourth arm, "clean", is the learner on the true
labels for every output. Output 1 is then not useless, so if the clean arm also reaches ≥ 0.6 the learner's result
comes from the look-ahead's lean towards output 0, not from detecting the harm. Every arm also records, per round,
whether the candidates that lower output 1 scored higher on average than those that raise it.

    python benchmarks/das_learning.py -c 3d_fullres --seeds 0 1 2 -o das_learning.json

``--mode shortHorizon`` runs the same arms on ``nnUNetTrainerRLDeepSup_shortHorizon`` (40 epochs, one round each; its
threshold, the same, was fixed before its first run; no random-search arm).

It works in a temporary folder of its own (nnU-Net's folder variables are set for this process only).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnunet_rl.rl_deep_supervision import ACTIONS
from nnunet_rl.trainers import (nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_randomSearch,
                                nnUNetTrainerRLDeepSup_shortHorizon)
from nnunet_rl.plans.rl_block import DeepSupervisionSettings
from nnunet_rl.trainers.rl_deep_supervision import COMPONENT
from nnunet_rl.trainers.schedules import ShortSchedule
from nnunet_rl.trainer_from_plans import trainer_from_plans
from phantom_experiments import planned_phantoms, report, source_commit

NOISY_OUTPUT = 1
THRESHOLD = 0.6
ARMS = ("learner", "shuffled", "random search", "clean")
DATASET_ID = 951


class FortyRounds(ShortSchedule):
    """The look-ahead: 10 rounds in each of 4 epochs."""
    epochs, iterations, val_iterations = 4, 10, 1
    schedule = {"warmup_fraction": 0.0, "rl_steps_per_epoch": 10}


class FortyEpochRounds(ShortSchedule):
    """``_shortHorizon``: one round per epoch, as at nnU-Net's schedule; an epoch as long as one trial."""
    epochs, iterations, val_iterations = 40, DeepSupervisionSettings().trial_steps, 1
    schedule = {"warmup_fraction": 0.0}


MODES = {"lookAhead": (nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_randomSearch, FortyRounds),
         "shortHorizon": (nnUNetTrainerRLDeepSup_shortHorizon, None, FortyEpochRounds)}


class RecordsPreference:
    """Per round: the mean score of the candidates lowering output 1 minus that of those raising it (before any
    shuffling), in ``self.preferences``."""

    def rl_round(self, score) -> None:
        beta = self.das_weights.beta[NOISY_OUTPUT]

        def recorded(betas: np.ndarray) -> np.ndarray:
            scores = np.asarray(score(betas))
            lowered, raised = betas[:, NOISY_OUTPUT] < beta, betas[:, NOISY_OUTPUT] > beta
            if lowered.any() and raised.any():
                self.preferences.append(float(scores[lowered].mean() - scores[raised].mean()))
            return scores

        super().rl_round(recorded)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.preferences: list[float] = []


class NoisyOutput:
    """Deep-supervision output 1 is trained on random labels, drawn once per batch (a batch that several
    candidates train on gives each the same labels)."""

    def on_train_start(self) -> None:
        super().on_train_start()
        self._noise_draws = 0

    def train_step(self, batch: dict) -> dict:
        if "noisy_target" not in batch:
            target = list(batch["target"])
            generator = torch.Generator().manual_seed(self._noise_draws)
            self._noise_draws += 1
            target[NOISY_OUTPUT] = torch.randint(0, self.label_manager.num_segmentation_heads,
                                                 target[NOISY_OUTPUT].shape, generator=generator).to(target[0].dtype)
            batch["noisy_target"] = target
        return super().train_step({**batch, "target": batch["noisy_target"]})


class ShuffledRewards:
    """Control: each round's scores are permuted across its candidates before they become rewards."""

    def rl_round(self, score) -> None:
        generator = np.random.default_rng(self.controllers.generator.initial_seed() + self.current_epoch * 1000
                                          + self._iteration)
        super().rl_round(lambda betas: generator.permutation(score(betas)))


def trainer_class(arm: str, seed: int, mode: str = "lookAhead") -> type:
    learner, random_search, schedule = MODES[mode]
    if arm == "random search" and random_search is None:
        raise ValueError(f"no random-search trainer for mode {mode}")
    bases = {"learner": (NoisyOutput, learner),
             "shuffled": (NoisyOutput, ShuffledRewards, learner),
             "random search": (NoisyOutput, random_search),
             "clean": (learner,)}[arm]
    return type(f"DAS_{mode}_{arm.replace(' ', '_')}_seed{seed}", (schedule, RecordsPreference, *bases),
                {"rl_overrides": {COMPONENT: {**schedule.schedule, "seed": seed}}})


def probability_of_lowering_output_1(dataset: str, arm: str, seed: int, configuration: str,
                                     mode: str = "lookAhead") -> tuple[float, float]:
    """π(Δβ = −0.15) of output 1's controller after the run, and the fraction of rounds whose scores favoured
    lowering output 1."""
    torch.manual_seed(seed)
    trainer = trainer_from_plans(dataset, trainer_class(arm, seed, mode), configuration)
    trainer.run_training()
    return (trainer.controllers.probabilities()[NOISY_OUTPUT, ACTIONS.index(-0.15)].item(),
            float(np.mean(np.array(trainer.preferences) > 0)))


def planned_dataset(base: Path) -> str:
    """The tests' dataset: 6 synthetic 32³ two-channel cases, planned for 2d and 3d_fullres, under ``base``."""
    return planned_phantoms(base, "multimodal", DATASET_ID, ["2d", "3d_fullres"], cases=6, size=32)


def run(dataset: str, configuration: str, seeds: list[int], arms: list[str], mode: str) -> dict:
    outcomes, favoured = {arm: [] for arm in arms}, {arm: [] for arm in arms}
    for arm in arms:
        for seed in seeds:
            start = time.perf_counter()
            probability, fraction = probability_of_lowering_output_1(dataset, arm, seed, configuration, mode)
            outcomes[arm].append(probability)
            favoured[arm].append(fraction)
            print(f"{arm}, seed {seed}: pi(lower output 1) = {probability:.3f}, rounds favouring it {fraction:.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    controls = [arm for arm in arms if arm != "learner"]
    return {"mode": mode, "configuration": configuration, "seeds": seeds, "threshold": THRESHOLD, "outcomes": outcomes,
            "rounds_favouring_lowering_output_1": favoured,
            "learner_passes": min(outcomes["learner"]) >= THRESHOLD if "learner" in arms else None,
            "controls_fail": {arm: max(outcomes[arm]) < THRESHOLD for arm in controls}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--mode", default="lookAhead", choices=list(MODES),
                        help="lookAhead: nnUNetTrainerRLDeepSup; shortHorizon: nnUNetTrainerRLDeepSup_shortHorizon")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    commit = source_commit()
    with tempfile.TemporaryDirectory() as base:
        result = run(planned_dataset(Path(base)), args.configuration, args.seeds, args.arms, args.mode)
    report(result, args.output, commit)


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    sys.exit(main())
