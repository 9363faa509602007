"""Does DAS's look-ahead rank candidate weightings as the bilevel scoring does, and does the bilevel ranking itself
reproduce on other batches? Spearman ρ per round, with that reproducibility beside it.

Each round, from one training state S of nnU-Net's own training (its augmentation and patch sampling) of
``nnUNetTrainerRLDeepSup_shortHorizon`` at the plans' defaults:

- the candidates are every distinct weighting the controllers can propose from the current β (the 3^L joint actions
  Δβ ∈ {−0.15, 0, +0.15}^L, deduplicated by α: 5 for two controlled outputs), so no two candidates of a round share
  an α (their scores can still tie; a round whose ρ is undefined is left out of that statistic);
- bilevel scores on two independent sets of common batches, A and B: on each set every candidate trains
  ``trial_steps`` steps from S with nnU-Net's own ``train_step`` on the set's training batches and is scored (foreground
  Dice, as nnU-Net's pseudo Dice) on the set's ``trial_reward_batches`` reward batches — set A's score is exactly the
  ``_shortHorizon`` trainer's;
- the look-ahead score (``look_ahead_dice``, the default trainer's) on a training batch and a reward batch of its own.

Per round: ρ(A, B), the bilevel ranking's reproducibility across batches (a proxy's agreement with one noisy set is
bounded by about √ρ(A, B)), and ρ(look-ahead, A), ρ(look-ahead, B). The network then continues from set A's best
candidate, so consecutive rounds are ``trial_steps`` steps apart (``_shortHorizon`` runs one round per epoch): the
rounds are strongly autocorrelated. The controllers are not updated (this measures scores, not learning). Rewards come
from the fold's reward cases only (``rl_reward_cases.json``), never from its validation cases.

Start state: with ``--checkpoint`` the rounds start from a finished DAS run's checkpoint (network, optimizer, β),
with the learning rate nnU-Net's poly schedule gives at the start of the RL phase (epoch ⌊warmup_fraction·E⌋ of the
checkpoint's E epochs), then ``--warmup`` training steps: finished weights at the RL phase's learning rate, a state
nnU-Net's own run never visits, chosen to look at a trained network at a learning rate where candidates still
differ. Without it, from scratch after ``--warmup`` steps.

Reading, fixed before the first run of this design (s.e. = sd/√rounds; the rounds follow one trajectory, so it is
optimistic):
- the measurement has power iff mean ρ(A, B) − 2 s.e. > 0 (the bilevel ranking reproduces across batches);
- with power, the look-ahead agrees with the bilevel scoring iff the mean over rounds of ½(ρ(look-ahead, A) +
  ρ(look-ahead, B)) − 2 s.e. > 0; otherwise no agreement is shown. Without power nothing is concluded about it.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...  # the study's; its plans copy nnUNetPlans
    run=$nnUNet_results/Dataset004_Hippocampus/nnUNetTrainerRLDeepSup_30epochs_50iters__nnUNetPlans_repeat0__3d_fullres
    python benchmarks/das_ranking_agreement.py -d 4 --epochs 30 --checkpoint $run/fold_0/checkpoint_final.pth \\
        --warmup 20 --rounds 20 -o ranking.json
"""
import argparse
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.stats import spearmanr

from benchmark_trainers import resolve_dataset
from nnunet_rl.rl_deep_supervision import ACTIONS, alpha_from_beta
from nnunet_rl.trainer_from_plans import trainer_from_plans
from nnunet_rl.trainers import nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_shortHorizon


class RankingProbe(nnUNetTrainerRLDeepSup_shortHorizon):
    """The short-horizon trainer, able to score the same candidates by the look-ahead too."""
    look_ahead_dice = nnUNetTrainerRLDeepSup.look_ahead_dice

    def distinct_candidates(self) -> np.ndarray:
        """β + Δβ for every joint action, one per distinct α, shape (n, L)."""
        betas, seen = [], set()
        for actions in itertools.product(ACTIONS, repeat=self.das_weights.num_controlled):
            beta = self.das_weights.beta + np.array(actions)
            key = tuple(np.round(alpha_from_beta(beta), 12))
            if key not in seen:
                seen.add(key)
                betas.append(beta)
        return np.array(betas)

    def bilevel_scores(self, betas: np.ndarray, start: dict) -> np.ndarray:
        """Each candidate trained from ``start`` on one fresh set of common batches and scored on its reward batches;
        the set's best candidate stays loaded and its β kept."""
        self._load_training_state(start)
        scores = np.array(self.train_candidates(betas))
        self.das_weights.keep(betas[int(np.argmax(scores))])
        self._apply_weights()
        return scores

    def round_scores(self, betas: np.ndarray) -> dict[str, np.ndarray]:
        """The look-ahead's and both sets' bilevel scores of the candidates ``betas``, all from the current state."""
        start = self._training_state()
        look_ahead = self.look_ahead_dice(next(self.dataloader_train), next(self.dataloader_reward), betas)
        set_b = self.bilevel_scores(betas, start)
        set_a = self.bilevel_scores(betas, start)  # A last: the network continues from A's best
        return {"look_ahead": look_ahead, "a": set_a, "b": set_b}


def start_from_checkpoint(trainer: RankingProbe, checkpoint: str, epochs: int) -> None:
    """A finished DAS run's state, at the learning rate of its RL phase's start."""
    trainer.load_checkpoint(checkpoint)
    trainer.current_epoch = math.floor(trainer.rl_hyperparameters("rl_deep_supervision").warmup_fraction * epochs)
    trainer.num_epochs = epochs
    trainer.lr_scheduler.max_steps = epochs
    trainer.lr_scheduler.step(trainer.current_epoch)
    reward_cases = Path(checkpoint).parent / "rl_reward_cases.json"
    if reward_cases.is_file() and load_json(str(reward_cases)) != load_json(
            str(Path(trainer.output_folder) / "rl_reward_cases.json")):
        raise SystemExit(f"the reward cases of {reward_cases} differ from this probe's: not the same fold split")


def rho(x: np.ndarray, y: np.ndarray) -> float | None:
    value = spearmanr(x, y).statistic
    return None if np.isnan(value) else float(value)


def mean_se(values: list[float | None]) -> dict:
    values = np.array([v for v in values if v is not None])
    se = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else None
    return {"mean": float(values.mean()) if values.size else None, "sd": float(values.std(ddof=1))
            if values.size > 1 else None, "se": se, "rounds": int(values.size),
            "positive_fraction": float((values > 0).mean()) if values.size else None}


def summarise(rounds: list[dict]) -> dict:
    ceiling = mean_se([r["rho_a_b"] for r in rounds])
    agreement = mean_se([None if r["rho_la_a"] is None or r["rho_la_b"] is None
                         else (r["rho_la_a"] + r["rho_la_b"]) / 2 for r in rounds])
    power = ceiling["se"] is not None and ceiling["mean"] - 2 * ceiling["se"] > 0
    agrees = power and agreement["se"] is not None and agreement["mean"] - 2 * agreement["se"] > 0
    return {"rho_a_b": ceiling, "rho_look_ahead_bilevel": agreement, "power": bool(power),
            "look_ahead_agrees": bool(agrees) if power else None}


def measure(dataset: str, args) -> dict:
    trainer = trainer_from_plans(dataset, RankingProbe, args.c, args.fold, args.plans, args.device)
    trainer.output_folder = trainer.output_folder_base = str(Path(args.scratch).resolve())
    trainer.on_train_start()
    trainer._scheduled_iterations = trainer.num_iterations_per_epoch  # as on_train_epoch_start sets it
    if args.checkpoint:
        start_from_checkpoint(trainer, args.checkpoint, args.epochs)
    trainer.network.train()
    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    rounds = []
    for index in range(args.rounds):
        begin = time.perf_counter()
        betas = trainer.distinct_candidates()
        scores = trainer.round_scores(betas)
        rounds.append({"alpha": [alpha_from_beta(b).tolist() for b in betas],
                       **{key: value.tolist() for key, value in scores.items()},
                       "rho_a_b": rho(scores["a"], scores["b"]), "rho_la_a": rho(scores["look_ahead"], scores["a"]),
                       "rho_la_b": rho(scores["look_ahead"], scores["b"])})
        print(f"round {index} ({time.perf_counter() - begin:.0f} s): rho(A,B) {rounds[-1]['rho_a_b']}, "
              f"rho(LA,A) {rounds[-1]['rho_la_a']}, rho(LA,B) {rounds[-1]['rho_la_b']}; A "
              f"{np.round(scores['a'], 4).tolist()}, B {np.round(scores['b'], 4).tolist()}", flush=True)
    trainer.on_train_end()
    return {"dataset": dataset, "configuration": args.c, "plans": args.plans, "fold": args.fold,
            "checkpoint": args.checkpoint, "epochs": args.epochs, "lr": trainer.optimizer.param_groups[0]["lr"],
            "warmup": args.warmup, "trial_steps": trainer.trial_steps,
            "trial_reward_batches": trainer.trial_reward_batches, **summarise(rounds), "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or ID")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--prepare-msd", default=None, help="MSD task folder to convert and plan when missing")
    parser.add_argument("--checkpoint", default=None, help="a finished DAS run's checkpoint to start from")
    parser.add_argument("--epochs", type=int, default=1000, help="the checkpoint's schedule (sets the RL phase's lr)")
    parser.add_argument("--warmup", type=int, default=100, help="training steps before the first round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scratch", default="das_ranking_scratch", help="folder for the probe's checkpoints/logs")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    result = measure(resolve_dataset(args.d, args.c, args.plans, args.prepare_msd), args)
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    main()
