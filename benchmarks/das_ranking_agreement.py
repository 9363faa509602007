"""Does DAS's look-ahead rank candidate weightings as the faithful (bilevel) mode does? Spearman ρ per round.

Each round, from one training state: K candidate weightings are sampled from the controllers; the look-ahead scores
them (``nnUNetTrainerRLDeepSup.look_ahead_dice`` on a training batch and a reward batch) and the faithful mode scores
them (``nnUNetTrainerRLDeepSup_faithful.train_candidates``: each candidate trained ``--iterations`` steps from that
state with nnU-Net's own ``train_step``, then the Dice on the same reward batches); ρ between the two scores. The
network then continues from the faithful mode's best candidate, as in the faithful trainer, and the controllers are
not updated (the measurement is of the scores, not of learning). Rewards come from the fold's reward cases only.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/das_ranking_agreement.py -d 4 --prepare-msd ../shared/data/Task04_Hippocampus \\
        --warmup 100 --rounds 20 --candidates 5 --iterations 5 --reward-batches 3 -o ranking.json
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from scipy.stats import spearmanr

from benchmark_trainers import resolve_dataset
from nnunet_rl.trainers import nnUNetTrainerRLDeepSup, nnUNetTrainerRLDeepSup_faithful


class RankingProbe(nnUNetTrainerRLDeepSup_faithful):
    """The faithful trainer, able to score the same candidates by the look-ahead too; results in a scratch folder."""
    look_ahead_dice = nnUNetTrainerRLDeepSup.look_ahead_dice

    def scores(self, betas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(look-ahead, faithful) scores of the candidates, both from the current state; the network then holds the
        faithful mode's best candidate."""
        look_ahead = self.look_ahead_dice(next(self.dataloader_train), next(self.dataloader_reward), betas)
        self._scheduled_iterations = self.num_iterations_per_epoch  # as on_train_epoch_start sets it
        faithful = np.array(self.train_candidates(betas))
        self.num_iterations_per_epoch = self._scheduled_iterations
        return look_ahead, faithful


def measure(dataset: str, configuration: str, args) -> dict:
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans = {**load_json(str(folder / "nnUNetPlans.json")), "continue_training": False}  # as nnUNetv2_train sets it
    trainer = RankingProbe(plans, configuration, args.fold, load_json(str(folder / "dataset.json")),
                           torch.device(args.device))
    trainer.num_iterations_per_epoch = args.iterations
    trainer.num_val_iterations_per_epoch = args.reward_batches
    trainer.output_folder = trainer.output_folder_base = str(Path(args.scratch).resolve())
    trainer.on_train_start()
    trainer.network.train()
    for _ in range(args.warmup):
        trainer.train_step(next(trainer.dataloader_train))
    rounds = []
    for index in range(args.rounds):
        start = time.perf_counter()
        _, betas = trainer.das_weights.candidates(trainer.controllers, args.candidates)
        look_ahead, faithful = trainer.scores(betas)
        rho = spearmanr(look_ahead, faithful).statistic
        rounds.append({"rho": None if np.isnan(rho) else float(rho), "look_ahead": look_ahead.tolist(),
                       "faithful": faithful.tolist(), "alpha": trainer.das_weights.alpha().tolist()})
        print(f"round {index}: rho = {rho:.3f} ({time.perf_counter() - start:.0f} s); look-ahead "
              f"{np.round(look_ahead, 6).tolist()}, faithful {np.round(faithful, 4).tolist()}", flush=True)
    trainer.on_train_end()
    rhos = np.array([r["rho"] for r in rounds if r["rho"] is not None])
    return {"dataset": dataset, "configuration": configuration, "fold": args.fold, "warmup": args.warmup,
            "candidates": args.candidates, "iterations": args.iterations, "reward_batches": args.reward_batches,
            "rho_mean": float(rhos.mean()) if rhos.size else None,
            "rho_sd": float(rhos.std(ddof=1)) if rhos.size > 1 else None,
            "rounds_with_rho": int(rhos.size), "rho_positive_fraction": float((rhos > 0).mean()) if rhos.size else None,
            "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-d", required=True, help="dataset name or ID")
    parser.add_argument("-c", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--prepare-msd", default=None, help="MSD task folder to convert and plan when missing")
    parser.add_argument("--warmup", type=int, default=50, help="plain training steps before the first round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=10, help="K")
    parser.add_argument("--iterations", type=int, default=250, help="training steps per faithful candidate")
    parser.add_argument("--reward-batches", type=int, default=5, help="reward batches scoring each candidate")
    parser.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scratch", default="das_ranking_scratch", help="folder for the probe's checkpoints/logs")
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    result = measure(resolve_dataset(args.d, args.c, "nnUNetPlans", args.prepare_msd), args.c, args)
    summary = {k: v for k, v in result.items() if k != "rounds"}
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    main()
